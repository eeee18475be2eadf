//! Micro-benchmarks of the sans-IO layers: parsing, editing and serialising a message,
//! and one whole proxied call through the core (INVITE/100/180/200/ACK/BYE/200) without
//! sockets — the user-space share of the proxy's CPU cost per call.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use gatehouse::core::{CoreConfig, LocalAddr, RouteTable, Target};
use gatehouse_sip::flow::{Destination, Flow, Transport};
use gatehouse_sip::transaction::TimerConfig;
use gatehouse_sip::{HeaderName, Limits, Message};

const INVITE: &str = "INVITE sip:vpn@org.example SIP/2.0\r\n\
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

fn parse(c: &mut Criterion) {
    let bytes = Bytes::from_static(INVITE.as_bytes());
    let limits = Limits::default();
    c.bench_function("parse INVITE", |b| {
        b.iter(|| Message::parse(black_box(bytes.clone()), &limits).expect("parses"))
    });
    c.bench_function("parse, edit and serialise INVITE", |b| {
        b.iter(|| {
            let mut m = Message::parse(black_box(bytes.clone()), &limits).expect("parses");
            m.set_request_uri("sip:vpn@127.0.0.1:5070");
            m.insert(
                0,
                HeaderName::Via,
                "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx".into(),
            );
            m.insert(1, HeaderName::RecordRoute, "<sip:127.0.0.1:5060;lr>".into());
            m.serialize()
        })
    });
}

fn config() -> CoreConfig {
    let mut routes = RouteTable::default();
    routes.add_domain(
        "org.example",
        Target {
            uri: "sip:127.0.0.1:5070".into(),
            dest: Destination::Addr {
                transport: Transport::Udp,
                addr: "127.0.0.1:5070".parse().expect("addr"),
                server_name: None,
            },
            transport: Transport::Udp,
        },
    );
    CoreConfig {
        domains: vec!["org.example".into()],
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
        dialog_key: [3; 32],
        auth: gatehouse::config::AuthSettings::defaults("org.example"),
        registrar: gatehouse::config::RegistrarSettings::default(),
        auth_secret: [3; 32],
        tunnels: gatehouse::config::TunnelSettings::default(),
        policy: std::sync::Arc::new(gatehouse_policy::Policy::trusted_only()),
        rate_limit: Default::default(),
        hide_topology: false,
        seed: [4; 32],
    }
}

/// Builds the UAS's response to a forwarded request.
fn answer(fwd: &Message, status: &str) -> Bytes {
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

fn call(c: &mut Criterion) {
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
    let limits = Limits::default();
    let mut proxy = new_proxy(config());
    let mut n: u64 = 0;
    c.bench_function("proxy one call (7 messages in, 7 out)", |b| {
        b.iter(|| {
            n += 1;
            let now = Instant::now();
            let invite = INVITE.replace("z9hG4bK-1-1-0", &format!("z9hG4bK-{n}")).replace("1-1@", &format!("{n}@"));
            proxy.handle_message(Bytes::from(invite), caller, now);
            let mut fwd = None;
            while let Some(t) = proxy.poll_transmit() {
                if matches!(t.dest, Destination::Addr { .. }) {
                    fwd = Some(Message::parse(t.bytes, &limits).expect("fwd"));
                }
            }
            let fwd = fwd.expect("forwarded");
            proxy.handle_message(answer(&fwd, "180 Ringing"), uas, now);
            proxy.handle_message(answer(&fwd, "200 OK"), uas, now);
            while proxy.poll_transmit().is_some() {}
            let rr = fwd.list_values(HeaderName::RecordRoute).join(", ");
            for (method, seq) in [("ACK", 1), ("BYE", 2)] {
                let req = format!(
                    "{method} sip:127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-{n}-{method}\r\n\
From: sipp <sip:sipp@127.0.0.1:5080>;tag=1SIPpTag001\r\nTo: <sip:vpn@org.example>;tag=uas\r\nCall-ID: {n}@127.0.0.1\r\n\
CSeq: {seq} {method}\r\nRoute: {rr}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                );
                proxy.handle_message(Bytes::from(req), caller, now);
                while let Some(t) = proxy.poll_transmit() {
                    if method == "BYE" {
                        let bye = Message::parse(t.bytes, &limits).expect("bye");
                        proxy.handle_message(answer(&bye, "200 OK"), uas, now);
                    }
                }
            }
            while proxy.poll_transmit().is_some() {}
            // Let the transaction timers run so that the tables stay small.
            proxy.handle_timeout(now + std::time::Duration::from_secs(64));
        })
    });
}

criterion_group!(benches, parse, call);
criterion_main!(benches);

fn new_proxy(cfg: gatehouse::core::CoreConfig) -> gatehouse::core::Proxy {
    gatehouse::core::Proxy::new(cfg, Default::default(), gatehouse::wall_clock())
}
