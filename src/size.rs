//! Human byte sizes, as written in specs and on the command line: `512MiB`.

use crate::{Error, Result};

/// Parses a byte size: a whole number with an optional unit.
///
/// `K`/`M`/`G`/`T` and `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024,
/// `KB`/`MB`/`GB`/`TB` powers of 1000, and `B` (or nothing) is bytes. Units
/// ignore case and may follow a space: `64MiB`, `64 mib`, `64M`, `1GB`, `4096`.
pub fn parse_size(input: &str) -> Result<u64> {
    let invalid = |reason: String| Error::InvalidSize { input: input.to_owned(), reason };
    let trimmed = input.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(invalid("expected a whole number of bytes, optionally followed by a unit like MiB".into()));
    }
    if unit.starts_with(['.', ',']) {
        return Err(invalid("fractions are not supported; use a smaller unit, such as 1536MiB for 1.5GiB".into()));
    }
    // Only one optional space between the number and the unit: "64 MiB".
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let multiplier = unit_multiplier(unit).ok_or_else(|| {
        invalid(format!("unknown unit {unit:?}: expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"))
    })?;
    let value: u64 = number.parse().map_err(|_| invalid("the number does not fit in 64 bits".into()))?;
    value.checked_mul(multiplier).ok_or_else(|| invalid("the size does not fit in 64 bits".into()))
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let unit = unit.to_ascii_lowercase();
    let (prefix, binary) = match unit.as_str() {
        "" | "b" => return Some(1),
        u if u.ends_with("ib") => (&u[..u.len() - 2], true),
        u if u.len() == 2 && u.ends_with('b') => (&u[..1], false),
        u => (u, true),
    };
    let power = match prefix {
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => return None,
    };
    let base: u64 = if binary { 1024 } else { 1000 };
    Some(base.pow(power))
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::parse_size;

    fn check(input: &str, expect: Expect) {
        let actual = match parse_size(input) {
            Ok(bytes) => bytes.to_string(),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn sizes() {
        check("0", expect!["0"]);
        check("4096", expect!["4096"]);
        check("512B", expect!["512"]);
        check("1K", expect!["1024"]);
        check("1k", expect!["1024"]);
        check("1KiB", expect!["1024"]);
        check("1KB", expect!["1000"]);
        check("1kb", expect!["1000"]);
        check("64MiB", expect!["67108864"]);
        check("64 MiB", expect!["67108864"]);
        check("64mib", expect!["67108864"]);
        check("64M", expect!["67108864"]);
        check("64MB", expect!["64000000"]);
        check("2GiB", expect!["2147483648"]);
        check("2G", expect!["2147483648"]);
        check("2GB", expect!["2000000000"]);
        check("1TiB", expect!["1099511627776"]);
        check("1TB", expect!["1000000000000"]);
        check(" 7 ", expect!["7"]);
        check("18446744073709551615", expect!["18446744073709551615"]);
    }

    #[test]
    fn bad_sizes() {
        check(
            "",
            expect![[
                r#"error: Invalid size "": expected a whole number of bytes, optionally followed by a unit like MiB"#
            ]],
        );
        check(
            "MiB",
            expect![[
                r#"error: Invalid size "MiB": expected a whole number of bytes, optionally followed by a unit like MiB"#
            ]],
        );
        check(
            "-1",
            expect![[
                r#"error: Invalid size "-1": expected a whole number of bytes, optionally followed by a unit like MiB"#
            ]],
        );
        check(
            "1.5GiB",
            expect![[
                r#"error: Invalid size "1.5GiB": fractions are not supported; use a smaller unit, such as 1536MiB for 1.5GiB"#
            ]],
        );
        check(
            "12XB",
            expect![[
                r#"error: Invalid size "12XB": unknown unit "XB": expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"#
            ]],
        );
        check("12 ", expect!["12"]);
        check(
            "12  MiB",
            expect![[
                r#"error: Invalid size "12  MiB": unknown unit " MiB": expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"#
            ]],
        );
        check(
            "12iB",
            expect![[
                r#"error: Invalid size "12iB": unknown unit "iB": expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"#
            ]],
        );
        check(
            "1MiBs",
            expect![[
                r#"error: Invalid size "1MiBs": unknown unit "MiBs": expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"#
            ]],
        );
        check(
            "18446744073709551616",
            expect![[r#"error: Invalid size "18446744073709551616": the number does not fit in 64 bits"#]],
        );
        check(
            "16EiB",
            expect![[
                r#"error: Invalid size "16EiB": unknown unit "EiB": expected B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"#
            ]],
        );
        check("16777216TiB", expect![[r#"error: Invalid size "16777216TiB": the size does not fit in 64 bits"#]]);
    }
}
