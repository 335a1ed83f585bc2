//! nftables rules: the JSON batches (pure, expect-tests) and, as root, the
//! rules applied inside throwaway network namespaces with real TCP traffic.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use expect_test::{Expect, expect};
use kiln_net::{Error, Firewall, HostPort, Nft, Protocol, PublishedPort, VmRules, removal_batch};
use serde_json::{Value, json};

use crate::netns::{Netns, ip, root_tools_ready};

fn vm(id: &str, tap: &str, firewall: Firewall) -> VmRules {
    VmRules {
        vm_id: id.to_owned(),
        tap: tap.to_owned(),
        uplink: Some("eth0".to_owned()),
        host_addr: Ipv4Addr::new(10, 99, 0, 1),
        guest_addr: Ipv4Addr::new(10, 99, 0, 2),
        firewall,
    }
}

/// One command per line, so a diff shows which rule changed.
fn render(batch: &Value) -> String {
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

#[test]
fn batch_deny_all() {
    check(
        vm("a", "tap-a", Firewall::default()),
        expect![[r#"
            {"add":{"table":{"family":"inet","name":"kiln"}}}
            {"add":{"chain":{"family":"inet","hook":"input","name":"input","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"prerouting","name":"prerouting","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","hook":"postrouting","name":"postrouting","policy":"accept","prio":100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","name":"vm-a-host","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-a-egress","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-a-ingress","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-host","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-host","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-egress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-egress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-ingress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-a-ingress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"input","comment":"kiln-vm:a","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-a"}},{"jump":{"target":"vm-a-host"}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"forward","comment":"kiln-vm:a","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-a"}},{"jump":{"target":"vm-a-egress"}}],"family":"inet","table":"kiln"}}}
            {"insert":{"rule":{"chain":"forward","comment":"kiln-vm:a","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"tap-a"}},{"jump":{"target":"vm-a-ingress"}}],"family":"inet","table":"kiln"}}}
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
            {"add":{"table":{"family":"inet","name":"kiln"}}}
            {"add":{"chain":{"family":"inet","hook":"input","name":"input","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"prerouting","name":"prerouting","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","hook":"postrouting","name":"postrouting","policy":"accept","prio":100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","name":"vm-web-1-host","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-web-1-egress","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-web-1-ingress","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-host","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-host","expr":[{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":"10.99.0.1"}},{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":7000}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-host","expr":[{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":"10.99.0.1"}},{"match":{"left":{"payload":{"field":"dport","protocol":"udp"}},"op":"==","right":53}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-host","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-egress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-egress","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"eth0"}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-egress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-ingress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-web-1-ingress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"input","comment":"kiln-vm:web-1","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-web1"}},{"jump":{"target":"vm-web-1-host"}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"forward","comment":"kiln-vm:web-1","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-web1"}},{"jump":{"target":"vm-web-1-egress"}}],"family":"inet","table":"kiln"}}}
            {"insert":{"rule":{"chain":"forward","comment":"kiln-vm:web-1","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"tap-web1"}},{"jump":{"target":"vm-web-1-ingress"}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"postrouting","comment":"kiln-vm:web-1","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-web1"}},{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"eth0"}},{"masquerade":null}],"family":"inet","table":"kiln"}}}
        "#]],
    );
}

#[test]
fn batch_published_port_egress_without_uplink() {
    let firewall = Firewall {
        egress: true,
        host_ports: vec![],
        published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
    };
    check(
        VmRules { uplink: None, ..vm("db", "tap-db", firewall) },
        expect![[r#"
            {"add":{"table":{"family":"inet","name":"kiln"}}}
            {"add":{"chain":{"family":"inet","hook":"input","name":"input","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"forward","name":"forward","policy":"accept","prio":0,"table":"kiln","type":"filter"}}}
            {"add":{"chain":{"family":"inet","hook":"prerouting","name":"prerouting","policy":"accept","prio":-100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","hook":"postrouting","name":"postrouting","policy":"accept","prio":100,"table":"kiln","type":"nat"}}}
            {"add":{"chain":{"family":"inet","name":"vm-db-host","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-db-egress","table":"kiln"}}}
            {"add":{"chain":{"family":"inet","name":"vm-db-ingress","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-host","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-host","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-egress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-egress","expr":[{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-egress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-ingress","expr":[{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-ingress","expr":[{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":"10.99.0.2"}},{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":80}},{"match":{"left":{"ct":{"key":"status"}},"op":"in","right":"dnat"}},{"accept":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"vm-db-ingress","expr":[{"drop":null}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"input","comment":"kiln-vm:db","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-db"}},{"jump":{"target":"vm-db-host"}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"forward","comment":"kiln-vm:db","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-db"}},{"jump":{"target":"vm-db-egress"}}],"family":"inet","table":"kiln"}}}
            {"insert":{"rule":{"chain":"forward","comment":"kiln-vm:db","expr":[{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"tap-db"}},{"jump":{"target":"vm-db-ingress"}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"prerouting","comment":"kiln-vm:db","expr":[{"match":{"left":{"meta":{"key":"nfproto"}},"op":"==","right":"ipv4"}},{"match":{"left":{"fib":{"flags":["daddr"],"result":"type"}},"op":"==","right":"local"}},{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":8080}},{"dnat":{"addr":"10.99.0.2","family":"ip","port":80}}],"family":"inet","table":"kiln"}}}
            {"add":{"rule":{"chain":"postrouting","comment":"kiln-vm:db","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"tap-db"}},{"masquerade":null}],"family":"inet","table":"kiln"}}}
        "#]],
    );
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
        VmRules { uplink: Some("tap-a".into()), ..vm("a", "tap-a", Firewall::default()) },
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
fn removal_batch_deletes_tagged_rules_by_handle_and_vm_chains() {
    // Shaped like `nft -j list table inet kiln` output.
    let listing = json!({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "kiln", "handle": 1}},
        {"chain": {"family": "inet", "table": "kiln", "name": "forward", "handle": 2}},
        {"chain": {"family": "inet", "table": "kiln", "name": "vm-a-egress", "handle": 3}},
        {"chain": {"family": "inet", "table": "kiln", "name": "vm-a-ingress", "handle": 4}},
        {"chain": {"family": "inet", "table": "kiln", "name": "vm-b-c-host", "handle": 5}},
        {"chain": {"family": "inet", "table": "kiln", "name": "vm-Not_Ours", "handle": 6}},
        {"rule": {"family": "inet", "table": "kiln", "chain": "forward", "handle": 10, "comment": "kiln-vm:a", "expr": []}},
        {"rule": {"family": "inet", "table": "kiln", "chain": "forward", "handle": 11, "comment": "kiln-vm:b-c", "expr": []}},
        {"rule": {"family": "inet", "table": "kiln", "chain": "forward", "handle": 12, "comment": "someone else", "expr": []}},
        {"rule": {"family": "inet", "table": "kiln", "chain": "vm-a-egress", "handle": 13, "expr": []}},
    ]});
    let (batch, removed) = removal_batch(&listing, |id| id == "a").unwrap();
    assert_eq!(removed, ["a"]);
    expect![[r#"
        {"delete":{"rule":{"chain":"forward","expr":[],"family":"inet","handle":10,"table":"kiln"}}}
        {"flush":{"chain":{"family":"inet","name":"vm-a-egress","table":"kiln"}}}
        {"flush":{"chain":{"family":"inet","name":"vm-a-ingress","table":"kiln"}}}
        {"delete":{"chain":{"family":"inet","name":"vm-a-egress","table":"kiln"}}}
        {"delete":{"chain":{"family":"inet","name":"vm-a-ingress","table":"kiln"}}}
    "#]]
    .assert_eq(&render(&batch));
    let (batch, removed) = removal_batch(&listing, |_| true).unwrap();
    assert_eq!(removed, ["a", "b-c"]);
    // a: 1 rule, 2 flushes, 2 chain deletes; b-c: 1 rule, 1 flush, 1 chain delete.
    assert_eq!(batch["nftables"].as_array().unwrap().len(), 5 + 3);
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
    let nft = Nft::in_namespace(&host.name);
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::new());
    assert!(nft.reconcile(["x"]).unwrap().is_empty(), "reconcile without a table is a no-op");

    let a =
        VmRules { uplink: None, ..vm("a", "tap-a", Firewall { host_ports: vec![tcp(7000)], ..Firewall::default() }) };
    let b = VmRules {
        host_addr: Ipv4Addr::new(10, 99, 0, 5),
        guest_addr: Ipv4Addr::new(10, 99, 0, 6),
        firewall: Firewall {
            egress: true,
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
            ..Firewall::default()
        },
        ..vm("b", "tap-b", Firewall::default())
    };
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    // Applying again replaces, it does not duplicate.
    nft.apply(&a).unwrap();
    assert_eq!(nft.list_vms().unwrap(), BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    let listing = listing_text(&nft);
    for needle in ["\"comment\":\"kiln-vm:a\"", "\"comment\":\"kiln-vm:b\"", "vm-a-host", "vm-b-ingress"] {
        assert!(listing.contains(needle), "{needle} missing from {listing}");
    }
    let tagged_a = listing.matches("\"comment\":\"kiln-vm:a\"").count();
    assert_eq!(tagged_a, 3, "input jump, forward egress jump, forward ingress jump: {listing}");

    nft.remove("a").unwrap();
    let listing = listing_text(&nft);
    assert!(!listing.contains("kiln-vm:a\"") && !listing.contains("vm-a-"), "VM a left behind: {listing}");
    assert!(listing.contains("kiln-vm:b\""), "VM b lost: {listing}");
    nft.remove("a").unwrap();

    nft.apply(&a).unwrap();
    assert_eq!(nft.reconcile(["b"]).unwrap(), ["a"]);
    assert_eq!(nft.reconcile(Vec::<String>::new()).unwrap(), ["b"]);
    let listing = listing_text(&nft);
    assert!(!listing.contains("kiln-vm:") && !listing.contains("\"vm-"), "VM rules left: {listing}");
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
    host.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let _allowed = listen(&host, "10.99.0.1:7000");
    let _other = listen(&host, "10.99.0.1:7001");
    let _in_b = listen(&guest_b, "10.99.0.6:80");
    let allowed: SocketAddr = "10.99.0.1:7000".parse().unwrap();
    let other: SocketAddr = "10.99.0.1:7001".parse().unwrap();
    let b_service: SocketAddr = "10.99.0.6:80".parse().unwrap();

    // Control: without rules everything connects, so the drops below are kiln's.
    assert!(connects(&guest_a, allowed) && connects(&guest_a, other) && connects(&guest_a, b_service));

    let nft = Nft::in_namespace(&host.name);
    // VM a may egress anywhere (no uplink given), so only VM b's ingress
    // guard, which must run before a's egress accept, keeps a out of b.
    let a_firewall = Firewall { egress: true, host_ports: vec![tcp(7000)], ..Firewall::default() };
    let a = VmRules { uplink: None, ..vm("a", "tap-a", a_firewall) };
    let b = VmRules {
        host_addr: Ipv4Addr::new(10, 99, 0, 5),
        guest_addr: Ipv4Addr::new(10, 99, 0, 6),
        firewall: Firewall { egress: true, ..Firewall::default() },
        ..vm("b", "tap-b", Firewall::default())
    };
    nft.apply(&a).unwrap();
    nft.apply(&b).unwrap();
    assert!(connects(&guest_a, allowed), "allowed host port refused");
    assert!(blocked(&guest_a, other), "host port not on the allow-list connected");
    assert!(blocked(&guest_a, b_service), "VM a reached VM b");
    assert!(blocked(&guest_b, allowed), "VM b reached a host port only VM a may use");

    nft.remove("a").unwrap();
    assert!(connects(&guest_a, other), "rules of VM a still active after remove");
}

#[test]
fn nft_failure_names_the_command() {
    if !kiln_testkit::is_root() || kiln_testkit::find_tool("ip").is_none() {
        kiln_testkit::report_skip("nft_failure_names_the_command: needs root and `ip`");
        return;
    }
    let host = Netns::new();
    let err = Nft::in_namespace(&format!("{}-absent", host.name)).list_vms().unwrap_err();
    assert!(matches!(err, Error::NftFailed { .. }), "{err}");
    assert!(err.to_string().contains("-absent nft -j list table inet kiln"), "{err}");
}

#[test]
fn namespace_traffic_egress_masquerade_and_published_port() {
    if !root_tools_ready(&["nft", "ip"]) {
        return;
    }
    let host = Netns::new();
    let (guest_a, guest_b, wan) = (Netns::new(), Netns::new(), Netns::new());
    link_guest(&host, &guest_a, "tap-a", "10.99.0.1", "10.99.0.2");
    link_guest(&host, &guest_b, "tap-b", "10.99.0.5", "10.99.0.6");
    // The "outside": an uplink to a namespace with no route back to the
    // guests except through the host, so only masquerade makes replies work.
    ip(&["-n", &host.name, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", &wan.name]);
    ip(&["-n", &host.name, "addr", "add", "10.98.0.1/24", "dev", "uplink0"]);
    ip(&["-n", &host.name, "link", "set", "uplink0", "up"]);
    ip(&["-n", &wan.name, "addr", "add", "10.98.0.2/24", "dev", "eth0"]);
    ip(&["-n", &wan.name, "link", "set", "eth0", "up"]);
    host.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let outside = listen(&wan, "10.98.0.2:9000");
    let service_b = listen(&guest_b, "10.99.0.6:80");

    let nft = Nft::in_namespace(&host.name);
    let uplink = Some("uplink0".to_owned());
    let a = VmRules { uplink: uplink.clone(), ..vm("a", "tap-a", Firewall::default()) };
    let b = VmRules {
        uplink,
        host_addr: Ipv4Addr::new(10, 99, 0, 5),
        guest_addr: Ipv4Addr::new(10, 99, 0, 6),
        firewall: Firewall {
            egress: true,
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
            ..Firewall::default()
        },
        ..vm("b", "tap-b", Firewall::default())
    };
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
}
