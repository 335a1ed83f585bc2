//! The fixed part of kiln's table: the table, its chains, sets and maps, and
//! the rules that read the sets. Written once, when the table is created
//! (and rewritten by [`setup_batch`], which is idempotent); no VM changes it.

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Fib, FibFlag, FibResult, Map as MapLookup, Meta, MetaKey, NamedExpression, Payload, PayloadField,
};
use nftables::schema::{Chain, FlushObject, Map, NfListObject, Rule, Set, SetType, SetTypeValue, Table};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfHook};
use serde_json::Value;

use super::{
    DNAT_ADDR, DNAT_PORT, EGRESS_VIA, FAMILY, FINGERPRINTS, FORWARDING_BY_KILN, FROM_VM, FROM_VM_TO_HOST, HOST_PORTS,
    PUBLISHED, TABLE, TO_VM, UPLINK_USERS, VM_TAPS,
};
use crate::{Error, Result};

fn chain(name: &str) -> Chain<'static> {
    Chain { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..Chain::default() }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain { _type: Some(kind), hook: Some(hook), prio: Some(prio), policy: Some(NfChainPolicy::Accept), ..chain(name) }
}

fn set(name: &'static str, types: &[SetType]) -> Set<'static> {
    let set_type = match types {
        [one] => SetTypeValue::Single(*one),
        many => SetTypeValue::Concatenated(many.to_vec().into()),
    };
    Set { family: FAMILY, table: TABLE.into(), name: name.into(), set_type, ..Set::default() }
}

fn map(name: &'static str, key: &[SetType], data: SetType) -> Map<'static> {
    Map {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        set_type: SetTypeValue::Concatenated(key.to_vec().into()),
        map: SetTypeValue::Single(data),
        ..Map::default()
    }
}

fn rule(chain: &str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule { family: FAMILY, table: TABLE.into(), chain: chain.to_owned().into(), expr: expr.into(), ..Rule::default() }
}

fn matches(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn string(value: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(value.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.to_owned().into(),
        field: field.to_owned().into(),
    })))
}

fn concat_expr(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// `<left> @<set>`: a lookup in one of kiln's sets.
fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    matches(left, string(format!("@{set}")), Operator::EQ)
}

fn ct_is(key: &str, values: &[&str]) -> Statement<'static> {
    let left = Expression::Named(NamedExpression::CT(CT { key: key.to_owned().into(), ..CT::default() }));
    let right = match values {
        [one] => string(*one),
        many => Expression::List(many.iter().map(|v| string(*v)).collect()),
    };
    matches(left, right, Operator::IN)
}

fn jump(target: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: target.to_owned().into() })
}

/// `meta l4proto . th dport`: the key of the DNAT maps.
fn l4_dport() -> Vec<Expression<'static>> {
    vec![meta(MetaKey::L4proto), payload("th", "dport")]
}

/// `meta nfproto ipv4 fib daddr type local dnat ip to <map lookups>`.
fn dnat_published() -> Vec<Statement<'static>> {
    let lookup = |map: &str| {
        Expression::Named(NamedExpression::Map(Box::new(MapLookup {
            key: concat_expr(l4_dport()),
            data: string(format!("@{map}")),
        })))
    };
    let local = matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([FibFlag::Daddr]),
        })),
        string("local"),
        Operator::EQ,
    );
    vec![
        matches(meta(MetaKey::Nfproto), string("ipv4"), Operator::EQ),
        local,
        Statement::DNAT(Some(NAT {
            addr: Some(lookup(DNAT_ADDR)),
            family: Some(NATFamily::IP),
            port: Some(lookup(DNAT_PORT)),
            flags: None,
        })),
    ]
}

/// The batch that creates kiln's table, chains and sets if missing and
/// (re)writes its fixed rules, atomically. It is idempotent.
pub fn setup_batch() -> Result<Value> {
    use SetType::{Ifname, InetProto, InetService, Ipv4Addr as Addr};
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table { family: FAMILY, name: TABLE.into(), handle: None }));
    let base = [
        base_chain("input", NfChainType::Filter, NfHook::Input, 0),
        base_chain("forward", NfChainType::Filter, NfHook::Forward, 0),
        base_chain("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
        base_chain("output", NfChainType::NAT, NfHook::Output, -100),
        base_chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ];
    let regular = [chain(FROM_VM_TO_HOST), chain(FROM_VM), chain(TO_VM)];
    for chain in base.iter().chain(&regular) {
        batch.add(NfListObject::Chain(chain.clone()));
    }
    let port_key = [Ifname, Addr, InetProto, InetService];
    for set in [
        set(VM_TAPS, &[Ifname]),
        set(HOST_PORTS, &port_key),
        set(EGRESS_VIA, &[Ifname, Ifname]),
        set(PUBLISHED, &port_key),
        set(UPLINK_USERS, &[Ifname, Ifname]),
        set(FINGERPRINTS, &[Ifname]),
        set(FORWARDING_BY_KILN, &[Ifname]),
    ] {
        batch.add(NfListObject::Set(Box::new(set)));
    }
    batch.add(NfListObject::Map(Box::new(map(DNAT_ADDR, &[InetProto, InetService], Addr))));
    batch.add(NfListObject::Map(Box::new(map(DNAT_PORT, &[InetProto, InetService], InetService))));
    for chain in base.iter().chain(&regular) {
        batch.add_cmd(nftables::schema::NfCmd::Flush(FlushObject::Chain(chain.clone())));
    }

    let established = || ct_is("state", &["established", "related"]);
    let accept = || Statement::Accept(None);
    let iif = || meta(MetaKey::Iifname);
    let oif = || meta(MetaKey::Oifname);
    let port_of = |ifname: Expression<'static>, addr: &str| {
        let mut parts = vec![ifname, payload("ip", addr)];
        parts.extend(l4_dport());
        concat_expr(parts)
    };
    let rules = [
        rule("input", vec![in_set(iif(), VM_TAPS), jump(FROM_VM_TO_HOST)]),
        rule(FROM_VM_TO_HOST, vec![established(), accept()]),
        rule(FROM_VM_TO_HOST, vec![in_set(port_of(iif(), "daddr"), HOST_PORTS), accept()]),
        rule(FROM_VM_TO_HOST, vec![Statement::Drop(None)]),
        // To a VM first: its guard runs before any VM's egress accept.
        rule("forward", vec![in_set(oif(), VM_TAPS), jump(TO_VM)]),
        rule("forward", vec![in_set(iif(), VM_TAPS), jump(FROM_VM)]),
        // Where kiln turned forwarding on, the host forwards for its VMs
        // only: it did not route between its other networks before.
        rule("forward", vec![in_set(iif(), FORWARDING_BY_KILN), Statement::Drop(None)]),
        rule(TO_VM, vec![established(), accept()]),
        rule(TO_VM, vec![ct_is("status", &["dnat"]), in_set(port_of(oif(), "daddr"), PUBLISHED), accept()]),
        rule(TO_VM, vec![Statement::Drop(None)]),
        rule(FROM_VM, vec![established(), accept()]),
        rule(FROM_VM, vec![in_set(concat_expr(vec![iif(), oif()]), EGRESS_VIA), accept()]),
        rule(FROM_VM, vec![Statement::Drop(None)]),
        rule("prerouting", dnat_published()),
        // The host's own connections to a published port.
        rule("output", dnat_published()),
        rule("postrouting", vec![in_set(concat_expr(vec![iif(), oif()]), EGRESS_VIA), Statement::Masquerade(None)]),
        // A host connection to 127.0.0.1:<published> leaves through the tap
        // (with `route_localnet` on it) from the tap address instead.
        rule(
            "postrouting",
            vec![
                in_set(oif(), VM_TAPS),
                matches(
                    payload("ip", "saddr"),
                    Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
                        addr: Box::new(string("127.0.0.0")),
                        len: 8,
                    })),
                    Operator::EQ,
                ),
                Statement::Masquerade(None),
            ],
        ),
    ];
    for rule in rules {
        batch.add(NfListObject::Rule(rule));
    }
    serde_json::to_value(batch.to_nftables()).map_err(|e| Error::NftOutput(format!("cannot encode batch: {e}")))
}
