//! Transaction machines on a manual clock: time only moves when a test says so.

// A test chooses where its manual clock starts.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::flow::Transport;
use crate::Limits;

const T1: Duration = Duration::from_millis(500);

fn flow(transport: Transport) -> Flow {
    Flow {
        transport,
        local: "192.0.2.1:5060".parse().unwrap(),
        remote: "192.0.2.9:5060".parse().unwrap(),
        conn: None,
    }
}

fn dest() -> Destination {
    Destination::Addr {
        transport: Transport::Udp,
        addr: "192.0.2.20:5060".parse::<SocketAddr>().unwrap(),
        server_name: None,
    }
}

fn request(method: &str, branch: &str) -> Message {
    let s = format!(
        "{method} sip:bob@org.example SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9:5060;branch={branch}\r\n\
From: <sip:alice@a.example>;tag=1\r\nTo: <sip:bob@org.example>\r\nCall-ID: c1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(s), &Limits::default()).unwrap()
}

fn response(status: u16, method: &str, branch: &str) -> Message {
    let s = format!(
        "SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n\
From: <sip:alice@a.example>;tag=1\r\nTo: <sip:bob@org.example>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(s), &Limits::default()).unwrap()
}

fn drain(txl: &mut TransactionLayer) -> Vec<Transmit> {
    std::iter::from_fn(|| txl.poll_transmit()).collect()
}

/// Runs every timer up to `until`, one deadline at a time, collecting transmissions and events.
fn advance(txl: &mut TransactionLayer, until: Instant) -> (Vec<Transmit>, Vec<TxEvent>) {
    let mut sent = Vec::new();
    let mut events = Vec::new();
    while let Some(at) = txl.poll_timeout() {
        if at > until {
            break;
        }
        events.extend(txl.handle_timeout(at));
        sent.extend(drain(txl));
    }
    (sent, events)
}

#[test]
fn client_invite_retransmits_on_timer_a_and_times_out_on_b() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKc1").serialize();
    let id = txl.start_client(req, Method::Invite, "z9hG4bKc1", dest(), false, t0);
    assert_eq!(drain(&mut txl).len(), 1);
    // Timer A doubles: retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
    let (sent, events) = advance(&mut txl, t0 + 64 * T1 - Duration::from_millis(1));
    assert_eq!(sent.len(), 6);
    assert!(events.is_empty());
    let (sent, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(sent.is_empty());
    assert!(
        matches!(events[..], [TxEvent::Timeout(t), TxEvent::ClientGone(g)] if t == id && g == id)
    );
    assert!(txl.is_empty());
}

#[test]
fn client_invite_reliable_does_not_retransmit() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKc2").serialize();
    txl.start_client(req, Method::Invite, "z9hG4bKc2", dest(), true, t0);
    drain(&mut txl);
    let (sent, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(sent.is_empty());
    assert!(matches!(events[0], TxEvent::Timeout(_)));
}

#[test]
fn client_invite_acks_non_2xx_and_absorbs_retransmitted_final() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKc3").serialize();
    let id = txl.start_client(req, Method::Invite, "z9hG4bKc3", dest(), false, t0);
    drain(&mut txl);
    assert_eq!(
        txl.on_response(&response(180, "INVITE", "z9hG4bKc3"), t0),
        Some(id)
    );
    assert!(txl.client_has_provisional(id));
    assert_eq!(
        txl.on_response(&response(486, "INVITE", "z9hG4bKc3"), t0),
        Some(id)
    );
    let sent = drain(&mut txl);
    assert_eq!(sent.len(), 1);
    let ack = std::str::from_utf8(&sent[0].bytes).unwrap();
    assert!(
        ack.starts_with("ACK sip:bob@org.example SIP/2.0\r\n"),
        "{ack}"
    );
    assert!(
        ack.contains("branch=z9hG4bKc3"),
        "ACK for non-2xx reuses the branch: {ack}"
    );
    assert!(
        ack.contains("To: <sip:bob@org.example>;tag=2"),
        "To of the response: {ack}"
    );
    assert!(ack.contains("CSeq: 1 ACK"));
    // The retransmitted 486 is absorbed and answered with the same ACK.
    assert_eq!(
        txl.on_response(&response(486, "INVITE", "z9hG4bKc3"), t0),
        None
    );
    assert_eq!(drain(&mut txl)[0].bytes, sent[0].bytes);
    // Timer D (32 s over UDP) ends it.
    let (_, events) = advance(&mut txl, t0 + Duration::from_secs(32));
    assert!(matches!(events[..], [TxEvent::ClientGone(g)] if g == id));
}

#[test]
fn client_invite_accepted_passes_2xx_retransmissions() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKc4").serialize();
    let id = txl.start_client(req, Method::Invite, "z9hG4bKc4", dest(), false, t0);
    drain(&mut txl);
    assert_eq!(
        txl.on_response(&response(200, "INVITE", "z9hG4bKc4"), t0),
        Some(id)
    );
    assert_eq!(
        txl.on_response(&response(200, "INVITE", "z9hG4bKc4"), t0),
        Some(id)
    );
    assert!(drain(&mut txl).is_empty(), "the proxy never ACKs a 2xx");
    let (sent, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(sent.is_empty(), "no retransmission after a response");
    assert!(matches!(events[..], [TxEvent::ClientGone(_)]));
}

#[test]
fn timer_c_fires_and_is_reset_by_provisionals() {
    let t0 = Instant::now();
    let timers = TimerConfig {
        timer_c: Duration::from_secs(10),
        ..TimerConfig::default()
    };
    let mut txl = TransactionLayer::new(timers);
    let req = request("INVITE", "z9hG4bKc5").serialize();
    let id = txl.start_client(req, Method::Invite, "z9hG4bKc5", dest(), true, t0);
    drain(&mut txl);
    txl.on_response(
        &response(180, "INVITE", "z9hG4bKc5"),
        t0 + Duration::from_secs(6),
    );
    let (_, events) = advance(&mut txl, t0 + Duration::from_secs(15));
    assert!(
        events.is_empty(),
        "the 180 at 6 s moved Timer C to 16 s: {events:?}"
    );
    let (_, events) = advance(&mut txl, t0 + Duration::from_secs(16));
    assert!(matches!(events[..], [TxEvent::TimerC { tx, provisional: true }] if tx == id));
}

#[test]
fn client_non_invite_timer_e_caps_at_t2_and_f_times_out() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "z9hG4bKc6").serialize();
    txl.start_client(req, Method::Options, "z9hG4bKc6", dest(), false, t0);
    drain(&mut txl);
    // E: 0.5, 1.5, 3.5, 7.5, then every 4 s (T2) up to 32 s: 11.5 ... 31.5 -> 6 more.
    let (sent, events) = advance(&mut txl, t0 + 64 * T1 - Duration::from_millis(1));
    assert_eq!(sent.len(), 4 + 6);
    assert!(events.is_empty());
    let (_, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(matches!(events[0], TxEvent::Timeout(_)));
}

#[test]
fn client_non_invite_completed_waits_timer_k() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("BYE", "z9hG4bKc7").serialize();
    let id = txl.start_client(req, Method::Bye, "z9hG4bKc7", dest(), false, t0);
    drain(&mut txl);
    assert_eq!(
        txl.on_response(&response(200, "BYE", "z9hG4bKc7"), t0),
        Some(id)
    );
    assert_eq!(
        txl.on_response(&response(200, "BYE", "z9hG4bKc7"), t0),
        None,
        "absorbed"
    );
    let (sent, events) = advance(&mut txl, t0 + Duration::from_secs(5));
    assert!(sent.is_empty());
    assert!(matches!(events[..], [TxEvent::ClientGone(_)]));
}

#[test]
fn server_invite_absorbs_retransmissions_and_resends_last_response() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let inv = request("INVITE", "z9hG4bKs1");
    let ServerOutcome::New(id) = txl.on_request(&inv, flow(Transport::Udp), t0) else {
        panic!("new transaction expected");
    };
    // Retransmission before any response: absorbed silently.
    assert_eq!(
        txl.on_request(&inv, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    assert!(drain(&mut txl).is_empty());
    txl.respond(id, 100, Bytes::from_static(b"100"), t0);
    drain(&mut txl);
    assert_eq!(
        txl.on_request(&inv, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    assert_eq!(drain(&mut txl)[0].bytes, Bytes::from_static(b"100"));
}

#[test]
fn server_invite_non_2xx_retransmits_on_g_until_ack() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let inv = request("INVITE", "z9hG4bKs2");
    let ServerOutcome::New(id) = txl.on_request(&inv, flow(Transport::Udp), t0) else {
        panic!("new transaction expected");
    };
    txl.respond(id, 486, Bytes::from_static(b"486"), t0);
    assert_eq!(drain(&mut txl).len(), 1);
    // G at 0.5, 1.5 (1 s), 3.5 (2 s), 7.5 (4 s = T2), 11.5, ...
    let (sent, _) = advance(&mut txl, t0 + Duration::from_millis(3600));
    assert_eq!(sent.len(), 3);
    let ack = request("ACK", "z9hG4bKs2");
    assert_eq!(
        txl.on_request(&ack, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    let (sent, events) = advance(&mut txl, t0 + Duration::from_secs(60));
    assert!(sent.is_empty(), "no retransmission once confirmed");
    assert!(
        matches!(events[..], [TxEvent::ServerGone(g)] if g == id),
        "Timer I ends it: {events:?}"
    );
}

#[test]
fn server_invite_without_ack_ends_on_timer_h() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let inv = request("INVITE", "z9hG4bKs3");
    let ServerOutcome::New(id) = txl.on_request(&inv, flow(Transport::Tcp), t0) else {
        panic!("new transaction expected");
    };
    txl.respond(id, 404, Bytes::from_static(b"404"), t0);
    drain(&mut txl);
    let (sent, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(sent.is_empty(), "no Timer G over TCP");
    assert!(matches!(events[..], [TxEvent::ServerGone(_)]));
}

#[test]
fn server_invite_2xx_accepted_until_timer_l() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let inv = request("INVITE", "z9hG4bKs4");
    let ServerOutcome::New(id) = txl.on_request(&inv, flow(Transport::Udp), t0) else {
        panic!("new transaction expected");
    };
    txl.respond(id, 200, Bytes::from_static(b"200"), t0);
    txl.respond(id, 200, Bytes::from_static(b"200 again"), t0);
    assert_eq!(
        drain(&mut txl).len(),
        2,
        "2xx retransmissions from downstream pass through"
    );
    assert_eq!(
        txl.on_request(&inv, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    assert!(
        drain(&mut txl).is_empty(),
        "INVITE retransmission absorbed in Accepted"
    );
    let (_, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(matches!(events[..], [TxEvent::ServerGone(_)]));
}

#[test]
fn server_non_invite_completed_timer_j() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let opt = request("OPTIONS", "z9hG4bKs5");
    let ServerOutcome::New(id) = txl.on_request(&opt, flow(Transport::Udp), t0) else {
        panic!("new transaction expected");
    };
    assert_eq!(
        txl.on_request(&opt, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    assert!(drain(&mut txl).is_empty(), "Trying absorbs silently");
    txl.respond(id, 200, Bytes::from_static(b"200"), t0);
    drain(&mut txl);
    assert_eq!(
        txl.on_request(&opt, flow(Transport::Udp), t0),
        ServerOutcome::Absorbed
    );
    assert_eq!(drain(&mut txl).len(), 1, "Completed resends the final");
    let (_, events) = advance(&mut txl, t0 + 64 * T1 - Duration::from_millis(1));
    assert!(events.is_empty());
    let (_, events) = advance(&mut txl, t0 + 64 * T1);
    assert!(matches!(events[..], [TxEvent::ServerGone(_)]));
}

#[test]
fn cancel_and_ack_match_the_invite_transaction() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let inv = request("INVITE", "z9hG4bKs6");
    let ServerOutcome::New(id) = txl.on_request(&inv, flow(Transport::Udp), t0) else {
        panic!("new transaction expected");
    };
    let cancel = request("CANCEL", "z9hG4bKs6");
    assert_eq!(txl.invite_for_cancel(&cancel), Some(id));
    assert!(
        matches!(txl.on_request(&cancel, flow(Transport::Udp), t0), ServerOutcome::New(c) if c != id)
    );
    let stray_ack = request("ACK", "z9hG4bKother");
    assert_eq!(
        txl.on_request(&stray_ack, flow(Transport::Udp), t0),
        ServerOutcome::AckToCore
    );
}

#[test]
fn transport_error_ends_a_waiting_client_transaction() {
    let t0 = Instant::now();
    let mut txl = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKc8").serialize();
    let id = txl.start_client(req, Method::Invite, "z9hG4bKc8", dest(), true, t0);
    assert!(txl.transport_error(id));
    assert!(txl.is_empty());
    assert!(!txl.transport_error(id), "reported once");
}
