//! nftables rules: the JSON batches (pure, expect-tests) and, as root, the
//! rules applied inside throwaway network namespaces with real TCP traffic.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use expect_test::{Expect, expect};
use kiln_net::{Error, Firewall, HostPort, Nft, Protocol, PublishedPort, VmRules, removal_batch, setup_batch};
use serde_json::{Value, json};

use crate::netns::{Netns, ip, root_tools_ready};

fn vm(id: &str, tap: &str, firewall: Firewall) -> VmRules {
    VmRules::new(id.to_owned(), tap.to_owned(), Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2))
        .with_uplink(Some("eth0".to_owned()))
        .with_firewall(firewall)
}

/// One command per line, so a diff shows which rule changed. Fingerprints
/// (a digest of the VM's elements) read `<fingerprint>`.
fn render(batch: &Value) -> String {
    let mut batch = batch.clone();
    for cmd in batch["nftables"].as_array_mut().unwrap() {
        for verb in ["create", "delete"] {
            let Some(element) = cmd.get_mut(verb).and_then(|c| c.get_mut("element")) else { continue };
            if element["name"] == "vm_fingerprints" {
                match &mut element["elem"][0] {
                    Value::String(key) => *key = "<fingerprint>".to_owned(),
                    elem => elem["elem"]["val"] = json!("<fingerprint>"),
                }
            }
        }
    }
    batch["nftables"].as_array().unwrap().iter().map(|cmd| format!("{cmd}\n")).collect()
}

fn check(rules: VmRules, expected: Expect) {
    let rendered = match rules.add_batch() {
        Ok(batch) => render(&batch),
        Err(e) => format!("error: {e}\n"),
    };
    expected.assert_eq(&rendered);
}

fn tcp(port: u16) -> HostPort {
    HostPort { protocol: Protocol::Tcp, port }
}

/// The second VM of the namespace tests: `tap-b`, 10.99.0.5 / 10.99.0.6.
fn vm_b(firewall: Firewall) -> VmRules {
    with_fields!(
        vm("b", "tap-b", firewall),
        host_addr: Ipv4Addr::new(10, 99, 0, 5),
        guest_addr: Ipv4Addr::new(10, 99, 0, 6),
    )
}

fn egress_publishing_8080() -> Firewall {
    Firewall {
        egress: true,
        published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
        ..Firewall::default()
    }
}

fn udp(port: u16) -> HostPort {
    HostPort { protocol: Protocol::Udp, port }
}

#[test]
fn batch_deny_all() {
    check(
        vm("a", "tap-a", Firewall::default()),
        expect![[r#"
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:a","val":"tap-a"}}],"family":"inet","name":"vm_taps","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:a","val":"<fingerprint>"}}],"family":"inet","name":"vm_fingerprints","table":"kiln"}}}
        "#]],
    );
}

#[test]
fn batch_host_ports_and_egress() {
    let firewall = Firewall {
        egress: true,
        host_ports: vec![tcp(7000), HostPort { protocol: Protocol::Udp, port: 53 }],
        published_ports: vec![],
    };
    check(
        vm("web-1", "tap-web1", firewall),
        expect![[r#"
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":"tap-web1"}}],"family":"inet","name":"vm_taps","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":{"concat":["tap-web1","10.99.0.1","tcp",7000]}}}],"family":"inet","name":"host_ports","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":{"concat":["tap-web1","10.99.0.1","udp",53]}}}],"family":"inet","name":"host_ports","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":{"concat":["tap-web1","eth0"]}}}],"family":"inet","name":"egress_via","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":{"concat":["eth0","tap-web1"]}}}],"family":"inet","name":"uplink_users","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:web-1","val":"<fingerprint>"}}],"family":"inet","name":"vm_fingerprints","table":"kiln"}}}
        "#]],
    );
}

#[test]
fn batch_egress_needs_an_uplink_and_published_ports_do_not() {
    let published = vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }];
    let firewall = Firewall { egress: true, host_ports: vec![], published_ports: published.clone() };
    check(
        with_fields!(vm("db", "tap-db", firewall), uplink: None),
        expect![[r#"
            error: VM `db` has egress on, but no uplink is known for its traffic to leave through (the host has no default route)
        "#]],
    );
    // Without an uplink a published port is reachable from the host itself
    // only, so no VM needs forwarding on an uplink.
    let firewall = Firewall { published_ports: published, ..Firewall::default() };
    check(
        with_fields!(vm("db", "tap-db", firewall), uplink: None),
        expect![[r#"
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:db","val":"tap-db"}}],"family":"inet","name":"vm_taps","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:db","val":{"concat":["tap-db","10.99.0.2","tcp",80]}}}],"family":"inet","name":"published","table":"kiln"}}}
            {"create":{"element":{"elem":[[{"elem":{"comment":"kiln-vm:db","val":{"concat":["tcp",8080]}}},"10.99.0.2"]],"family":"inet","name":"dnat_addr","table":"kiln"}}}
            {"create":{"element":{"elem":[[{"elem":{"comment":"kiln-vm:db","val":{"concat":["tcp",8080]}}},80]],"family":"inet","name":"dnat_port","table":"kiln"}}}
            {"create":{"element":{"elem":[{"elem":{"comment":"kiln-vm:db","val":"<fingerprint>"}}],"family":"inet","name":"vm_fingerprints","table":"kiln"}}}
        "#]],
    );
}

/// The value of a VM's `vm_fingerprints` element.
fn fingerprint_of(rules: &VmRules) -> String {
    let batch = rules.add_batch().unwrap();
    let element = &batch["nftables"].as_array().unwrap().last().unwrap()["create"]["element"];
    assert_eq!(element["name"], "vm_fingerprints");
    element["elem"][0]["elem"]["val"].as_str().unwrap().to_owned()
}

#[test]
fn fingerprints_are_stable_across_builds_and_toolchains() {
    // Stored in the kernel's table and recomputed by whichever kiln removes
    // the VM: a launcher upgraded (or rebuilt with another Rust) while its VM
    // runs must compute the same digest. FNV-1a, pinned here.
    expect!["595ad842acb2d44"].assert_eq(&fingerprint_of(&vm("a", "tap-a", Firewall::default())));
    expect!["1d3e3d09d101daa"].assert_eq(&fingerprint_of(&vm_b(egress_publishing_8080())));
}

#[test]
fn fingerprints_differ_between_vms_and_between_rules() {
    let fingerprint = |rules: &VmRules| {
        let batch = rules.add_batch().unwrap();
        let commands = batch["nftables"].as_array().unwrap();
        let element = &commands.last().unwrap()["create"]["element"];
        assert_eq!(element["name"], "vm_fingerprints");
        element["elem"][0]["elem"]["val"].as_str().unwrap().to_owned()
    };
    let a = vm("a", "tap-a", Firewall::default());
    assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    assert_eq!(fingerprint(&a).len(), 15, "an ifname key holds 15 bytes");
    assert_ne!(fingerprint(&a), fingerprint(&with_fields!(a.clone(), vm_id: "b".into())));
    assert_ne!(fingerprint(&a), fingerprint(&vm("a", "tap-a", egress_publishing_8080())));
    // The remove batch deletes the same fingerprint.
    let removed = a.remove_batch().unwrap();
    assert!(removed.to_string().contains(&fingerprint(&a)), "{removed}");
}

#[test]
fn batch_rejects_bad_input() {
    check(
        vm("Bad.Id", "tap-a", Firewall::default()),
        expect![[r#"
        error: VM id `Bad.Id` is invalid: only lowercase ASCII letters, digits, `-` and `_` are allowed
    "#]],
    );
    check(
        vm("", "tap-a", Firewall::default()),
        expect![[r#"
        error: VM id `` is invalid: it is empty
    "#]],
    );
    check(
        vm("-a", "tap-a", Firewall::default()),
        expect![[r#"
        error: VM id `-a` is invalid: it must start with a letter or digit
    "#]],
    );
    check(
        vm(&"a".repeat(65), "tap-a", Firewall::default()),
        expect![[r#"
        error: VM id `aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa` is invalid: it is longer than 64 bytes
    "#]],
    );
    check(
        vm("a", "tap-with-long-name", Firewall::default()),
        expect![[r#"
        error: Interface name `tap-with-long-name` is invalid: it is longer than 15 bytes (IFNAMSIZ)
    "#]],
    );
    check(
        vm("a", "tap*", Firewall::default()),
        expect![[r#"
        error: Interface name `tap*` is invalid: only ASCII letters, digits, `-`, `_` and `.` are allowed
    "#]],
    );
    check(
        with_fields!(vm("a", "tap-a", Firewall::default()), uplink: Some("all".into())),
        expect![[r#"
        error: Interface name `all` is invalid: `all` and `default` name sysctl groups, not interfaces
    "#]],
    );
    check(
        with_fields!(vm("a", "tap-a", Firewall::default()), uplink: Some("tap-a".into())),
        expect![[r#"
        error: Interface name `tap-a` is invalid: it is both the tap and the uplink of VM `a`
    "#]],
    );
    check(
        vm("a", "tap-a", Firewall { host_ports: vec![tcp(0)], ..Firewall::default() }),
        expect![[r#"
        error: Firewall spec is invalid: host port tcp/0: port 0 is not a port
    "#]],
    );
    let twice = PublishedPort { protocol: Protocol::Tcp, host_port: 80, guest_port: 80 };
    check(
        vm("a", "tap-a", Firewall { published_ports: vec![twice, twice], ..Firewall::default() }),
        expect![[r#"
        error: Firewall spec is invalid: host port tcp/80 is published more than once
    "#]],
    );
}

#[test]
fn firewall_spec_round_trips_and_rejects_unknown_fields() {
    let spec = r#"{"egress":true,"hostPorts":[{"protocol":"tcp","port":7000}],"publishedPorts":[{"protocol":"udp","hostPort":5353,"guestPort":53}]}"#;
    let firewall: Firewall = serde_json::from_str(spec).unwrap();
    assert_eq!(serde_json::to_string(&firewall).unwrap(), spec);
    assert_eq!(serde_json::from_str::<Firewall>("{}").unwrap(), Firewall::default());
    let err = serde_json::from_str::<Firewall>(r#"{"egres":true}"#).unwrap_err().to_string();
    assert!(err.contains("unknown field `egres`"), "{err}");
}

#[test]
fn setup_batch_writes_the_fixed_rules() {
    expect![[r#"
        {"add":{"table":{"family":"inet","name":"kiln"}}}
        {"add":{"chain":{"family":"inet","hook":"input","name":"input","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
        {"add":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
        {"add":{"chain":{"family":"inet","hook":"prerouting","name":"prerouting","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
        {"add":{"chain":{"family":"inet","hook":"output","name":"output","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
        {"add":{"chain":{"family":"inet","hook":"postrouting","name":"postrouting","policy":"accept","prio":100,"table":"kiln","type":"nat"}}}
        {"add":{"chain":{"family":"inet","name":"from_vm_to_host","table":"kiln"}}}
        {"add":{"chain":{"family":"inet","name":"from_vm","table":"kiln"}}}
        {"add":{"chain":{"family":"inet","name":"to_vm","table":"kiln"}}}
        {"add":{"set":{"family":"inet","name":"vm_taps","table":"kiln","type":"ifname"}}}
        {"add":{"set":{"family":"inet","name":"host_ports","table":"kiln","type":["ifname","ipv4_addr","inet_proto","inet_service"]}}}
        {"add":{"set":{"family":"inet","name":"egress_via","table":"kiln","type":["ifname","ifname"]}}}
        {"add":{"set":{"family":"inet","name":"published","table":"kiln","type":["ifname","ipv4_addr","inet_proto","inet_service"]}}}
        {"add":{"set":{"family":"inet","name":"uplink_users","table":"kiln","type":["ifname","ifname"]}}}
        {"add":{"set":{"family":"inet","name":"vm_fingerprints","table":"kiln","type":"ifname"}}}
        {"add":{"set":{"family":"inet","name":"forwarding_by_kiln","table":"kiln","type":"ifname"}}}
        {"add":{"map":{"family":"inet","map":"ipv4_addr","name":"dnat_addr","table":"kiln","type":["inet_proto","inet_service"]}}}
        {"add":{"map":{"family":"inet","map":"inet_service","name":"dnat_port","table":"kiln","type":["inet_proto","inet_service"]}}}
        {"flush":{"chain":{"family":"inet","hook":"input","name":"input","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
        {"flush":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
        {"flush":{"chain":{"family":"inet","hook":"prerouting","name":"prerouting","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
        {"flush":{"chain":{"family":"inet","hook":"output","name":"output","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
        {"flush":{"chain":{"family":"inet","hook":"postrouting","name":"postrouting","policy":"accept","prio":100,"table":"kiln","type":"nat"}}}
        {"flush":{"chain":{"family":"inet","name":"from_vm_to_host","table":"kiln"}}}
        {"flush":{"chain":{"family":"inet","name":"from_vm","table":"kiln"}}}
        {"flush":{"chain":{"family":"inet","name":"to_vm","table":"kiln"}}}
        {"add":{"rule":{"chain":"input","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"@vm_taps"}},{"jump":{"target":"from_vm_to_host"}}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm_to_host","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm_to_host","expr":[{"match":{"left":{"concat":[{"meta":{"key":"iifname"}},{"payload":{"field":"daddr","protocol":"ip"}},{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]},"op":"==","right":"@host_ports"}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm_to_host","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"forward","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"@vm_taps"}},{"jump":{"target":"to_vm"}}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"forward","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"@vm_taps"}},{"jump":{"target":"from_vm"}}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"forward","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"@forwarding_by_kiln"}},{"drop":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"to_vm","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"to_vm","expr":[{"match":{"left":{"ct":{"key":"status"}},"op":"in","right":"dnat"}},{"match":{"left":{"concat":[{"meta":{"key":"oifname"}},{"payload":{"field":"daddr","protocol":"ip"}},{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]},"op":"==","right":"@published"}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"to_vm","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm","expr":[{"match":{"left":{"concat":[{"meta":{"key":"iifname"}},{"meta":{"key":"oifname"}}]},"op":"==","right":"@egress_via"}},{"accept":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"from_vm","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"prerouting","expr":[{"match":{"left":{"meta":{"key":"nfproto"}},"op":"==","right":"ipv4"}},{"match":{"left":{"fib":{"flags":["daddr"],"result":"type"}},"op":"==","right":"local"}},{"dnat":{"addr":{"map":{"data":"@dnat_addr","key":{"concat":[{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]}}},"family":"ip","port":{"map":{"data":"@dnat_port","key":{"concat":[{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]}}}}}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"output","expr":[{"match":{"left":{"meta":{"key":"nfproto"}},"op":"==","right":"ipv4"}},{"match":{"left":{"fib":{"flags":["daddr"],"result":"type"}},"op":"==","right":"local"}},{"dnat":{"addr":{"map":{"data":"@dnat_addr","key":{"concat":[{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]}}},"family":"ip","port":{"map":{"data":"@dnat_port","key":{"concat":[{"meta":{"key":"l4proto"}},{"payload":{"field":"dport","protocol":"th"}}]}}}}}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"postrouting","expr":[{"match":{"left":{"concat":[{"meta":{"key":"iifname"}},{"meta":{"key":"oifname"}}]},"op":"==","right":"@egress_via"}},{"masquerade":null}],"family":"inet","table":"kiln"}}}
        {"add":{"rule":{"chain":"postrouting","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"@vm_taps"}},{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":{"prefix":{"addr":"127.0.0.0","len":8}}}},{"masquerade":null}],"family":"inet","table":"kiln"}}}
    "#]].assert_eq(&render(&setup_batch().unwrap()));
}

#[test]
fn remove_batch_deletes_exactly_the_added_elements() {
    let firewall = Firewall {
        egress: true,
        host_ports: vec![tcp(7000)],
        published_ports: vec![PublishedPort { protocol: Protocol::Udp, host_port: 5353, guest_port: 53 }],
    };
    let rules = vm("a", "tap-a", firewall);
    let added = rules.add_batch().unwrap();
    let removed = rules.remove_batch().unwrap();
    let keys = |batch: &Value, verb: &str| -> Vec<(String, Value)> {
        batch["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|cmd| {
                let element = &cmd[verb]["element"];
                let elem = &element["elem"][0];
                // A map element is `[{"elem": ...}, data]`; a set element is `{"elem": ...}`.
                let key = if elem.is_array() { &elem[0]["elem"]["val"] } else { &elem["elem"]["val"] };
                let key = if verb == "delete" { elem.clone() } else { key.clone() };
                (element["name"].as_str().unwrap().to_owned(), key)
            })
            .collect()
    };
    assert_eq!(keys(&added, "create"), keys(&removed, "delete"));
    // tap, host port, egress, published, two DNAT maps, uplink user, fingerprint.
    assert_eq!(removed["nftables"].as_array().unwrap().len(), 8, "{removed}");
}

#[test]
fn removal_batch_finds_elements_by_tag() {
    // Shaped like `nft -j list table inet kiln` output (nft 1.0.6).
    let listing = json!({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "kiln", "handle": 1}},
        {"set": {"family": "inet", "name": "vm_taps", "table": "kiln", "type": "ifname", "handle": 8, "elem": [
            {"elem": {"val": "tap-a", "comment": "kiln-vm:a"}},
            {"elem": {"val": "tap-b", "comment": "kiln-vm:b-c"}},
            "not-ours",
        ]}},
        {"set": {"family": "inet", "name": "host_ports", "table": "kiln", "type": ["ifname", "ipv4_addr", "inet_proto", "inet_service"], "handle": 9, "elem": [
            {"elem": {"val": {"concat": ["tap-a", "10.0.0.1", "tcp", 22]}, "comment": "kiln-vm:a"}},
        ]}},
        // A set of the layout before kiln managed forwarding.
        {"set": {"family": "inet", "name": "egress_any", "table": "kiln", "type": "ifname", "handle": 11, "elem": [
            {"elem": {"val": "tap-a", "comment": "kiln-vm:a"}},
        ]}},
        {"set": {"family": "inet", "name": "someone_elses", "table": "kiln", "type": "ifname", "handle": 10, "elem": [
            {"elem": {"val": "tap-a", "comment": "kiln-vm:a"}},
        ]}},
        {"map": {"family": "inet", "name": "dnat_port", "table": "kiln", "type": ["inet_proto", "inet_service"], "handle": 14, "map": "inet_service", "elem": [
            [{"elem": {"val": {"concat": ["tcp", 8080]}, "comment": "kiln-vm:a"}}, 80],
        ]}},
        {"chain": {"family": "inet", "table": "kiln", "name": "forward", "handle": 2}},
    ]});
    let (batch, removed) = removal_batch(&listing, |id| id == "a").unwrap();
    assert_eq!(removed, ["a"]);
    expect![[r#"
        {"delete":{"element":{"elem":["tap-a"],"family":"inet","name":"vm_taps","table":"kiln"}}}
        {"delete":{"element":{"elem":[{"concat":["tap-a","10.0.0.1","tcp",22]}],"family":"inet","name":"host_ports","table":"kiln"}}}
        {"delete":{"element":{"elem":["tap-a"],"family":"inet","name":"egress_any","table":"kiln"}}}
        {"delete":{"element":{"elem":[{"concat":["tcp",8080]}],"family":"inet","name":"dnat_port","table":"kiln"}}}
    "#]].assert_eq(&render(&batch));
    let (batch, removed) = removal_batch(&listing, |_| true).unwrap();
    assert_eq!(removed, ["a", "b-c"]);
    assert_eq!(batch["nftables"].as_array().unwrap().len(), 5);
}

// ---- root-only: rules and traffic inside throwaway namespaces ----

/// A "VM": namespace `guest` whose `eth0` is paired with `tap` in `host`.
fn link_guest(host: &Netns, guest: &Netns, tap: &str, host_addr: &str, guest_addr: &str) {
    ip(&["-n", &host.name, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    ip(&["-n", &host.name, "addr", "add", &format!("{host_addr}/30"), "dev", tap]);
    ip(&["-n", &host.name, "link", "set", tap, "up"]);
    ip(&["-n", &guest.name, "addr", "add", &format!("{guest_addr}/30"), "dev", "eth0"]);
    ip(&["-n", &guest.name, "link", "set", "eth0", "up"]);
    ip(&["-n", &guest.name, "route", "add", "default", "via", host_addr]);
}

/// A link `name` in `ns` that carries no traffic: a tap or uplink kiln only
/// needs to exist (it sets forwarding flags on them). A tap, since this
/// kernel has no `dummy` module.
fn dummy(ns: &Netns, name: &str) {
    ip(&["-n", &ns.name, "tuntap", "add", "dev", name, "mode", "tap"]);
}

/// `net.ipv4.conf.<ifname>.forwarding` in `ns` ("all" is `ip_forward`).
fn forwarding(ns: &Netns, ifname: &str) -> String {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    ns.within(|| std::fs::read_to_string(&path).unwrap().trim().to_owned())
}

/// `uplink0` in `host`, paired with `eth0` (10.98.0.2) in `wan`, which has
/// no route back to the guests: only kiln's masquerade makes replies work.
fn link_wan(host: &Netns, wan: &Netns) {
    ip(&["-n", &host.name, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", &wan.name]);
    ip(&["-n", &host.name, "addr", "add", "10.98.0.1/24", "dev", "uplink0"]);
    ip(&["-n", &host.name, "link", "set", "uplink0", "up"]);
    ip(&["-n", &wan.name, "addr", "add", "10.98.0.2/24", "dev", "eth0"]);
    ip(&["-n", &wan.name, "link", "set", "eth0", "up"]);
}

fn listing_text(nft: &Nft) -> String {
    nft.list_table().unwrap().map(|v| v.to_string()).unwrap_or_default()
}

/// Whether a TCP connect from `from` to `to` completes. An accepted SYN
/// completes in well under a millisecond on a veth, so the deadline only
/// bounds the wait for a dropped one: short where a drop is expected.
fn connect_within(from: &Netns, to: SocketAddr, deadline: Duration) -> bool {
    from.within(|| TcpStream::connect_timeout(&to, deadline).is_ok())
}

fn connects(from: &Netns, to: SocketAddr) -> bool {
    connect_within(from, to, Duration::from_secs(5))
}

fn blocked(from: &Netns, to: SocketAddr) -> bool {
    !connect_within(from, to, Duration::from_millis(500))
}

fn listen(ns: &Netns, addr: &str) -> TcpListener {
    ns.within(|| TcpListener::bind(addr).unwrap())
}

#[test]
fn namespace_rules_are_tagged_removed_and_reconciled() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    let (guest_a, guest_b) = (Netns::new(), Netns::new());
    link_guest(&host, &guest_a, "tap-a", "10.99.0.1", "10.99.0.2");
    link_guest(&host, &guest_b, "tap-b", "10.99.0.5", "10.99.0.6");
    dummy(&host, "eth0");
    let nft = Nft::in_namespace(&host.name);
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::new());
    assert!(nft.reconcile(["x"]).unwrap().is_empty(), "reconcile without a table is a no-op");

    let a =
        with_fields!(vm("a", "tap-a", Firewall { host_ports: vec![tcp(7000)], ..Firewall::default() }), uplink: None);
    let b = vm_b(egress_publishing_8080());
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    // Applying again replaces, it does not duplicate.
    nft.apply(&a).unwrap();
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    let listing = listing_text(&nft);
    let tagged = |listing: &str, id: &str| listing.matches(&format!("\"comment\":\"kiln-vm:{id}\"")).count();
    assert_eq!(tagged(&listing, "a"), 3, "tap, one host port, fingerprint: {listing}");
    // b: tap, egress, published (guest side), DNAT address, DNAT port,
    // uplink user, fingerprint.
    assert_eq!(tagged(&listing, "b"), 7, "{listing}");

    // Replacing with another firewall leaves nothing of the old one.
    let a_udp = with_fields!(a.clone(), firewall: Firewall { host_ports: vec![udp(53)], ..Firewall::default() });
    nft.apply(&a_udp).unwrap();
    let listing = listing_text(&nft);
    assert_eq!(tagged(&listing, "a"), 3, "{listing}");
    assert!(!listing.contains("7000") && listing.contains("\"udp\",53"), "{listing}");

    nft.remove(&a_udp).unwrap();
    let listing = listing_text(&nft);
    assert_eq!((tagged(&listing, "a"), tagged(&listing, "b")), (0, 7), "{listing}");
    // Removing again, by rules or by id, is a no-op.
    nft.remove(&a_udp).unwrap();
    nft.remove_vm("a").unwrap();

    nft.apply(&a).unwrap();
    assert_eq!(nft.reconcile(["b"]).unwrap(), ["a"]);
    assert_eq!(nft.reconcile(Vec::<String>::new()).unwrap(), ["b"]);
    let listing = listing_text(&nft);
    assert!(!listing.contains("kiln-vm:") && !listing.contains("tap-"), "VM elements left: {listing}");
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::new());
}

#[test]
fn namespace_traffic_allow_list_and_vm_isolation() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    let (guest_a, guest_b) = (Netns::new(), Netns::new());
    link_guest(&host, &guest_a, "tap-a", "10.99.0.1", "10.99.0.2");
    link_guest(&host, &guest_b, "tap-b", "10.99.0.5", "10.99.0.6");
    dummy(&host, "eth0");
    // The taps forward, as kiln sets them for VMs with egress, so that the
    // control below can pass.
    for tap in ["tap-a", "tap-b"] {
        host.exec(&["sysctl", "-q", "-w", &format!("net.ipv4.conf.{tap}.forwarding=1")]);
    }
    let _allowed = listen(&host, "10.99.0.1:7000");
    let _other = listen(&host, "10.99.0.1:7001");
    let _in_b = listen(&guest_b, "10.99.0.6:80");
    let allowed: SocketAddr = "10.99.0.1:7000".parse().unwrap();
    let other: SocketAddr = "10.99.0.1:7001".parse().unwrap();
    let b_service: SocketAddr = "10.99.0.6:80".parse().unwrap();

    // Control: without rules everything connects, so the drops below are kiln's.
    assert!(connects(&guest_a, allowed) && connects(&guest_a, other) && connects(&guest_a, b_service));

    let nft = Nft::in_namespace(&host.name);
    // VM a may egress through VM b's tap (a contrived uplink), so only VM
    // b's ingress guard, which must run before a's egress accept, keeps a
    // out of b.
    let a_firewall = Firewall { egress: true, host_ports: vec![tcp(7000)], ..Firewall::default() };
    let a = with_fields!(vm("a", "tap-a", a_firewall), uplink: Some("tap-b".to_owned()));
    let b = vm_b(Firewall { egress: true, ..Firewall::default() });
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    assert!(connects(&guest_a, allowed), "allowed host port refused");
    assert!(blocked(&guest_a, other), "host port not on the allow-list connected");
    assert!(blocked(&guest_a, b_service), "VM a reached VM b");
    assert!(blocked(&guest_b, allowed), "VM b reached a host port only VM a may use");

    nft.remove(&a).unwrap();
    assert!(connects(&guest_a, other), "rules of VM a still active after remove");
}

#[test]
fn nft_failure_names_the_command() {
    if !root_tools_ready(&["ip"]) {
        return;
    }
    let host = Netns::new();
    let err = Nft::in_namespace(&format!("{}-absent", host.name)).list_vms().unwrap_err();
    assert!(matches!(err, Error::NftFailed { .. }), "{err}");
    assert!(err.to_string().contains("-absent nft -j list table inet kiln"), "{err}");
}

#[test]
fn namespace_egress_and_published_ports_work_with_forwarding_at_its_default() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    let (guest_a, guest_b, wan) = (Netns::new(), Netns::new(), Netns::new());
    link_guest(&host, &guest_a, "tap-a", "10.99.0.1", "10.99.0.2");
    link_guest(&host, &guest_b, "tap-b", "10.99.0.5", "10.99.0.6");
    link_wan(&host, &wan);
    // A stock host: nothing forwards.
    for ifname in ["all", "uplink0", "tap-a", "tap-b"] {
        assert_eq!(forwarding(&host, ifname), "0", "{ifname} forwards before kiln");
    }
    let outside = listen(&wan, "10.98.0.2:9000");
    let service_b = listen(&guest_b, "10.99.0.6:80");

    let nft = Nft::in_namespace(&host.name);
    let uplink = Some("uplink0".to_owned());
    let a = with_fields!(vm("a", "tap-a", Firewall::default()), uplink: uplink.clone());
    let b = with_fields!(vm_b(egress_publishing_8080()), uplink: uplink);
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();

    let outside_addr: SocketAddr = "10.98.0.2:9000".parse().unwrap();
    assert!(blocked(&guest_a, outside_addr), "egress of VM a is off but it reached the outside");
    assert!(connects(&guest_b, outside_addr), "egress of VM b is on but it cannot reach the outside");
    let (_, seen_from) = outside.accept().unwrap();
    assert_eq!(seen_from.ip().to_string(), "10.98.0.1", "VM b's egress is not masqueraded");

    // Published: host 8080 -> guest b 80, seen with the caller's address.
    assert!(connects(&wan, "10.98.0.1:8080".parse().unwrap()), "published port 8080 not forwarded");
    let (_, seen_from) = service_b.accept().unwrap();
    assert_eq!(seen_from.ip().to_string(), "10.98.0.2");
    // The guest port itself is not reachable without the DNAT.
    ip(&["-n", &wan.name, "route", "add", "10.99.0.0/16", "via", "10.98.0.1"]);
    assert!(blocked(&wan, "10.99.0.6:80".parse().unwrap()), "guest port reachable without publishing");
    // kiln set the two flags it needs, never `ip_forward`.
    assert_eq!(
        ["all", "uplink0", "tap-a", "tap-b"].map(|ifname| forwarding(&host, ifname)),
        ["0", "1", "0", "1"],
        "forwarding of all, uplink0, tap-a (no egress), tap-b"
    );

    // Once b is gone the uplink is back to 0, and b's egress with it.
    nft.remove(&b).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "0", "uplink0 still forwards after its last VM");
    // Turning a's egress on turns it on again.
    nft.apply(&with_fields!(a, firewall: egress_publishing_8080())).unwrap();
    assert!(connects(&guest_a, outside_addr), "egress of VM a, now on, cannot reach the outside");
}

#[test]
fn namespace_conflicts_name_the_holder_and_change_nothing() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    for link in ["tap-a", "tap-c", "eth0"] {
        dummy(&host, link);
    }
    let nft = Nft::in_namespace(&host.name);
    let published = |host_port| Firewall {
        published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port, guest_port: 80 }],
        ..Firewall::default()
    };
    let a = vm("a", "tap-a", published(8080));
    nft.apply(&a).unwrap();
    let before = listing_text(&nft);

    let same_tap = vm("b", "tap-a", Firewall::default());
    let err = nft.apply(&same_tap).unwrap_err();
    assert!(matches!(err, Error::NftConflict { .. }), "{err:?}");
    assert_eq!(err.to_string(), "VM `b` cannot use tap `tap-a`: VM `a` holds it");

    let same_port = vm("c", "tap-c", published(8080));
    let err = nft.apply(&same_port).unwrap_err();
    assert_eq!(err.to_string(), "VM `c` cannot use host port tcp/8080: VM `a` holds it");
    assert_eq!(listing_text(&nft), before, "a refused apply changed the table");

    // Once a is gone, the port is free.
    nft.remove(&a).unwrap();
    nft.apply(&same_port).unwrap();
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::from(["c".to_owned()]));
}

#[test]
fn namespace_traffic_udp_host_port() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    let guest = Netns::new();
    link_guest(&host, &guest, "tap-a", "10.99.0.1", "10.99.0.2");
    let bind = |addr: &str| {
        host.within(|| {
            let socket = UdpSocket::bind(addr).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            socket
        })
    };
    let (allowed, other) = (bind("10.99.0.1:5353"), bind("10.99.0.1:5354"));
    let send = |to: &str| guest.within(|| UdpSocket::bind("10.99.0.2:0").unwrap().send_to(b"ping", to).unwrap());
    let received = |socket: &UdpSocket| socket.recv(&mut [0; 16]).is_ok();
    // Control: without rules both arrive.
    send("10.99.0.1:5353");
    send("10.99.0.1:5354");
    assert!(received(&allowed) && received(&other));

    let nft = Nft::in_namespace(&host.name);
    nft.apply(&vm("a", "tap-a", Firewall { host_ports: vec![udp(5353)], ..Firewall::default() })).unwrap();
    send("10.99.0.1:5353");
    send("10.99.0.1:5354");
    assert!(received(&allowed), "allowed UDP host port dropped");
    assert!(!received(&other), "UDP host port not on the allow-list reached");
}

#[test]
fn namespace_published_port_from_the_host_itself() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let (host, guest, lan) = (Netns::new(), Netns::new(), Netns::new());
    link_guest(&host, &guest, "tap-a", "10.99.0.1", "10.99.0.2");
    // A second host address, standing in for the host's LAN address.
    ip(&["-n", &host.name, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", &lan.name]);
    ip(&["-n", &host.name, "addr", "add", "10.98.0.1/24", "dev", "uplink0"]);
    ip(&["-n", &host.name, "link", "set", "uplink0", "up"]);
    let service = listen(&guest, "10.99.0.2:80");
    let nft = Nft::in_namespace(&host.name);
    let published = PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 };
    let firewall = Firewall { published_ports: vec![published], ..Firewall::default() };
    nft.apply(&with_fields!(vm("a", "tap-a", firewall), uplink: Some("uplink0".to_owned()))).unwrap();

    assert!(connects(&host, "10.98.0.1:8080".parse().unwrap()), "host to its own address:8080 not forwarded");
    let (_, seen_from) = service.accept().unwrap();
    assert_eq!(seen_from.ip().to_string(), "10.98.0.1");

    // Loopback needs route_localnet on the tap; the guest then sees the tap address.
    host.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.tap-a.route_localnet=1"]);
    assert!(connects(&host, "127.0.0.1:8080".parse().unwrap()), "host to 127.0.0.1:8080 not forwarded");
    let (_, seen_from) = service.accept().unwrap();
    assert_eq!(seen_from.ip().to_string(), "10.99.0.1");
}

#[test]
fn nft_missing_names_the_package() {
    let err = Nft::with_command(["nft-kiln-test-absent"]).list_vms().unwrap_err();
    assert!(matches!(err, Error::NftMissing), "{err:?}");
    assert_eq!(err.to_string(), "`nft` was not found; install the Debian package `nftables`");
}

#[test]
fn nft_without_cap_net_admin_is_not_permitted() {
    if !root_tools_ready(&["nft", "ip", "setpriv"]) {
        return;
    }
    let host = Netns::new();
    // nobody, with no capabilities, inside a throwaway namespace.
    let nft = Nft::with_command([
        "ip",
        "netns",
        "exec",
        &host.name,
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "nft",
    ]);
    // Listing, not applying: nft reads a batch from /dev/stdin, which
    // nobody may not reopen, so `apply` would fail before reaching netlink.
    let err = nft.list_vms().unwrap_err();
    assert!(matches!(err, Error::NftNotPermitted { .. }), "{err:?}");
    assert!(err.to_string().contains("needs CAP_NET_ADMIN"), "{err}");
}

#[test]
fn namespace_vm_lifecycle_with_a_real_tap_leaves_nothing() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    dummy(&host, "uplink0");
    let nft = Nft::in_namespace(&host.name);
    let pool = kiln_net::LeasePool::new("10.97.0.0/24".parse().unwrap(), 30).unwrap();
    let lease = pool.allocate("life").unwrap();
    let tap = kiln_net::tap_name("life").unwrap();
    host.within(|| {
        kiln_net::Tap::create(&tap, Some(4242))?;
        let config = kiln_net::TapConfig::new(lease.host_addr(), lease.subnet().prefix_len())
            .with_mtu(None)
            .with_route_localnet(true);
        kiln_net::Tap::configure(&tap, &config)
    })
    .unwrap();
    let rules = VmRules::new("life".to_owned(), tap.clone(), lease.host_addr(), lease.guest_addr())
        .with_uplink(Some("uplink0".to_owned()))
        .with_firewall(Firewall {
            egress: true,
            host_ports: vec![tcp(7000)],
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8443, guest_port: 443 }],
        });
    nft.apply(&rules).unwrap();
    assert!(listing_text(&nft).contains(&format!("\"{tap}\"")));
    assert_eq!([&tap, "uplink0"].map(|ifname| forwarding(&host, ifname)), ["1", "1"]);

    // Crash recovery: nothing is alive any more.
    assert_eq!(nft.reconcile(Vec::<String>::new()).unwrap(), ["life"]);
    host.within(|| kiln_net::Tap::delete(&tap)).unwrap();
    drop(lease);
    let listing = listing_text(&nft);
    assert!(!listing.contains("kiln-vm:") && !listing.contains(&tap), "{listing}");
    assert!(host.link(&tap).is_none(), "tap {tap} still exists");
    assert_eq!(forwarding(&host, "uplink0"), "0", "reconcile left the uplink forwarding");
    assert_eq!(pool.leased(), 0);
}

#[test]
fn nft_runs_in_the_c_locale() {
    // A fake nft that reports its locale as a listing: kiln parses nft's
    // error text, so the caller's LANG (C.UTF-8 or any other) must not reach it.
    let script = r#"printf '{"nftables": [{"set": {"table": "kiln", "name": "%s|%s|%s"}}]}' "${LC_ALL-unset}" "${LANG-unset}" "${LANGUAGE-unset}""#;
    let listing = Nft::with_command(["sh", "-c", script, "fake-nft"]).list_table().unwrap().unwrap();
    assert_eq!(listing["nftables"][0]["set"]["name"], "C|unset|unset", "{listing}");
}

/// An egress VM and a published-only VM on `uplink0`, taps `tap-a`, `tap-b`.
fn uplink_vms() -> (VmRules, VmRules) {
    let uplink = Some("uplink0".to_owned());
    let a = with_fields!(vm("a", "tap-a", Firewall { egress: true, ..Firewall::default() }), uplink: uplink.clone());
    let published = PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 };
    let b = with_fields!(vm_b(Firewall { published_ports: vec![published], ..Firewall::default() }), uplink: uplink);
    (a, b)
}

#[test]
fn namespace_uplink_forwarding_is_restored_when_its_last_vm_goes() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    for link in ["tap-a", "tap-b", "tap-c", "uplink0"] {
        dummy(&host, link);
    }
    let nft = Nft::in_namespace(&host.name);
    let (a, b) = uplink_vms();
    let flags = || ["all", "uplink0", "tap-a", "tap-b"].map(|ifname| forwarding(&host, ifname));

    // A VM that forwards nothing turns nothing on.
    let c = with_fields!(vm("c", "tap-c", Firewall::default()), uplink: Some("uplink0".to_owned()));
    nft.apply(&c).unwrap();
    assert_eq!(flags(), ["0", "0", "0", "0"]);

    // remove: the uplink stays on while b needs it, then goes back to 0.
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    assert_eq!(flags(), ["0", "1", "1", "1"]);
    nft.remove(&a).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "1", "removing a turned off the forwarding b needs");
    nft.remove(&b).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "0", "remove of the last VM left the uplink forwarding");

    // remove_vm (kiln gc after a SIGKILLed launcher), the same.
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    assert!(nft.remove_vm("b").unwrap());
    assert_eq!(forwarding(&host, "uplink0"), "1", "remove_vm of b turned off the forwarding a needs");
    assert!(nft.remove_vm("a").unwrap());
    assert_eq!(forwarding(&host, "uplink0"), "0", "remove_vm of the last VM left the uplink forwarding");

    // reconcile: kept for the living, restored once none needs it.
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    assert_eq!(nft.reconcile(["b", "c"]).unwrap(), ["a"]);
    assert_eq!(forwarding(&host, "uplink0"), "1", "reconcile turned off the forwarding b needs");
    assert_eq!(nft.reconcile(["c"]).unwrap(), ["b"]);
    assert_eq!(forwarding(&host, "uplink0"), "0", "reconcile left the uplink forwarding");
    // Nothing records forwarding any more, and ip_forward was never touched.
    let listing = listing_text(&nft);
    assert!(!listing.contains("uplink0"), "{listing}");
    assert_eq!(forwarding(&host, "all"), "0");
}

#[test]
fn namespace_uplink_forwarding_kiln_turned_on_serves_vms_only_and_the_admins_is_left_on() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let (host, wan, lan) = (Netns::new(), Netns::new(), Netns::new());
    link_wan(&host, &wan);
    // A second network behind the host, which the admin routes from.
    ip(&["-n", &host.name, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &lan.name]);
    ip(&["-n", &host.name, "addr", "add", "10.97.0.1/24", "dev", "lan0"]);
    ip(&["-n", &host.name, "link", "set", "lan0", "up"]);
    ip(&["-n", &lan.name, "addr", "add", "10.97.0.2/24", "dev", "eth0"]);
    ip(&["-n", &lan.name, "link", "set", "eth0", "up"]);
    ip(&["-n", &lan.name, "route", "add", "default", "via", "10.97.0.1"]);
    ip(&["-n", &wan.name, "route", "add", "10.97.0.0/24", "via", "10.98.0.1"]);
    host.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.lan0.forwarding=1"]);
    dummy(&host, "tap-a");
    let _server = listen(&lan, "10.97.0.2:9000");
    let lan_server: SocketAddr = "10.97.0.2:9000".parse().unwrap();
    let nft = Nft::in_namespace(&host.name);
    let (a, _) = uplink_vms();
    let a = with_fields!(a, host_addr: Ipv4Addr::new(10, 99, 0, 1));

    // kiln turns uplink0's forwarding on for VM a, not for the host's other networks.
    nft.apply(&a).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "1");
    assert!(blocked(&wan, lan_server), "the uplink routes for its neighbours since kiln turned forwarding on");
    nft.remove(&a).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "0");

    // The admin's forwarding: kiln neither filters it nor turns it off.
    host.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.uplink0.forwarding=1"]);
    assert!(connects(&wan, lan_server), "control: the admin's routing does not work");
    nft.apply(&a).unwrap();
    assert!(connects(&wan, lan_server), "kiln filtered routing the admin had turned on");
    nft.remove(&a).unwrap();
    assert_eq!(forwarding(&host, "uplink0"), "1", "remove turned off the admin's forwarding");
    nft.apply(&a).unwrap();
    assert!(nft.remove_vm("a").unwrap());
    nft.apply(&a).unwrap();
    assert_eq!(nft.reconcile(Vec::<String>::new()).unwrap(), ["a"]);
    assert_eq!(forwarding(&host, "uplink0"), "1", "remove_vm or reconcile turned off the admin's forwarding");
}

#[test]
fn namespace_release_by_key_never_deletes_another_vms_element() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    for link in ["tap-a", "tap-b", "eth0"] {
        dummy(&host, link);
    }
    let nft = Nft::in_namespace(&host.name);
    let listing_of = |id: &str| {
        let listing = listing_text(&nft);
        listing.matches(&format!("\"comment\":\"kiln-vm:{id}\"")).count()
    };
    let publishing = |host_port| Firewall {
        published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port, guest_port: 80 }],
        ..Firewall::default()
    };

    // a's record goes stale: gc removed a, then b took every one of its keys
    // (its tap name, guest address and host port) under another id.
    let a = vm("a", "tap-a", publishing(8080));
    nft.apply(&a).unwrap();
    assert!(nft.remove_vm("a").unwrap());
    let b = with_fields!(a.clone(), vm_id: "b".to_owned());
    nft.apply(&b).unwrap();
    let b_elements = listing_of("b");
    nft.remove(&a).unwrap();
    assert_eq!(listing_of("b"), b_elements, "a's stale removal deleted b's elements");
    nft.remove(&b).unwrap();

    // a was replaced (it now publishes 9090), and b took a's old host port
    // 8080: a's removal with its first rules must not delete b's DNAT.
    nft.apply(&a).unwrap();
    let a_now = vm("a", "tap-a", publishing(9090));
    nft.apply(&a_now).unwrap();
    let b = vm_b(publishing(8080));
    nft.apply(&b).unwrap();
    let b_elements = listing_of("b");
    nft.remove(&a).unwrap();
    assert_eq!(listing_of("b"), b_elements, "a's removal with stale rules deleted b's elements");
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::from(["b".to_owned()]), "a's elements are left");
}

#[test]
fn namespace_apply_needs_the_interfaces_it_forwards_on_and_changes_nothing_without_them() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    dummy(&host, "tap-a");
    let nft = Nft::in_namespace(&host.name);
    let (a, _) = uplink_vms();
    let err = nft.apply(&a).unwrap_err();
    assert!(matches!(err, Error::InterfaceMissing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "Interface `uplink0` (the uplink of VM `a`) does not exist, so kiln cannot enable IPv4 forwarding on it"
    );
    let err = nft.apply(&with_fields!(a.clone(), tap: "tap-x".to_owned())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Interface `tap-x` (the tap of VM `a`) does not exist, so kiln cannot enable IPv4 forwarding on it"
    );
    let err = nft.apply(&with_fields!(a, uplink: None)).unwrap_err();
    assert!(matches!(err, Error::EgressWithoutUplink { .. }), "{err:?}");
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::new());
    assert_eq!(forwarding(&host, "tap-a"), "0");
}

#[test]
fn namespace_concurrent_applies_and_removes_keep_forwarding_for_live_vms() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    dummy(&host, "uplink0");
    let taps: Vec<String> = (0..4).map(|n| format!("tap-{n}")).collect();
    for tap in &taps {
        dummy(&host, tap);
    }
    // Each thread stands for a launcher: apply, check its egress is
    // forwarded, remove. Without the lock one thread's release sees no other
    // user and turns the uplink off under another thread's fresh VM.
    std::thread::scope(|scope| {
        for (n, tap) in taps.iter().enumerate() {
            let host = &host;
            scope.spawn(move || {
                let nft = Nft::in_namespace(&host.name);
                let firewall = Firewall { egress: true, ..Firewall::default() };
                let rules = with_fields!(
                    vm(&format!("vm{n}"), tap, firewall),
                    uplink: Some("uplink0".to_owned()),
                    host_addr: Ipv4Addr::new(10, 99, n as u8, 1),
                    guest_addr: Ipv4Addr::new(10, 99, n as u8, 2),
                );
                for round in 0..6 {
                    nft.apply(&rules).unwrap();
                    assert_eq!(forwarding(host, "uplink0"), "1", "vm{n} round {round}: its uplink does not forward");
                    nft.remove(&rules).unwrap();
                }
            });
        }
    });
    assert_eq!(forwarding(&host, "uplink0"), "0");
}
