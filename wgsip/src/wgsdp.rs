//! Offers and answers in the WireGuard SDP of wireguard-sdp.md.

use std::net::IpAddr;

use base64::Engine;
use ipnet::IpNet;

/// An SDP body announcing a WireGuard endpoint.
pub fn body(
    addr: IpAddr,
    port: u16,
    pubkey: &[u8; 32],
    prefix: &IpNet,
    pskmth: &str,
    psk: Option<&[u8; 32]>,
) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let family = if addr.is_ipv4() { "IP4" } else { "IP6" };
    let session: u32 = rand::random();
    let psk = psk
        .map(|k| format!(";psk={}", b64.encode(k)))
        .unwrap_or_default();
    format!(
        "v=0\r\no=- {session} 1 IN {family} {addr}\r\ns=-\r\nc=IN {family} {addr}\r\nt=0 0\r\n\
m=application {port} udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey={};prefix={prefix};pskmth={pskmth}{psk}\r\na=sendrecv\r\n",
        b64.encode(pubkey)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_sip::wireguard::WgSdp;

    #[test]
    fn offer_parses_as_the_gateway_parses_it() {
        let b = body(
            "2001:db8::2".parse().unwrap(),
            51820,
            &[7; 32],
            &"2001:db8:456:1::/64".parse().unwrap(),
            "scram,none",
            None,
        );
        let w = WgSdp::parse(b.as_bytes()).unwrap().unwrap();
        assert_eq!(w.pubkey, [7; 32]);
        assert_eq!(w.port, 51820);
        assert_eq!(w.pskmth, vec!["scram".to_owned(), "none".to_owned()]);
        let a = body(
            "192.0.2.1".parse().unwrap(),
            1,
            &[1; 32],
            &"192.0.2.0/24".parse().unwrap(),
            "gateway",
            Some(&[9; 32]),
        );
        assert_eq!(
            WgSdp::parse(a.as_bytes()).unwrap().unwrap().psk().unwrap(),
            vec![9; 32]
        );
    }
}
