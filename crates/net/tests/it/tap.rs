//! Tap devices: deterministic names (pure, expect-tests) and, as root,
//! persistent taps created and deleted inside a throwaway namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use expect_test::{Expect, expect};
use kiln_net::{Error, Tap, TapConfig, tap_name};
use serde_json::Value;

use crate::netns::{Netns, root_tools_ready};

fn check(vm_id: &str, expected: Expect) {
    let actual = match tap_name(vm_id) {
        Ok(name) => format!("{name} ({} bytes)", name.len()),
        Err(err) => format!("error: {err}"),
    };
    expected.assert_eq(&actual);
}

#[test]
fn tap_names_fit_ifnamsiz_and_differ() {
    check("web", expect!["kt-web (6 bytes)"]);
    check("web-1_a", expect!["kt-web-1_a (10 bytes)"]);
    check("abcdefghijkl", expect!["kt-abcdefghijkl (15 bytes)"]);
    check("abcdefghijklm", expect!["kt-abc-3B8356E8 (15 bytes)"]);
    check("abcdefghijklmn", expect!["kt-abc-35C134F2 (15 bytes)"]);
    check("service-alpha-0001", expect!["kt-ser-F4A04703 (15 bytes)"]);
    check("service-alpha-0002", expect!["kt-ser-F5A04896 (15 bytes)"]);
    // A short id that looks like a hashed name keeps its own name.
    check("abc-3b8356e8", expect!["kt-abc-3b8356e8 (15 bytes)"]);
    check(&"x".repeat(64), expect!["kt-xxx-D19B1AC5 (15 bytes)"]);
    check("", expect!["error: VM id `` is invalid: it is empty"]);
    check(
        "Web",
        expect!["error: VM id `Web` is invalid: only lowercase ASCII letters, digits, `-` and `_` are allowed"],
    );
    check(
        "web.1",
        expect!["error: VM id `web.1` is invalid: only lowercase ASCII letters, digits, `-` and `_` are allowed"],
    );
    check(
        &"x".repeat(65),
        expect![
            "error: VM id `xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx` is invalid: it is longer than 64 bytes"
        ],
    );
}

#[test]
fn tap_names_of_long_ids_sharing_a_prefix_do_not_collide() {
    let names: std::collections::BTreeSet<String> =
        (0..10_000).map(|n| tap_name(&format!("service-alpha-{n:05}")).unwrap()).collect();
    assert_eq!(names.len(), 10_000);
    assert!(names.iter().all(|name| name.len() <= 15));
}

#[test]
fn invalid_tap_names_are_rejected_by_name() {
    for name in ["", "kt-sixteen-bytes", "kt-a.b", "kt a", "kt/a"] {
        let err = Tap::create(name, None).unwrap_err();
        assert!(matches!(&err, Error::InvalidInterfaceName { name: n, .. } if n == name), "{name:?}: {err}");
        let err = Tap::delete(name).unwrap_err();
        assert!(matches!(&err, Error::InvalidInterfaceName { name: n, .. } if n == name), "{name:?}: {err}");
    }
}

#[test]
fn tap_names_that_name_sysctl_groups_are_refused() {
    // `/proc/sys/net/ipv4/conf/all/route_localnet` would set every
    // interface's flag; the name is refused before anything is touched.
    let config = TapConfig::new(Ipv4Addr::new(10, 77, 0, 1), 30).with_route_localnet(true);
    for name in ["all", "default", ".", ".."] {
        let err = Tap::configure(name, &config).unwrap_err();
        assert!(matches!(&err, Error::InvalidInterfaceName { name: n, .. } if n == name), "{name:?}: {err}");
        let err = Tap::delete(name).unwrap_err();
        assert!(matches!(&err, Error::InvalidInterfaceName { name: n, .. } if n == name), "{name:?}: {err}");
    }
}

#[test]
fn wait_until_exists_polls_until_the_deadline() {
    // `lo` exists in every namespace; a missing name times out.
    Tap::wait_until_exists("lo", Instant::now()).unwrap();
    let started = Instant::now();
    let err = Tap::wait_until_exists("kt-never-there", started + Duration::from_millis(50)).unwrap_err();
    assert!(matches!(&err, Error::TapWaitTimeout { name, .. } if name == "kt-never-there"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(50));
}

// ---- root-only: taps inside a throwaway namespace ----

#[test]
fn namespace_tap_create_owner_delete() {
    if !root_tools_ready(&["ip"]) {
        return;
    }
    let ns = Netns::new();
    let name = tap_name("tap-test-vm").unwrap();
    let owner = 4242;

    ns.within(|| Tap::create(&name, Some(owner))).unwrap();
    let link = ns.link(&name).expect("tap exists after create");
    let info = &link["linkinfo"];
    assert_eq!(info["info_kind"], "tun", "{link}");
    assert_eq!(info["info_data"]["type"], "tap", "{link}");
    assert_eq!(info["info_data"]["pi"], false, "{link}");
    assert_eq!(info["info_data"]["persist"], true, "{link}");
    assert_eq!(info["info_data"]["vnet_hdr"], false, "{link}");
    assert_eq!(info["info_data"]["user"], owner, "{link}");

    // A second create of the same name is a clear error, not a silent reuse.
    let err = ns.within(|| Tap::create(&name, Some(owner))).unwrap_err();
    assert!(matches!(&err, Error::TapBusy { name: n } if *n == name), "{err}");

    ns.within(|| Tap::delete(&name)).unwrap();
    assert!(ns.link(&name).is_none(), "tap still exists after delete");
    // Deleting again is idempotent.
    ns.within(|| Tap::delete(&name)).unwrap();
    assert!(ns.link(&name).is_none());
}

#[test]
fn namespace_tap_delete_refuses_a_non_tap() {
    if !root_tools_ready(&["ip"]) {
        return;
    }
    let ns = Netns::new();
    let status = Command::new("ip")
        .args(["-n", &ns.name, "link", "add", "kt-veth", "type", "veth", "peer", "name", "kt-peer"])
        .status()
        .unwrap();
    assert!(status.success());
    let err = ns.within(|| Tap::delete("kt-veth")).unwrap_err();
    assert!(matches!(&err, Error::TapNotTap { name } if name == "kt-veth"), "{err}");
    assert!(ns.link("kt-veth").is_some());
}

#[test]
fn namespace_tap_configure_address_mtu_up_route_localnet() {
    if !root_tools_ready(&["ip"]) {
        return;
    }
    let ns = Netns::new();
    let name = tap_name("cfg").unwrap();
    ns.within(|| Tap::create(&name, None)).unwrap();
    let config = TapConfig::new(Ipv4Addr::new(10, 77, 0, 1), 30).with_mtu(Some(1400)).with_route_localnet(true);
    ns.within(|| Tap::configure(&name, &config)).unwrap();
    // Twice is harmless: the address is replaced, not duplicated.
    ns.within(|| Tap::configure(&name, &config)).unwrap();

    let link = ns.link(&name).unwrap();
    assert_eq!(link["mtu"], 1400, "{link}");
    let flags: Vec<&str> = link["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(flags.contains(&"UP"), "{link}");
    let output = Command::new("ip").args(["-n", &ns.name, "-j", "addr", "show", "dev", &name]).output().unwrap();
    let addrs: Value = serde_json::from_slice(&output.stdout).unwrap();
    let inet: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(inet, ["10.77.0.1/30"], "{addrs}");
    let sysctl = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
    assert_eq!(ns.within(|| std::fs::read_to_string(&sysctl).unwrap()).trim(), "1");
    // The route to the VM's subnet goes through the tap.
    let output = Command::new("ip").args(["-n", &ns.name, "route", "get", "10.77.0.2"]).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("dev {name}")), "{output:?}");

    let bad = with_fields!(config.clone(), prefix_len: 33);
    let err = ns.within(|| Tap::configure(&name, &bad)).unwrap_err();
    assert_eq!(err.to_string(), "Tap configuration is invalid: prefix length /33 is not an IPv4 prefix");
    let err = ns.within(|| Tap::configure("kt-absent", &config)).unwrap_err();
    assert!(err.to_string().starts_with("Failed to find tap `kt-absent`"), "{err}");
}
