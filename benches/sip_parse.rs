//! Micro-benchmarks of the sans-IO layers: parsing, editing and serialising a message, a
//! WireGuard offer's codec, and one whole proxied call through the core (INVITE/100/180/200/ACK/BYE/200) without
//! sockets — the user-space share of the proxy's CPU cost per call.

#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use common::{answer, config, flows, invite, new_proxy, INVITE};
use criterion::{criterion_group, criterion_main, Criterion};
use gatehouse_sip::flow::Destination;
use gatehouse_sip::{HeaderName, Limits, Message};

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

fn call(c: &mut Criterion) {
    let (caller, uas) = flows();
    let limits = Limits::default();
    let mut proxy = new_proxy(config());
    let mut n: u64 = 0;
    c.bench_function("proxy one call (7 messages in, 7 out)", |b| {
        b.iter(|| {
            n += 1;
            let now = Instant::now();
            proxy.handle_message(invite(n), caller, now);
            let _ = proxy.take_writes();
            let mut fwd = None;
            while let Some(t) = proxy.poll_transmit() {
                if matches!(t.dest, Destination::Addr { .. }) {
                    fwd = Some(Message::parse(t.bytes, &limits).expect("fwd"));
                }
            }
            let fwd = fwd.expect("forwarded");
            proxy.handle_message(answer(&fwd, "180 Ringing"), uas, now);
            proxy.handle_message(answer(&fwd, "200 OK"), uas, now);
            // The caller's route set: the Record-Route of the 200 it got (reversed).
            let mut ok = None;
            while let Some(t) = proxy.poll_transmit() {
                if t.bytes.starts_with(b"SIP/2.0 200") {
                    ok = Some(Message::parse(t.bytes, &limits).expect("200"));
                }
            }
            let ok = ok.expect("the 200 relayed");
            let mut rr = ok.list_values(HeaderName::RecordRoute);
            rr.reverse();
            let rr = rr.join(", ");
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
            let _ = proxy.take_writes();
            while proxy.poll_transmit().is_some() {}
            // Let the transaction timers run so that the tables stay small.
            proxy.handle_timeout(now + std::time::Duration::from_secs(64));
        })
    });
}

/// The WireGuard offer of every tunnel INVITE: parsed (with sdp-rs's guard), one parameter set
/// and written out, as the authorize stage does (issue 20: one body must not be paid twice).
fn offer(c: &mut Criterion) {
    let body = INVITE.split_once("\r\n\r\n").expect("a body").1.as_bytes();
    c.bench_function("WireGuard offer: parse, set psk, serialise", |b| {
        b.iter(|| {
            let mut w = gatehouse_sip::wireguard::WgSdp::parse(black_box(body))
                .expect("valid")
                .expect("WireGuard");
            w.set_param("psk", Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="));
            w.to_bytes()
        })
    });
}

criterion_group!(benches, parse, offer, call);
criterion_main!(benches);
