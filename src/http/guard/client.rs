//! Who the client is: the peer address of the connection, or, when that peer is a trusted
//! proxy (`security.trusted_proxies`), the address its `X-Forwarded-For` names.
//!
//! `X-Forwarded-For: client, proxy1, proxy2` grows by one entry per proxy, each appending
//! the peer it got the request from; only the entries our trusted proxies appended are
//! believed. So the client is the last entry, walking from the right, that is not itself a
//! trusted proxy (nginx's `real_ip_recursive on`); a malformed entry stops the walk at the
//! last hop known good. A client cannot pose as someone else by sending the header itself:
//! its own entries sit left of the first untrusted one.
//!
//! Owns: that rule. Does not own: what the address is used for (rate limits).

use std::net::IpAddr;

use crate::config::{split_host_port, IpNet};
use crate::http::codec::Request;

/// The client's address for `request` received from `peer`.
pub fn client_addr(peer: IpAddr, request: &Request, trusted_proxies: &[IpNet]) -> IpAddr {
    let trusted = |ip: IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !trusted(peer) {
        return peer;
    }
    let entries: Vec<&[u8]> = request
        .header_values("x-forwarded-for")
        .flat_map(|value| value.split(|&b| b == b','))
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            break;
        };
        client = ip;
        if !trusted(ip) {
            break;
        }
    }
    client
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, with or
/// without a `:port`.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (host, _) = split_host_port(text)?;
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::http::codec::{Event, Limits, RequestDecoder};

    fn request(xff: &[&str]) -> Request {
        let mut head = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
        for value in xff {
            head.push_str(&format!("X-Forwarded-For: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut buf = BytesMut::from(head.as_bytes());
        match RequestDecoder::new(Limits::default()).decode(&mut buf) {
            Ok(Some(Event::Request(r))) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("literal")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|n| IpNet::parse(n).expect("literal"))
            .collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let r = request(&["203.0.113.9"]);
        assert_eq!(client_addr(ip("198.51.100.1"), &r, &[]), ip("198.51.100.1"));
        let proxies = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("198.51.100.1"), &r, &proxies),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let proxies = nets(&["10.0.0.0/8", "::1"]);
        // nginx appends the peer it saw.
        let r = request(&["203.0.113.9"]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("203.0.113.9"));
        // A client's own claim sits left of what the proxy appended.
        let r = request(&["1.1.1.1, 203.0.113.9"]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("203.0.113.9"));
        // Two trusted hops, over two header lines; ports and brackets allowed.
        let r = request(&["203.0.113.9:5555", "10.2.2.2"]);
        assert_eq!(client_addr(ip("::1"), &r, &proxies), ip("203.0.113.9"));
        let r = request(&["[2001:db8::7]:443"]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("2001:db8::7"));
        // Mapped IPv4 peers (a listener on [::]) count as IPv4.
        let r = request(&["203.0.113.9"]);
        assert_eq!(
            client_addr(ip("::ffff:10.1.1.1"), &r, &proxies),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn missing_or_malformed_entries_stop_at_the_last_known_hop() {
        let proxies = nets(&["10.0.0.0/8"]);
        let r = request(&[]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("10.1.1.1"));
        let r = request(&["unknown, 10.3.3.3"]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("10.3.3.3"));
        let r = request(&["203.0.113.9, garbage"]);
        assert_eq!(client_addr(ip("10.1.1.1"), &r, &proxies), ip("10.1.1.1"));
    }
}
