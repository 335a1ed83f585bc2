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
    let service = Service {
        metadata: cx.meta(name.clone()),
        spec: Some(ServiceSpec {
            ports: Some(
                host_ports
                    .iter()
                    .map(|hp| ServicePort {
                        name: Some(port_name(hp.protocol, hp.port)),
                        protocol: Some(protocol(hp.protocol)),
                        port: i32::from(hp.port),
                        target_port: Some(IntOrString::Int(i32::from(hp.port))),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
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
        ports: Some(
            cx.workload
                .firewall
                .host_ports
                .iter()
                .map(|hp| EndpointPort {
                    name: Some(port_name(hp.protocol, hp.port)),
                    port: Some(i32::from(hp.port)),
                    protocol: Some(protocol(hp.protocol)),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    })
}

/// The host Service's v1 Endpoints, for clusters without EndpointSlices.
fn legacy_endpoints(cx: &Context<'_>, name: String, address: IpAddr) -> HostEndpoints {
    HostEndpoints::Legacy(Endpoints {
        metadata: cx.meta(name),
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: address.to_string(), ..EndpointAddress::default() }]),
            ports: Some(
                cx.workload
                    .firewall
                    .host_ports
                    .iter()
                    .map(|hp| CoreEndpointPort {
                        name: Some(port_name(hp.protocol, hp.port)),
                        port: i32::from(hp.port),
                        protocol: Some(protocol(hp.protocol)),
                        ..CoreEndpointPort::default()
                    })
                    .collect(),
            ),
            ..EndpointSubset::default()
        }]),
    })
}

/// The Service selecting the Pod, when the firewall publishes ports.
pub(super) fn published_service(cx: &Context<'_>) -> Option<Service> {
    let published = &cx.workload.firewall.published_ports;
    (!published.is_empty()).then(|| Service {
        metadata: cx.meta(cx.instance.clone()),
        spec: Some(ServiceSpec {
            selector: Some(cx.selector()),
            ports: Some(
                published
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(port_name(p.protocol, p.host_port)),
                        protocol: Some(protocol(p.protocol)),
                        port: i32::from(p.host_port),
                        target_port: Some(IntOrString::Int(i32::from(p.guest_port))),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}
