//! The firewall as a NetworkPolicy.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kiln_types::firewall::Protocol;

use super::Context;

/// The firewall as a NetworkPolicy: ingress only to published ports,
/// egress to the host's listed ports (and cluster DNS, if allowed), or
/// anywhere when egress is on.
pub(super) fn network_policy(cx: &Context<'_>) -> NetworkPolicy {
    let (target, firewall) = (cx.target, &cx.workload.firewall);
    let ingress: Vec<NetworkPolicyIngressRule> = if firewall.published_ports.is_empty() {
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule {
            ports: Some(firewall.published_ports.iter().map(|p| policy_port(p.protocol, p.guest_port)).collect()),
            ..NetworkPolicyIngressRule::default()
        }]
    };
    let mut egress = Vec::new();
    if firewall.egress {
        egress.push(NetworkPolicyEgressRule::default());
    } else {
        if let (Some(address), false) = (target.host_address, firewall.host_ports.is_empty()) {
            let cidr = match address {
                IpAddr::V4(_) => format!("{address}/32"),
                IpAddr::V6(_) => format!("{address}/128"),
            };
            egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock { cidr, except: None }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(firewall.host_ports.iter().map(|hp| policy_port(hp.protocol, hp.port)).collect()),
            });
        }
        if target.allow_cluster_dns {
            egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(
                            [("kubernetes.io/metadata.name".to_owned(), "kube-system".to_owned())].into(),
                        ),
                        ..LabelSelector::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some([("k8s-app".to_owned(), "kube-dns".to_owned())].into()),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![policy_port(Protocol::Udp, 53), policy_port(Protocol::Tcp, 53)]),
            });
        }
    }
    NetworkPolicy {
        metadata: cx.meta(cx.instance.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(cx.selector()), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: (!ingress.is_empty()).then_some(ingress),
            egress: (!egress.is_empty()).then_some(egress),
        }),
    }
}

fn policy_port(protocol: Protocol, port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some(super::protocol(protocol)),
        end_port: None,
    }
}
