//! The Services: `<instance>-host`, a Service without selector whose
//! endpoints are the host's address and ports (what `firewall.host_ports`
//! lets the Pod reach), and `<instance>`, selecting the Pod for its
//! published ports.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kiln_types::firewall::Protocol;

use super::{Context, HOST_SUFFIX, HostEndpoints, port_name, protocol};
use crate::Result;
use crate::names::derived;

/// The host Service and its endpoints, when the firewall lists host ports.
pub(super) fn host_service(cx: &Context<'_>) -> Result<(Option<Service>, Option<HostEndpoints>)> {
    let host_ports = &cx.workload.firewall.host_ports;
    if host_ports.is_empty() {
        return Ok((None, None));
    }
    let address = cx.target.host_address.ok_or_else(|| {
        cx.invalid("the firewall lists host ports, but the target has no host address for Pods to reach".to_owned())
    })?;
    let name = derived(&cx.instance, HOST_SUFFIX);
    let ports = host_ports.iter().map(|hp| service_port(hp.protocol, hp.port, hp.port)).collect();
    let service = service(cx, name.clone(), None, ports);
    let endpoints =
        if cx.target.endpoint_slices { endpoint_slice(cx, name, address) } else { legacy_endpoints(cx, name, address) };
    Ok((Some(service), Some(endpoints)))
}

/// The host Service's `discovery.k8s.io/v1` EndpointSlice.
fn endpoint_slice(cx: &Context<'_>, name: String, address: IpAddr) -> HostEndpoints {
    let mut slice_meta = cx.meta(name.clone());
    let slice_labels = slice_meta.labels.get_or_insert_with(BTreeMap::new);
    slice_labels.insert("kubernetes.io/service-name".to_owned(), name);
    // Without this label the EndpointSlice controller would treat it as its own.
    slice_labels.insert("endpointslice.kubernetes.io/managed-by".to_owned(), "kiln.dev".to_owned());
    HostEndpoints::Slice(EndpointSlice {
        metadata: slice_meta,
        address_type: if address.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![address.to_string()],
            conditions: Some(EndpointConditions { ready: Some(true), ..EndpointConditions::default() }),
            ..Endpoint::default()
        }]),
        ports: Some(endpoint_ports(cx, |name, port, protocol| EndpointPort {
            name: Some(name),
            port: Some(port),
            protocol: Some(protocol),
            ..EndpointPort::default()
        })),
    })
}

/// The host Service's v1 Endpoints, for clusters without EndpointSlices.
fn legacy_endpoints(cx: &Context<'_>, name: String, address: IpAddr) -> HostEndpoints {
    HostEndpoints::Legacy(Endpoints {
        metadata: cx.meta(name),
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: address.to_string(), ..EndpointAddress::default() }]),
            ports: Some(endpoint_ports(cx, |name, port, protocol| CoreEndpointPort {
                name: Some(name),
                port,
                protocol: Some(protocol),
                ..CoreEndpointPort::default()
            })),
            ..EndpointSubset::default()
        }]),
    })
}

/// The host ports as endpoint ports (name, port, protocol) of either API.
fn endpoint_ports<T>(cx: &Context<'_>, port: impl Fn(String, i32, String) -> T) -> Vec<T> {
    let host_ports = &cx.workload.firewall.host_ports;
    host_ports
        .iter()
        .map(|hp| port(port_name(hp.protocol, hp.port), i32::from(hp.port), protocol(hp.protocol)))
        .collect()
}

/// The Service selecting the Pod, when the firewall publishes ports.
pub(super) fn published_service(cx: &Context<'_>) -> Option<Service> {
    let published = &cx.workload.firewall.published_ports;
    (!published.is_empty()).then(|| {
        let ports = published.iter().map(|p| service_port(p.protocol, p.host_port, p.guest_port)).collect();
        service(cx, cx.instance.clone(), Some(cx.selector()), ports)
    })
}

fn service(
    cx: &Context<'_>,
    name: String,
    selector: Option<BTreeMap<String, String>>,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: cx.meta(name),
        spec: Some(ServiceSpec { selector, ports: Some(ports), ..ServiceSpec::default() }),
        ..Service::default()
    }
}

/// `port` on the Service, forwarded to `target` on the endpoints.
fn service_port(protocol: Protocol, port: u16, target: u16) -> ServicePort {
    ServicePort {
        name: Some(port_name(protocol, port)),
        protocol: Some(super::protocol(protocol)),
        port: i32::from(port),
        target_port: Some(IntOrString::Int(i32::from(target))),
        ..ServicePort::default()
    }
}
