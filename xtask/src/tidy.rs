//! `cargo xtask tidy`: the shape rules of kiln's tree, checked in seconds
//! (also a step of `cargo xtask test`). See ARCHITECTURE.md's "Tidy" part
//! for the limits and why.
//!
//! Over the files git tracks:
//! - `lib-doc`: every workspace crate's `lib.rs` opens with a `//!` doc whose
//!   first sentence says what the crate is and a later sentence what it is
//!   not: one with a negation (`not`, `never`, `no`, `nor`, `cannot` or an
//!   `n't` word). A bare one-line doc has no later sentence and fails.
//! - `file-length`: no Rust file has more than [`MAX_FILE_LINES`] lines
//!   before its `#[cfg(test)] mod` (all of it when it has none).
//! - `fn-length`: no function (free, method or trait default) spans more
//!   than [`MAX_FN_LINES`] lines from `fn` to its closing brace.
//! - `dependencies`: `cargo tree` of each workspace package keeps the
//!   one-way rules of ARCHITECTURE.md (see [`tree_rules`]).
//!
//! Files under a `tests/` directory, `#[cfg(test)]` items, `#[test]`
//! functions and fuzz corpora are exempt from the length rules. Each
//! violation is one line, `place: [rule] what`; any violation fails.

use std::fmt;
use std::path::{Component, Path};
use std::process::Command;

use anyhow::{Context, Result, bail};
use syn::visit::{self, Visit};

use crate::cargo;
use crate::json::Json;

/// Lines a source file may have before its test module.
pub(crate) const MAX_FILE_LINES: usize = 700;
/// Lines a function may span, signature to closing brace.
pub(crate) const MAX_FN_LINES: usize = 120;

/// One broken rule, at a place (`file:line` or a crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    place: String,
    rule: &'static str,
    message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: [{}] {}", self.place, self.rule, self.message)
    }
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("`cargo xtask tidy` takes no arguments, got `{arg}`");
    }
    let violations = check_tree_here()?;
    for violation in &violations {
        println!("{violation}");
    }
    if violations.is_empty() {
        println!("tidy: no violations");
        Ok(())
    } else {
        bail!("tidy: {} violation(s)", violations.len())
    }
}

/// Every rule over the project in the current directory (the root).
fn check_tree_here() -> Result<Vec<Violation>> {
    let files = tracked_files()?;
    let packages = workspace_packages()?;
    let libs: Vec<&str> = packages.iter().filter_map(|package| package.lib.as_deref()).collect();
    let mut violations = check_files(Path::new("."), &files, &libs)?;
    let names: Vec<&str> = packages.iter().map(|package| package.name.as_str()).collect();
    for rule in tree_rules(&names) {
        let listing = cargo_tree(&rule.package, rule.args)?;
        violations.extend(check_listing(&rule, &listing));
    }
    Ok(violations)
}

/// The source rules over `files` (paths relative to `root`); `libs` are
/// the workspace crates' `lib.rs` files among them.
fn check_files(root: &Path, files: &[String], libs: &[&str]) -> Result<Vec<Violation>> {
    let mut violations = Vec::new();
    for file in files {
        let is_lib = libs.contains(&file.as_str());
        if !file.ends_with(".rs") || (!is_lib && is_exempt(file)) {
            continue;
        }
        let path = root.join(file);
        let source = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if is_lib {
            violations.extend(check_lib_doc(file, &source));
        }
        if !is_exempt(file) {
            violations.extend(check_source(file, &source));
        }
    }
    Ok(violations)
}

/// Test-only files: under a `tests/` directory, or a fuzz corpus.
fn is_exempt(file: &str) -> bool {
    Path::new(file).components().any(|component| match component {
        Component::Normal(name) => name == "tests" || name == "corpus" || name == "artifacts",
        _ => false,
    })
}

/// The `lib-doc` rule for one `lib.rs`.
fn check_lib_doc(file: &str, source: &str) -> Option<Violation> {
    let doc: Vec<&str> = source.lines().map_while(|line| line.strip_prefix("//!")).collect();
    let violation = |message: &str| Violation { place: format!("{file}:1"), rule: "lib-doc", message: message.into() };
    if doc.is_empty() {
        return Some(violation("lib.rs does not open with a `//!` doc saying what the crate is and is not"));
    }
    let text = doc.join(" ");
    let sentences: Vec<&str> = text.split_inclusive(['.', '!', '?']).filter(|s| !s.trim().is_empty()).collect();
    let says_what_it_is_not = sentences.iter().skip(1).any(|sentence| {
        sentence.split(|c: char| !c.is_ascii_alphanumeric() && c != '\'').any(|word| {
            let word = word.to_ascii_lowercase();
            matches!(word.as_str(), "not" | "never" | "no" | "nor" | "cannot") || word.ends_with("n't")
        })
    });
    (!says_what_it_is_not).then(|| {
        violation("the `//!` doc has no sentence after the first that says what the crate is not (not/never/no)")
    })
}

/// The `file-length` and `fn-length` rules for one source file.
fn check_source(file: &str, source: &str) -> Vec<Violation> {
    let syntax = match syn::parse_file(source) {
        Ok(syntax) => syntax,
        Err(err) => {
            let line = err.span().start().line;
            return vec![Violation { place: format!("{file}:{line}"), rule: "parse", message: err.to_string() }];
        }
    };
    let mut violations = Vec::new();
    // Every top-level `#[cfg(test)]` item's lines (attributes to closing
    // brace) are test code; wherever it stands, nothing else is exempt.
    let test_lines: usize = syntax
        .items
        .iter()
        .filter_map(|item| {
            let (attrs, end) = attrs_and_end_line(item)?;
            let attr = attrs.iter().find(|attr| is_cfg_test(attr))?;
            Some(end + 1 - attr_line(attr))
        })
        .sum();
    let lines = source.lines().count().saturating_sub(test_lines);
    if lines > MAX_FILE_LINES {
        violations.push(Violation {
            place: format!("{file}:1"),
            rule: "file-length",
            message: format!("{lines} lines outside tests (limit {MAX_FILE_LINES}); split it by concern"),
        });
    }
    let mut functions = FunctionLengths { file, violations: &mut violations };
    functions.visit_file(&syntax);
    violations
}

/// A top-level item's attributes and last line, for the kinds test code
/// comes in (modules, functions, impls, imports); other kinds never count as tests.
fn attrs_and_end_line(item: &syn::Item) -> Option<(&[syn::Attribute], usize)> {
    let (attrs, end) = match item {
        syn::Item::Mod(module) => {
            let end = match &module.content {
                Some((brace, _)) => brace.span.close().end(),
                None => module.semi.as_ref()?.span.end(),
            };
            (&module.attrs, end)
        }
        syn::Item::Fn(function) => (&function.attrs, function.block.brace_token.span.close().end()),
        syn::Item::Impl(block) => (&block.attrs, block.brace_token.span.close().end()),
        syn::Item::Use(import) => (&import.attrs, import.semi_token.span.end()),
        _ => return None,
    };
    Some((attrs.as_slice(), end.line))
}

fn attr_line(attr: &syn::Attribute) -> usize {
    attr.pound_token.span.start().line
}

/// `#[cfg(test)]`.
fn is_cfg_test(attr: &syn::Attribute) -> bool {
    match &attr.meta {
        syn::Meta::List(list) => list.path.is_ident("cfg") && list.tokens.to_string() == "test",
        _ => false,
    }
}

/// `#[cfg(test)]` or `#[test]`: code that only tests compile.
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| is_cfg_test(attr) || attr.path().is_ident("test"))
}

/// Reports every non-test function longer than [`MAX_FN_LINES`].
struct FunctionLengths<'a> {
    file: &'a str,
    violations: &'a mut Vec<Violation>,
}

impl FunctionLengths<'_> {
    fn check(&mut self, signature: &syn::Signature, body: &syn::Block) {
        let start = signature.fn_token.span.start().line;
        let lines = body.brace_token.span.close().end().line + 1 - start;
        if lines > MAX_FN_LINES {
            self.violations.push(Violation {
                place: format!("{}:{start}", self.file),
                rule: "fn-length",
                message: format!("fn `{}` is {lines} lines (limit {MAX_FN_LINES}); split it", signature.ident),
            });
        }
    }
}

impl<'ast> Visit<'ast> for FunctionLengths<'_> {
    fn visit_item_mod(&mut self, module: &'ast syn::ItemMod) {
        if !is_test_only(&module.attrs) {
            visit::visit_item_mod(self, module);
        }
    }

    fn visit_item_impl(&mut self, block: &'ast syn::ItemImpl) {
        if !is_test_only(&block.attrs) {
            visit::visit_item_impl(self, block);
        }
    }

    fn visit_item_fn(&mut self, function: &'ast syn::ItemFn) {
        if !is_test_only(&function.attrs) {
            self.check(&function.sig, &function.block);
            visit::visit_item_fn(self, function);
        }
    }

    fn visit_impl_item_fn(&mut self, function: &'ast syn::ImplItemFn) {
        if !is_test_only(&function.attrs) {
            self.check(&function.sig, &function.block);
            visit::visit_impl_item_fn(self, function);
        }
    }

    fn visit_trait_item_fn(&mut self, function: &'ast syn::TraitItemFn) {
        if is_test_only(&function.attrs) {
            return;
        }
        if let Some(body) = &function.default {
            self.check(&function.sig, body);
        }
        visit::visit_trait_item_fn(self, function);
    }
}

/// A crate that must not appear in one package's normal dependency tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TreeRule {
    package: String,
    /// Extra `cargo tree` arguments (`--no-default-features`).
    args: &'static [&'static str],
    forbidden: &'static [&'static str],
    why: &'static str,
}

/// The one-way dependency rules (ARCHITECTURE.md), for the workspace
/// packages `members`: the VM path of `kiln` compiles no Kubernetes stack
/// (TLS, rustls, it may: registries need it), kiln-oci no async runtime or
/// C TLS library, kiln-k8s no host networking, kiln-guest no host-only crate; tokio only
/// under kiln-k8s (and so kiln's default `k8s` feature), anyhow only in the
/// kiln package (its binary) and xtask.
fn tree_rules(members: &[&str]) -> Vec<TreeRule> {
    let rule = |package: &str, args, forbidden, why| TreeRule { package: package.to_owned(), args, forbidden, why };
    let mut rules = vec![
        rule(
            "kiln",
            &["--no-default-features"][..],
            // rustls may come in: kiln-oci's registry client speaks HTTPS (blocking, ureq).
            &["kube", "k8s-openapi", "hyper", "tokio"][..],
            "kiln's VM path (without the `k8s` feature) compiles no Kubernetes stack",
        ),
        rule(
            "kiln-oci",
            &[],
            &["tokio", "hyper", "aws-lc-rs", "aws-lc-sys", "openssl-sys"],
            "kiln-oci's registry client is blocking and uses rustls with ring: no async runtime, no C TLS library",
        ),
        rule(
            "kiln-k8s",
            &[],
            &["nftables", "rustix", "kiln-net"],
            "kiln-k8s gets the firewall model without host networking",
        ),
        rule(
            "kiln-guest",
            &[],
            &["kiln-net", "kiln-vmm", "kiln-imagefmt", "rustix"],
            "kiln-guest runs in the guest and depends on no host-only crate",
        ),
    ];
    for member in members {
        if !matches!(*member, "kiln" | "kiln-k8s") {
            rules.push(rule(member, &[], &["tokio"], "tokio is only for kiln-k8s and kiln's `k8s` feature"));
        }
        if !matches!(*member, "kiln" | "xtask") {
            rules.push(rule(member, &[], &["anyhow"], "anyhow is only for the kiln binary and xtask"));
        }
    }
    rules
}

/// The violations of `rule` in `listing`, `cargo tree --prefix none`'s output.
fn check_listing(rule: &TreeRule, listing: &str) -> Vec<Violation> {
    let mut found: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| rule.forbidden.contains(name))
        .collect();
    found.sort_unstable();
    found.dedup();
    let place = if rule.args.is_empty() {
        format!("crate {}", rule.package)
    } else {
        format!("crate {} ({})", rule.package, rule.args.join(" "))
    };
    found
        .into_iter()
        .map(|name| Violation {
            place: place.clone(),
            rule: "dependencies",
            message: format!("depends on {name}: {}", rule.why),
        })
        .collect()
}

/// A workspace package: its name and its library's root file, relative.
#[derive(Debug)]
struct Package {
    name: String,
    lib: Option<String>,
}

fn workspace_packages() -> Result<Vec<Package>> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let root = std::env::current_dir().context("cannot read the current directory")?;
    parse_packages(&String::from_utf8_lossy(&output.stdout), &root)
}

/// The packages of `cargo metadata --no-deps`'s output, with `lib.rs`
/// paths made relative to `root`.
fn parse_packages(metadata: &str, root: &Path) -> Result<Vec<Package>> {
    let metadata = Json::parse(metadata).context("cannot parse cargo metadata's output")?;
    let Some(Json::Array(packages)) = metadata.get("packages") else { bail!("cargo metadata lists no packages") };
    packages
        .iter()
        .map(|package| {
            let name = package.text_field("name")?;
            let targets = match package.get("targets") {
                Some(Json::Array(targets)) => targets.as_slice(),
                _ => &[],
            };
            let lib = targets.iter().find_map(|target| {
                let Some(Json::Array(kinds)) = target.get("kind") else { return None };
                let is_lib =
                    kinds.iter().any(|kind| matches!(kind, Json::String(k) if k == "lib" || k == "proc-macro"));
                let path = target.text_field("src_path").ok()?;
                let relative = Path::new(&path).strip_prefix(root).ok()?.to_str()?.to_owned();
                is_lib.then_some(relative)
            });
            Ok(Package { name, lib })
        })
        .collect()
}

/// `cargo tree`'s flat listing of `package`'s normal dependencies. Not
/// `--offline`: on a fresh machine nothing is downloaded yet when tidy runs
/// (before clippy), and cargo tree needs every dependency's manifest.
fn cargo_tree(package: &str, args: &[&str]) -> Result<String> {
    let output = cargo()
        .args(["tree", "--prefix", "none", "-e", "normal", "-p", package])
        .args(args)
        .output()
        .context("cannot run cargo tree")?;
    if !output.status.success() {
        bail!("cargo tree -p {package} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The files git tracks, relative to the root.
fn tracked_files() -> Result<Vec<String>> {
    let output = Command::new("git").args(["ls-files", "-z"]).output().context("cannot run git ls-files")?;
    if !output.status.success() {
        bail!("git ls-files failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(output
        .stdout
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    const GOOD_LIB: &str = "//! kiln-demo writes demos.\n//!\n//! It never spawns a process.\n\npub fn demo() {}\n";

    /// A function whose body makes it `lines` lines long, `fn` to `}`.
    fn function(name: &str, lines: usize) -> String {
        let mut text = format!("fn {name}() {{\n");
        for index in 0..lines - 2 {
            writeln!(text, "    let _x{index} = {index};").unwrap();
        }
        text.push_str("}\n");
        text
    }

    fn rules_of(violations: &[Violation]) -> Vec<(&str, &str)> {
        violations.iter().map(|v| (v.place.as_str(), v.rule)).collect()
    }

    #[test]
    fn a_function_over_the_limit_is_reported_at_its_line() {
        let source =
            format!("//! A module.\n\n{}{}", function("short", MAX_FN_LINES), function("long", MAX_FN_LINES + 1));
        let violations = check_source("src/demo.rs", &source);
        assert_eq!(rules_of(&violations), [("src/demo.rs:123", "fn-length")]);
        assert_eq!(
            violations[0].to_string(),
            "src/demo.rs:123: [fn-length] fn `long` is 121 lines (limit 120); split it"
        );
    }

    #[test]
    fn methods_and_trait_defaults_count_and_test_code_does_not() {
        let long = function("long", MAX_FN_LINES + 1);
        let indented: String = long.lines().map(|line| format!("    {line}\n")).collect();
        let source = format!(
            "struct S;\nimpl S {{\n{indented}}}\ntrait T {{\n{indented}}}\n#[cfg(test)]\nimpl S {{\n{indented}}}\n\
             #[test]\n{long}#[cfg(test)]\nmod tests {{\n{indented}}}\n"
        );
        let violations = check_source("src/demo.rs", &source);
        assert_eq!(rules_of(&violations), [("src/demo.rs:3", "fn-length"), ("src/demo.rs:126", "fn-length")]);
    }

    #[test]
    fn a_file_over_the_limit_is_reported_and_its_test_module_is_not_counted() {
        let body = "const X: u8 = 0;\n".repeat(MAX_FILE_LINES + 1);
        let violations = check_source("src/big.rs", &body);
        assert_eq!(rules_of(&violations), [("src/big.rs:1", "file-length")]);
        assert!(violations[0].message.starts_with("701 lines"), "{}", violations[0]);

        let exactly = "const X: u8 = 0;\n".repeat(MAX_FILE_LINES);
        let tests = "#[cfg(test)]\nmod tests {\n".to_owned() + &"const Y: u8 = 0;\n".repeat(100) + "}\n";
        assert_eq!(check_source("src/big.rs", &(exactly.clone() + &tests)), []);

        // A test module declared early exempts only itself, not what follows it.
        let early = "#[cfg(test)]\nmod tests;\n".to_owned() + &exactly + "const Z: u8 = 0;\n";
        let violations = check_source("src/big.rs", &early);
        assert_eq!(rules_of(&violations), [("src/big.rs:1", "file-length")]);
        assert!(violations[0].message.starts_with("701 lines"), "{}", violations[0]);
    }

    #[test]
    fn a_lib_doc_must_say_what_the_crate_is_not() {
        assert_eq!(check_lib_doc("src/lib.rs", GOOD_LIB), None);
        let bare = check_lib_doc("src/lib.rs", "//! kiln-demo writes demos.\n\npub fn demo() {}\n");
        assert_eq!(bare.map(|v| (v.place, v.rule)), Some(("src/lib.rs:1".to_owned(), "lib-doc")));
        // A negation in the first sentence is not a sentence about what it is not.
        assert!(check_lib_doc("src/lib.rs", "//! kiln-demo: not much.\n").is_some());
        assert!(check_lib_doc("src/lib.rs", "pub fn demo() {}\n").is_some());
        assert_eq!(check_lib_doc("src/lib.rs", "//! It runs demos.\n//! It doesn't spawn.\n"), None);
    }

    #[test]
    fn a_tree_reports_each_planted_violation_and_spares_tests() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("bad/src/lib.rs", &format!("//! kiln-bad does everything.\n\n{}", function("huge", 130)));
        write("bad/src/big.rs", &"const X: u8 = 0;\n".repeat(800));
        write("bad/tests/it/main.rs", &"const X: u8 = 0;\n".repeat(800));
        write("bad/benches/long.rs", &function("bench", 200));
        write("good/src/lib.rs", GOOD_LIB);
        write("README.md", &"text\n".repeat(800));
        let files: Vec<String> = [
            "bad/src/lib.rs",
            "bad/src/big.rs",
            "bad/tests/it/main.rs",
            "bad/benches/long.rs",
            "good/src/lib.rs",
            "README.md",
        ]
        .map(String::from)
        .to_vec();
        let violations = check_files(dir.path(), &files, &["bad/src/lib.rs", "good/src/lib.rs"]).unwrap();
        assert_eq!(
            rules_of(&violations),
            [
                ("bad/src/lib.rs:1", "lib-doc"),
                ("bad/src/lib.rs:3", "fn-length"),
                ("bad/src/big.rs:1", "file-length"),
                ("bad/benches/long.rs:1", "fn-length"),
            ]
        );
        let clean = check_files(dir.path(), &["good/src/lib.rs".to_owned()], &["good/src/lib.rs"]).unwrap();
        assert_eq!(clean, []);
    }

    /// `cargo tree -p kiln --no-default-features --prefix none -e normal`, shortened.
    const KILN_VM_ONLY: &str = "kiln v0.1.0 (/work/kiln)\nanyhow v1.0.100\nkiln-vmm v0.1.0 (/work/kiln/crates/vmm)\n\
                                serde_json v1.0.140\nkiln-net v0.1.0 (/work/kiln/crates/net)\nrustix v1.0.8\n";

    fn rule_for(package: &str, args: &[&str]) -> TreeRule {
        let members = ["kiln", "kiln-k8s", "kiln-guest", "kiln-vmm", "xtask"];
        let rules = tree_rules(&members);
        rules.into_iter().find(|rule| rule.package == package && rule.args == args).unwrap()
    }

    #[test]
    fn tokio_under_kiln_without_default_features_is_reported() {
        let rule = rule_for("kiln", &["--no-default-features"]);
        assert_eq!(check_listing(&rule, KILN_VM_ONLY), []);
        let planted = format!("{KILN_VM_ONLY}tokio v1.48.0\nkube v5.0.0\ntokio v1.48.0 (*)\n");
        let violations = check_listing(&rule, &planted);
        let shown: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "crate kiln (--no-default-features): [dependencies] depends on kube: kiln's VM path (without the `k8s` \
                 feature) compiles no Kubernetes stack",
                "crate kiln (--no-default-features): [dependencies] depends on tokio: kiln's VM path (without the `k8s` \
                 feature) compiles no Kubernetes stack",
            ]
        );
    }

    #[test]
    fn rustls_is_allowed_under_kiln_without_default_features_but_not_hyper() {
        let rule = rule_for("kiln", &["--no-default-features"]);
        let registry_client =
            format!("{KILN_VM_ONLY}kiln-oci v0.1.0 (/o)\nureq v3.5.2\nrustls v0.23.46\nring v0.17.14\n");
        assert_eq!(check_listing(&rule, &registry_client), []);
        let async_client = format!("{registry_client}hyper v1.8.1\n");
        let shown: Vec<String> = check_listing(&rule, &async_client).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["crate kiln (--no-default-features): [dependencies] depends on hyper: kiln's VM path (without the `k8s` \
              feature) compiles no Kubernetes stack"]
        );
        let oci = rule_for("kiln-oci", &[]);
        assert_eq!(check_listing(&oci, "kiln-oci v0.1.0 (/o)\nureq v3.5.2\nrustls v0.23.46\nring v0.17.14\n"), []);
        let aws = "kiln-oci v0.1.0 (/o)\nrustls v0.23.46\naws-lc-rs v1.15.0\naws-lc-sys v0.34.0\ntokio v1.48.0\n";
        assert_eq!(check_listing(&oci, aws).len(), 3);
    }

    #[test]
    fn each_dependency_rule_holds_its_crates_to_it() {
        let k8s = rule_for("kiln-k8s", &[]);
        let listing = "kiln-k8s v0.1.0 (/k)\nkiln-types v0.1.0 (/t)\nkube v5.0.0\ntokio v1.48.0\n";
        assert_eq!(check_listing(&k8s, listing), []);
        let old = "kiln-k8s v0.1.0 (/k)\nkiln-net v0.1.0 (/n)\nnftables v0.6.3\nrustix v1.0.8\n";
        assert_eq!(check_listing(&k8s, old).len(), 3);
        let guest = rule_for("kiln-guest", &[]);
        assert_eq!(check_listing(&guest, "kiln-guest v0.1.0 (/g)\nkiln-imagefmt v0.1.0 (/i)\n").len(), 1);
        // tokio: nowhere but kiln-k8s and kiln; anyhow: only kiln and xtask.
        let vmm_tokio = rule_for("kiln-vmm", &[]);
        assert!(tree_rules(&["kiln-vmm"]).iter().any(|rule| rule.forbidden == ["anyhow"]));
        assert_eq!(check_listing(&vmm_tokio, "kiln-vmm v0.1.0 (/v)\ntokio v1.48.0\n").len(), 1);
        let members = ["kiln", "kiln-k8s", "xtask"];
        let rules = tree_rules(&members);
        assert!(!rules.iter().any(|rule| rule.package == "kiln-k8s" && rule.forbidden == ["tokio"]));
        assert!(!rules.iter().any(|rule| rule.package == "xtask" && rule.forbidden == ["anyhow"]));
        assert!(rules.iter().any(|rule| rule.package == "xtask" && rule.forbidden == ["tokio"]));
    }

    #[test]
    fn packages_and_their_libs_come_from_cargo_metadata() {
        let metadata = r#"{"packages":[{"name":"kiln-demo","targets":[{"kind":["lib"],"src_path":"/w/crates/demo/src/lib.rs"}]},
            {"name":"xtask","targets":[{"kind":["bin"],"src_path":"/w/xtask/src/main.rs"}]}],"version":1}"#;
        let packages = parse_packages(metadata, Path::new("/w")).unwrap();
        let shown: Vec<(&str, Option<&str>)> = packages.iter().map(|p| (p.name.as_str(), p.lib.as_deref())).collect();
        assert_eq!(shown, [("kiln-demo", Some("crates/demo/src/lib.rs")), ("xtask", None)]);
    }
}
