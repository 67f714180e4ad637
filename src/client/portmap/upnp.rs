//! UPnP IGD, the little of it psync needs: find the router with an SSDP
//! search, read its device description for the WAN connection's control URL,
//! and call `AddPortMapping`, `GetExternalIPAddress` and `DeletePortMapping`
//! over SOAP. Every step has a deadline (the `igd-next` crate has none on its
//! SOAP calls, and its dependencies need a newer Rust than psync's 1.80).
//! The builders and parsers are pure and tested with byte fixtures; the I/O
//! is a UDP search and short HTTP/1.1 exchanges with `Connection: close`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Where SSDP searches go.
const SSDP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900));
/// What we search for. `MX: 1` asks devices to answer within a second (the
/// smallest value UPnP 1.1 allows; many answer at once).
const SEARCH: &str = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\
                      MAN: \"ssdp:discover\"\r\nMX: 1\r\n\
                      ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n";
/// Largest HTTP response read (a device description is a few kB).
const MAX_RESPONSE: usize = 64 << 10;

/// A router's WAN connection service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// The router's HTTP address.
    pub http: SocketAddr,
    /// The control URL's path.
    pub control: String,
    /// `urn:schemas-upnp-org:service:WANIPConnection:N` (or WANPPPConnection).
    pub service: String,
}

/// Finds the router's IGD within `wait`, searching from `client`.
pub(super) fn discover(client: Ipv4Addr, wait: Duration) -> Result<Gateway, String> {
    let deadline = Instant::now() + wait;
    let s = UdpSocket::bind((client, 0)).map_err(|e| format!("SSDP socket: {e}"))?;
    s.send_to(SEARCH.as_bytes(), SSDP)
        .map_err(|e| format!("SSDP search: {e}"))?;
    let mut buf = [0u8; 2048];
    let location = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no gateway answered the SSDP search in {} ms",
                wait.as_millis()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.recv(&mut buf) {
            Ok(n) => {
                if let Some(loc) = ssdp_location(&buf[..n]) {
                    break loc;
                }
            }
            Err(_) => {
                return Err(format!(
                    "no gateway answered the SSDP search in {} ms",
                    wait.as_millis()
                ));
            }
        }
    };
    let (http, path) = parse_url(&location).ok_or_else(|| format!("bad LOCATION {location}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    let (status, body) = exchange(http, req.as_bytes(), deadline)?;
    if status != 200 {
        return Err(format!("device description: HTTP {status}"));
    }
    let (service, control) =
        wan_service(&body).ok_or("no WAN connection service in the device description")?;
    // The control URL may be absolute or a path.
    let control = match parse_url(&control) {
        Some((_, p)) => p,
        None => control,
    };
    Ok(Gateway {
        http,
        control,
        service,
    })
}

/// Maps UDP `external_port` to `internal`; returns the gateway's external IP.
pub(super) fn add(
    gw: &Gateway,
    external_port: u16,
    internal: SocketAddrV4,
    lifetime: u32,
    description: &str,
    wait: Duration,
) -> Result<IpAddr, String> {
    let args = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{external_port}</NewExternalPort>\
         <NewProtocol>UDP</NewProtocol><NewInternalPort>{}</NewInternalPort>\
         <NewInternalClient>{}</NewInternalClient><NewEnabled>1</NewEnabled>\
         <NewPortMappingDescription>{description}</NewPortMappingDescription>\
         <NewLeaseDuration>{lifetime}</NewLeaseDuration>",
        internal.port(),
        internal.ip()
    );
    let deadline = Instant::now() + wait;
    soap(gw, "AddPortMapping", &args, deadline)?;
    // The mapping is in place; the address is only for the report.
    let ip = soap(gw, "GetExternalIPAddress", "", deadline)
        .ok()
        .and_then(|body| element(&body, "NewExternalIPAddress").and_then(|s| s.trim().parse().ok()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    Ok(ip)
}

/// Deletes the mapping of UDP `external_port`.
pub(super) fn remove(gw: &Gateway, external_port: u16, wait: Duration) -> Result<(), String> {
    let args = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{external_port}</NewExternalPort>\
         <NewProtocol>UDP</NewProtocol>"
    );
    soap(gw, "DeletePortMapping", &args, Instant::now() + wait).map(|_| ())
}

/// One SOAP call; the response body on HTTP 200, else the UPnP error.
fn soap(gw: &Gateway, action: &str, args: &str, deadline: Instant) -> Result<String, String> {
    let body = soap_body(&gw.service, action, args);
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        gw.control,
        gw.http,
        gw.service,
        body.len()
    );
    let (status, resp) = exchange(gw.http, req.as_bytes(), deadline)?;
    if status == 200 {
        return Ok(resp);
    }
    let code = element(&resp, "errorCode").unwrap_or("?");
    let what = element(&resp, "errorDescription").unwrap_or("");
    Err(format!("{action}: HTTP {status}, UPnP error {code} {what}")
        .trim_end()
        .to_string())
}

/// The SOAP envelope of `action` with `args`.
fn soap_body(service: &str, action: &str, args: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">{args}</u:{action}></s:Body></s:Envelope>\r\n"
    )
}

/// Sends `request` to `to` and reads the whole response (the server closes),
/// all before `deadline`. Returns the status and the body.
fn exchange(to: SocketAddr, request: &[u8], deadline: Instant) -> Result<(u16, String), String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = TcpStream::connect_timeout(&to, left()).map_err(|e| format!("HTTP {to}: {e}"))?;
    s.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    s.write_all(request)
        .map_err(|e| format!("HTTP {to}: {e}"))?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("HTTP {to}: no complete answer in time"));
        }
        s.set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > MAX_RESPONSE {
                    return Err(format!("HTTP {to}: response over {MAX_RESPONSE} bytes"));
                }
                if response_complete(&resp) {
                    break;
                }
            }
            Err(e) => return Err(format!("HTTP {to}: {e}")),
        }
    }
    parse_response(&resp).ok_or_else(|| format!("HTTP {to}: unreadable response"))
}

/// True once a response with a Content-Length has all its body.
fn response_complete(resp: &[u8]) -> bool {
    let Some(head_end) = find(resp, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&resp[..head_end]);
    header(&head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| resp.len() >= head_end + 4 + n)
}

/// Status code and body (de-chunked if needed) of an HTTP/1.x response.
fn parse_response(resp: &[u8]) -> Option<(u16, String)> {
    let head_end = find(resp, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let status: u16 = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let mut body = resp[head_end + 4..].to_vec();
    if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(n) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(n);
    }
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(b, b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// A header's value (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The LOCATION of an SSDP answer that announces an IGD.
fn ssdp_location(datagram: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(datagram).ok()?;
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    header(text, "location").map(str::to_string)
}

/// `http://host:port/path` into the address and the path.
fn parse_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.parse().ok()?
    } else {
        SocketAddr::new(authority.parse().ok()?, 80)
    };
    Some((addr, path.to_string()))
}

/// The first WANIPConnection (or WANPPPConnection) service of a device
/// description: its service type and control URL.
fn wan_service(xml: &str) -> Option<(String, String)> {
    let mut rest = xml;
    while let Some(start) = rest.find("<service>") {
        let block_end = rest[start..].find("</service>")? + start;
        let block = &rest[start..block_end];
        if let (Some(ty), Some(ctl)) = (element(block, "serviceType"), element(block, "controlURL"))
        {
            let ty = ty.trim();
            if ty.contains(":WANIPConnection:") || ty.contains(":WANPPPConnection:") {
                return Some((ty.to_string(), ctl.trim().to_string()));
            }
        }
        rest = &rest[block_end..];
    }
    None
}

/// The text of the first `<name>` element (any namespace prefix).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        // An opening tag: `<name>` or `<prefix:name>`.
        let before = &xml[..at];
        let open = before.rfind('<')?;
        let tag = &xml[open + 1..at];
        if tag.contains('/') || tag.contains(' ') || tag.contains('>') {
            continue;
        }
        if !xml[at + name.len()..].starts_with('>') {
            continue;
        }
        let text_start = at + name.len() + 1;
        let end = xml[text_start..].find('<')? + text_start;
        return Some(&xml[text_start..end]);
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// miniupnpd 2.3.1's answer to our search (from the NAT lab).
    const SSDP_ANSWER: &str = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
        ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
        USN: uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
        EXT:\r\nSERVER: Debian UPnP/1.1 MiniUPnPd/2.3.1\r\n\
        LOCATION: http://10.1.0.1:42437/rootDesc.xml\r\n\r\n";

    /// The service list of a device description, abridged.
    const DESCRIPTION: &str = "<?xml version=\"1.0\"?><root><device><serviceList>\
        <service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>\
        <controlURL>/ctl/L3F</controlURL></service></serviceList><deviceList><device>\
        <serviceList><service>\
        <serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>\
        <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>\
        <controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList>\
        </device></root>";

    #[test]
    fn search_answer_and_description_give_the_control_url() {
        assert!(SEARCH.starts_with("M-SEARCH * HTTP/1.1\r\n") && SEARCH.ends_with("\r\n\r\n"));
        let loc = ssdp_location(SSDP_ANSWER.as_bytes()).unwrap();
        assert_eq!(loc, "http://10.1.0.1:42437/rootDesc.xml");
        assert_eq!(
            parse_url(&loc),
            Some(("10.1.0.1:42437".parse().unwrap(), "/rootDesc.xml".into()))
        );
        assert_eq!(
            parse_url("http://10.1.0.1"),
            Some(("10.1.0.1:80".parse().unwrap(), "/".into()))
        );
        assert_eq!(
            ssdp_location(b"NOTIFY * HTTP/1.1\r\nLOCATION: x\r\n\r\n"),
            None
        );
        assert_eq!(
            wan_service(DESCRIPTION),
            Some((
                "urn:schemas-upnp-org:service:WANIPConnection:2".into(),
                "/ctl/IPConn".into()
            ))
        );
        assert_eq!(wan_service("<root></root>"), None);
    }

    #[test]
    fn soap_envelopes_and_answers() {
        let body = soap_body(
            "urn:schemas-upnp-org:service:WANIPConnection:2",
            "DeletePortMapping",
            "<NewExternalPort>5000</NewExternalPort>",
        );
        assert!(body.contains(
            "<u:DeletePortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:2\">\
             <NewExternalPort>5000</NewExternalPort></u:DeletePortMapping>"
        ));
        let answer = "<s:Body><u:GetExternalIPAddressResponse>\
                      <NewExternalIPAddress>11.0.10.2</NewExternalIPAddress>";
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        let (status, body) = parse_response(ok.as_bytes()).unwrap();
        assert_eq!(status, 200);
        assert_eq!(element(&body, "NewExternalIPAddress"), Some("11.0.10.2"));
        assert!(response_complete(ok.as_bytes()));
        let (c1, c2) = ("<UPnPError><errorCode>718</errorCode></UPnP", "Error>");
        let fault = format!(
            "HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{c1}\r\n{:x}\r\n{c2}\r\n0\r\n\r\n",
            c1.len(),
            c2.len()
        );
        let (status, body) = parse_response(fault.as_bytes()).unwrap();
        assert_eq!(status, 500);
        assert_eq!(element(&body, "errorCode"), Some("718"));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(element("<a:errorCodeX>1</a:errorCodeX>", "errorCode"), None);
    }
}
