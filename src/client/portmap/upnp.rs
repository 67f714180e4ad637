//! UPnP IGD through the `igd-next` crate: discover the gateway (SSDP and the
//! device description over HTTP), add and delete a UDP port mapping.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use igd_next::{PortMappingProtocol, SearchOptions};

/// Finds the router's IGD within `wait`, searching from `client`.
pub(super) fn discover(client: Ipv4Addr, wait: Duration) -> Result<igd_next::Gateway, String> {
    let opts = SearchOptions {
        bind_addr: SocketAddr::new(IpAddr::V4(client), 0),
        timeout: Some(wait),
        single_search_timeout: Some(wait),
        ..SearchOptions::default()
    };
    igd_next::search_gateway(opts).map_err(|e| match e {
        igd_next::SearchError::NoResponseWithinTimeout => {
            format!(
                "no gateway answered the SSDP search in {} ms",
                wait.as_millis()
            )
        }
        e => format!("search failed: {e}"),
    })
}

/// Maps UDP `external_port` to `internal`; returns the gateway's external IP.
pub(super) fn add(
    gw: &igd_next::Gateway,
    external_port: u16,
    internal: SocketAddrV4,
    lifetime: u32,
    description: &str,
) -> Result<IpAddr, String> {
    gw.add_port(
        PortMappingProtocol::UDP,
        external_port,
        SocketAddr::V4(internal),
        lifetime,
        description,
    )
    .map_err(|e| format!("AddPortMapping: {e}"))?;
    // The mapping is in place; the address is only for the report.
    Ok(gw
        .get_external_ip()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
}

/// Deletes the mapping of UDP `external_port`.
pub(super) fn remove(gw: &igd_next::Gateway, external_port: u16) -> Result<(), String> {
    gw.remove_port(PortMappingProtocol::UDP, external_port)
        .map_err(|e| format!("DeletePortMapping: {e}"))
}
