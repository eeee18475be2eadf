//! What the core benchmarks share: a trusted-loopback configuration routing `org.example` to
//! a UAS, the caller's INVITE (a WireGuard offer), and the UAS's answers.

#![allow(dead_code)]

use bytes::Bytes;
use gatehouse::core::{CoreConfig, LocalAddr, Route, RouteTable};
use gatehouse_sip::flow::{Destination, Flow, Transport};
use gatehouse_sip::transaction::TimerConfig;
use gatehouse_sip::{HeaderName, Limits, Message};

pub const INVITE: &str = "INVITE sip:vpn@org.example SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-1-1-0\r\n\
From: sipp <sip:sipp@127.0.0.1:5080>;tag=1SIPpTag001\r\n\
To: <sip:vpn@org.example>\r\n\
Call-ID: 1-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:sipp@127.0.0.1:5080;transport=UDP>\r\n\
Max-Forwards: 70\r\n\
Subject: Gatehouse test\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 244\r\n\r\n\
v=0\r\no=- 4124031101 285260646 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 57660 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=none\r\n\
a=sendrecv\r\n";

/// The caller (SIPp on 5080) and the answerer (5070) as the core sees them.
pub fn flows() -> (Flow, Flow) {
    let caller = Flow {
        transport: Transport::Udp,
        local: "127.0.0.1:5060".parse().expect("addr"),
        remote: "127.0.0.1:5080".parse().expect("addr"),
        conn: None,
    };
    let uas = Flow {
        remote: "127.0.0.1:5070".parse().expect("addr"),
        ..caller
    };
    (caller, uas)
}

pub fn config() -> CoreConfig {
    let mut routes = RouteTable::default();
    routes.add_domain(
        "org.example",
        Route {
            uri: "sip:127.0.0.1:5070".into(),
            dest: Destination::Addr {
                transport: Transport::Udp,
                addr: "127.0.0.1:5070".parse().expect("addr"),
                server_name: None,
            },
        },
    );
    CoreConfig {
        domains: vec!["org.example".into()],
        aliases: Vec::new(),
        locals: vec![LocalAddr::new(
            Transport::Udp,
            "127.0.0.1:5060".parse().expect("addr"),
            None,
        )],
        routes,
        trusted: vec!["127.0.0.0/8".parse().expect("net")],
        limits: Limits::default(),
        max_transactions: 1 << 20,
        timers: TimerConfig::default(),
        failover: gatehouse::config::DEFAULT_FAILOVER,
        dead_address: gatehouse::config::DEFAULT_DEAD_ADDRESS,
        dialog_key: [3; 32],
        auth: gatehouse::config::AuthSettings::defaults("org.example"),
        registrar: gatehouse::config::RegistrarSettings::default(),
        auth_secret: [3; 32],
        tunnels: gatehouse::config::TunnelSettings::default(),
        policy: std::sync::Arc::new(gatehouse_policy::Policy::trusted_only()),
        rate_limit: Default::default(),
        hide_topology: false,
        balancers: Vec::new(),
        peer_uri: None,
        shared_store: false,
        crossover: None,
        seed: [4; 32],
    }
}

/// Builds the UAS's response to a forwarded request.
pub fn answer(fwd: &Message, status: &str) -> Bytes {
    let mut s = format!("SIP/2.0 {status}\r\n");
    for (i, h) in fwd.headers() {
        match h.name {
            HeaderName::Via
            | HeaderName::From
            | HeaderName::CallId
            | HeaderName::CSeq
            | HeaderName::RecordRoute => {
                s.push_str(&format!("{}: {}\r\n", h.name.canonical(), fwd.value(i)));
            }
            HeaderName::To => s.push_str(&format!("To: {};tag=uas\r\n", fwd.value(i))),
            _ => {}
        }
    }
    s.push_str("Contact: <sip:127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n");
    Bytes::from(s)
}

pub fn new_proxy(cfg: gatehouse::core::CoreConfig) -> gatehouse::core::Proxy {
    gatehouse::core::Proxy::new(cfg, Default::default(), gatehouse::wall_clock())
}

/// The INVITE of call `n` (its own branch and Call-ID).
pub fn invite(n: u64) -> Bytes {
    Bytes::from(
        INVITE
            .replace("z9hG4bK-1-1-0", &format!("z9hG4bK-{n}"))
            .replace("1-1@", &format!("{n}@")),
    )
}

/// Drains the core's output: writes taken (as the driver's storage worker would), transmits
/// returned.
pub fn drain(proxy: &mut gatehouse::core::Proxy) -> Vec<gatehouse_sip::transaction::Transmit> {
    let _ = proxy.take_writes();
    std::iter::from_fn(|| proxy.poll_transmit()).collect()
}

/// A tunnel set-up as SIPp's held calls do it: INVITE, 180, 200, ACK (no BYE). Returns the
/// Record-Route the caller got.
pub fn set_up(proxy: &mut gatehouse::core::Proxy, n: u64, now: std::time::Instant) -> String {
    let (caller, uas) = flows();
    let limits = Limits::default();
    proxy.handle_message(invite(n), caller, now);
    let fwd = drain(proxy)
        .into_iter()
        .find(|t| matches!(t.dest, Destination::Addr { .. }))
        .map(|t| Message::parse(t.bytes, &limits).expect("fwd"))
        .expect("forwarded");
    proxy.handle_message(answer(&fwd, "180 Ringing"), uas, now);
    proxy.handle_message(answer(&fwd, "200 OK"), uas, now);
    drain(proxy);
    let rr = fwd.list_values(HeaderName::RecordRoute).join(", ");
    let ack = format!(
        "ACK sip:127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-{n}-ACK\r\n\
From: sipp <sip:sipp@127.0.0.1:5080>;tag=1SIPpTag001\r\nTo: <sip:vpn@org.example>;tag=uas\r\nCall-ID: {n}@127.0.0.1\r\n\
CSeq: 1 ACK\r\nRoute: {rr}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    proxy.handle_message(Bytes::from(ack), caller, now);
    drain(proxy);
    rr
}

/// Runs every transaction to its end (Timer L/M/K/J: 32 s; Timer C: 180 s) and gives the
/// tables' memory back, so what stays is what held tunnels cost.
pub fn settle(proxy: &mut gatehouse::core::Proxy, now: &mut std::time::Instant) {
    *now += std::time::Duration::from_secs(200);
    proxy.handle_timeout(*now);
    drain(proxy);
    proxy.maintain(*now);
    assert_eq!(proxy.transactions(), 0, "every transaction ended");
}

/// `STEP PROBE` from the bench's arguments (defaults 50 000 and 5 000).
pub fn step_and_probe() -> (u64, u64) {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    (
        args.first().copied().unwrap_or(50_000),
        args.get(1).copied().unwrap_or(5_000),
    )
}
