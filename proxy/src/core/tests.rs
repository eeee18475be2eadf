//! The proxy pipeline driven without sockets or real time.

// A test chooses where its manual clock starts and draws scratch-file names.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::config::DEFAULT_FAILOVER;
use crate::flow::Transport;

const GW: &str = "192.0.2.1";
const UAS: &str = "198.51.100.20:5060";
const UAS_TCP: &str = "198.51.100.21:5060";
const UAS_V6: &str = "[2001:db8::20]:5060";

fn config() -> CoreConfig {
    let mut routes = RouteTable::default();
    let target = |uri: &str, addr: &str, transport| Route {
        uri: uri.into(),
        dest: Destination::Addr {
            transport,
            addr: addr.parse().unwrap(),
            server_name: None,
        },
    };
    routes.add_aor(
        "vpn",
        "org.example",
        target("sip:vpn@198.51.100.20:5060", UAS, Transport::Udp),
    );
    routes.add_aor(
        "tcp",
        "org.example",
        target(
            "sip:tcp@198.51.100.21:5060;transport=tcp",
            UAS_TCP,
            Transport::Tcp,
        ),
    );
    routes.add_aor(
        "v6",
        "org.example",
        target("sip:v6@[2001:db8::20]:5060", UAS_V6, Transport::Udp),
    );
    // A partner domain named by host: located through DNS (RFC 3263) for each request.
    routes.add_domain(
        "partner.example",
        Route {
            uri: "sip:partner.example".into(),
            dest: crate::config::route::destination_of(
                &crate::sip::Uri::parse("sip:partner.example").unwrap(),
                None,
            ),
        },
    );
    CoreConfig {
        domains: vec!["org.example".into()],
        aliases: Vec::new(),
        locals: vec![
            LocalAddr::new(Transport::Udp, format!("{GW}:5060").parse().unwrap(), None),
            LocalAddr::new(Transport::Tcp, format!("{GW}:5060").parse().unwrap(), None),
            LocalAddr::new(Transport::Udp, "[2001:db8::1]:5060".parse().unwrap(), None),
        ],
        routes,
        trusted: vec!["203.0.113.0/24".parse().unwrap()],
        limits: Limits::default(),
        max_transactions: 1000,
        timers: TimerConfig {
            timer_c: Duration::from_secs(20),
            ..TimerConfig::default()
        },
        failover: crate::config::DEFAULT_FAILOVER,
        dead_address: crate::config::DEFAULT_DEAD_ADDRESS,
        dialog_key: [7; 32],
        auth: crate::config::AuthSettings::defaults("org.example"),
        registrar: crate::config::RegistrarSettings::default(),
        auth_secret: [7; 32],
        tunnels: crate::config::TunnelSettings::default(),
        policy: std::sync::Arc::new(gatehouse_policy::Policy::trusted_only()),
        rate_limit: Default::default(),
        hide_topology: false,
        balancers: Vec::new(),
        peer_uri: None,
        shared_store: false,
        crossover: None,
        seed: [5; 32],
    }
}

fn caller_flow() -> Flow {
    Flow {
        transport: Transport::Udp,
        local: format!("{GW}:5060").parse().unwrap(),
        remote: "203.0.113.5:5062".parse().unwrap(),
        conn: None,
    }
}

fn uas_flow() -> Flow {
    Flow {
        transport: Transport::Udp,
        local: format!("{GW}:5060").parse().unwrap(),
        remote: UAS.parse().unwrap(),
        conn: None,
    }
}

fn invite(user: &str) -> String {
    format!(
        "INVITE sip:{user}@org.example SIP/2.0\r\n\
Via: SIP/2.0/UDP caller.example:5060;branch=z9hG4bKcaller1;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@partner.example>;tag=ft1\r\n\
To: <sip:{user}@org.example>\r\n\
Call-ID: call-1@partner.example\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@203.0.113.5:5062>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n"
    )
}

struct Harness {
    proxy: Proxy,
    now: Instant,
    /// The store the proxy started from, taking its writes as the driver's storage worker
    /// would (before the transmits of the same batch are collected).
    store: Option<crate::store::Store>,
    /// Every write the proxy handed out, in order.
    written: Vec<crate::store::StoreWrite>,
}

#[derive(Debug)]
struct Sent {
    dest: Destination,
    text: String,
    tx: Option<TxId>,
}

impl Sent {
    fn msg(&self) -> Message {
        Message::parse(Bytes::from(self.text.clone()), &Limits::default()).unwrap()
    }
    fn status(&self) -> Option<u16> {
        self.msg().status()
    }
    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }
    /// The branch parameter of the top Via.
    fn branch(&self) -> String {
        let via = self.msg().top_via_value().unwrap().into_owned();
        Via::parse(&via).unwrap().branch().unwrap().to_owned()
    }
}

impl Harness {
    fn new() -> Self {
        Harness {
            proxy: new_proxy(config()),
            now: Instant::now(),
            store: None,
            written: Vec::new(),
        }
    }

    /// A proxy started from `store`'s snapshot, its writes applied to `store`.
    fn on(cfg: crate::core::CoreConfig, store: crate::store::Store) -> Self {
        let mut h = Harness::new();
        h.boot(cfg, store);
        h
    }

    /// Replaces the proxy by one started from `store` (a restart).
    fn boot(&mut self, cfg: crate::core::CoreConfig, mut store: crate::store::Store) {
        let clock = crate::wall_clock();
        let snapshot = store.snapshot(clock.unix(clock.instant)).unwrap();
        self.proxy = Proxy::new(cfg, snapshot, clock);
        self.store = Some(store);
    }

    fn send(&mut self, text: &str, flow: Flow) -> Vec<Sent> {
        self.proxy
            .handle_message(Bytes::from(text.to_owned()), flow, self.now);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Sent> {
        // The authorisation invariant holds after every step the core takes.
        assert_eq!(
            self.proxy.authorization_violations(),
            0,
            "a branch went where no clearance names"
        );
        if let Some(batch) = self.proxy.take_writes() {
            if let Some(store) = &mut self.store {
                store.apply(&batch.writes).unwrap();
            }
            self.written.extend(batch.writes);
        }
        std::iter::from_fn(|| self.proxy.poll_transmit())
            .map(|t| Sent {
                dest: t.dest,
                text: String::from_utf8(t.bytes.to_vec()).unwrap(),
                tx: t.tx,
            })
            .collect()
    }

    fn advance(&mut self, d: Duration) -> Vec<Sent> {
        let until = self.now + d;
        let mut out = Vec::new();
        while let Some(at) = self.proxy.poll_timeout() {
            if at > until {
                break;
            }
            self.now = at;
            self.proxy.handle_timeout(at);
            out.extend(self.drain());
        }
        self.now = until;
        out
    }

    /// Sends the INVITE and returns (upstream messages, the forwarded INVITE).
    fn forward_invite(&mut self, user: &str) -> (Vec<Sent>, Sent) {
        let out = self.send(&invite(user), caller_flow());
        let (up, mut down): (Vec<_>, Vec<_>) = out
            .into_iter()
            .partition(|s| matches!(s.dest, Destination::Flow(_)));
        assert_eq!(down.len(), 1, "one forwarded request: {down:?} {up:?}");
        (up, down.remove(0))
    }
}

impl Harness {
    /// Sets up the dialog of `invite(user)`: the INVITE forwarded, the UAS's 200 (its Contact
    /// the forwarded Request-URI) relayed back. Returns the forwarded INVITE (whose
    /// Record-Route is the callee's route set) and the 200 the caller got (whose Record-Route,
    /// reversed, is the caller's).
    fn establish(&mut self, user: &str) -> (Sent, Sent) {
        let (_, fwd) = self.forward_invite(user);
        let ruri = fwd.msg().request_uri().unwrap().into_owned();
        let ok = answer(&fwd, 200, "OK", "").replace(
            "Contact: <sip:vpn@198.51.100.20:5060>",
            &format!("Contact: <{ruri}>"),
        );
        let out = self.send(&ok, uas_flow());
        let ok = out
            .into_iter()
            .find(|s| s.status() == Some(200))
            .expect("the 200 is relayed to the caller");
        (fwd, ok)
    }
}

/// The caller's route set from the 2xx it got (Record-Route reversed), as a Route line.
fn caller_route(ok: &Sent) -> String {
    let mut rr = ok.msg().list_values(HeaderName::RecordRoute);
    rr.reverse();
    format!("Route: {}\r\n", rr.join(", "))
}

/// A response from the UAS to the forwarded request.
fn answer(fwd: &Sent, status: u16, reason: &str, extra: &str) -> String {
    let m = fwd.msg();
    let mut s = format!("SIP/2.0 {status} {reason}\r\n");
    for (i, h) in m.headers() {
        if matches!(
            h.name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::CallId
                | HeaderName::CSeq
                | HeaderName::RecordRoute
        ) {
            s.push_str(&format!("{}: {}\r\n", h.name.canonical(), m.value(i)));
        }
        if h.name == HeaderName::To {
            s.push_str(&format!("To: {};tag=uas1\r\n", m.value(i)));
        }
    }
    s.push_str(extra);
    s.push_str("Contact: <sip:vpn@198.51.100.20:5060>\r\nContent-Length: 0\r\n\r\n");
    s
}

/// Issue 21 item 4: the gateway's own addresses are "us" (Kamailio's `myself`). An OPTIONS to
/// `sip:ping@<its address>` is answered by the gateway (it was 403, relaying denied), and an
/// INVITE to `sip:vpn@<its address>` is routed as `sip:vpn@org.example`; another port is not
/// the gateway.
#[test]
fn the_gateways_own_addresses_are_its_domains() {
    let mut h = Harness::new();
    let options = invite("vpn")
        .replace("INVITE sip:vpn@org.example", "OPTIONS sip:ping@192.0.2.1")
        .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
    let out = h.send(&options, caller_flow());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].status(), Some(200), "{}", out[0].text);
    let to_address = invite("vpn").replacen(
        "INVITE sip:vpn@org.example",
        "INVITE sip:vpn@192.0.2.1:5060",
        1,
    );
    let out = h.send(&to_address, caller_flow());
    let fwd = out
        .iter()
        .find(|s| s.first_line().starts_with("INVITE"))
        .expect("routed like sip:vpn@org.example");
    assert_eq!(
        fwd.msg().request_uri().unwrap(),
        "sip:vpn@198.51.100.20:5060"
    );
    let elsewhere = invite("vpn")
        .replacen(
            "INVITE sip:vpn@org.example",
            "INVITE sip:vpn@192.0.2.1:5999",
            1,
        )
        .replace("z9hG4bKcaller1", "z9hG4bKcaller2");
    let out = h.send(&elsewhere, caller_flow());
    assert_eq!(out[0].status(), Some(403), "{}", out[0].text);
}

#[test]
fn trusted_invite_is_relayed_with_via_record_route_and_100_trying() {
    let mut h = Harness::new();
    let (up, fwd) = h.forward_invite("vpn");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].status(), Some(100));
    assert_eq!(
        up[0].dest,
        Destination::Flow(caller_flow()),
        "rport: back to the source port"
    );
    let m = fwd.msg();
    assert_eq!(m.request_uri().unwrap(), "sip:vpn@198.51.100.20:5060");
    assert_eq!(
        fwd.dest,
        Destination::Addr {
            transport: Transport::Udp,
            addr: UAS.parse().unwrap(),
            server_name: None
        }
    );
    let vias = m.list_values(HeaderName::Via);
    assert!(
        vias[0].starts_with("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK"),
        "{vias:?}"
    );
    assert_eq!(
        vias[1],
        "SIP/2.0/UDP caller.example:5060;branch=z9hG4bKcaller1;received=203.0.113.5;rport=5062"
    );
    assert_eq!(m.max_forwards(), Some(69));
    let rr = m.list_values(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 1, "same transport and family: one Record-Route");
    assert!(rr[0].starts_with("<sip:192.0.2.1:5060;lr;gh="), "{rr:?}");
    assert_eq!(m.body(), b"v=0\n");
    assert!(fwd.tx.is_some());
}

#[test]
fn untrusted_source_is_challenged() {
    let mut h = Harness::new();
    let mut flow = caller_flow();
    flow.remote = "192.0.2.200:5060".parse().unwrap();
    let out = h.send(&invite("vpn"), flow);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 407 Proxy Authentication Required"
    );
    assert!(
        out[0]
            .text
            .contains("Proxy-Authenticate: SASL realm=\"org.example\", mech=\"SCRAM-SHA-256\"\r\n"),
        "no -PLUS offered over UDP: {}",
        out[0].text
    );
}

#[test]
fn pipeline_refusals_have_their_status_codes() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "Max-Forwards: 70",
            "Max-Forwards: 0",
            "SIP/2.0 483 Too Many Hops",
        ),
        (
            "INVITE sip:vpn@org.example",
            "INVITE tel:+15551234",
            "SIP/2.0 416 Unsupported URI Scheme",
        ),
        (
            "Max-Forwards: 70",
            "Max-Forwards: 70\r\nProxy-Require: foo, bar",
            "SIP/2.0 420 Bad Extension",
        ),
        (
            "INVITE sip:vpn@org.example",
            "INVITE sip:nobody@org.example",
            "SIP/2.0 480 Temporarily Unavailable",
        ),
        (
            "INVITE sip:vpn@org.example",
            "INVITE sip:x@elsewhere.example",
            "SIP/2.0 403 Forbidden (relaying denied)",
        ),
        (
            "INVITE sip:vpn@org.example",
            "INVITE sip:org.example",
            "SIP/2.0 501 Not Implemented",
        ),
    ];
    for (from, to, expect) in cases {
        let mut h = Harness::new();
        let out = h.send(&invite("vpn").replace(from, to), caller_flow());
        assert_eq!(out.len(), 1, "{expect}: {out:?}");
        assert_eq!(out[0].first_line(), expect);
        if expect.contains("420") {
            assert!(
                out[0].text.contains("Unsupported: foo, bar\r\n"),
                "{}",
                out[0].text
            );
        }
        assert!(
            out[0].msg().tag(HeaderName::To).is_some(),
            "final responses carry a To tag"
        );
    }
}

#[test]
fn malformed_request_gets_400_naming_the_fault_and_malformed_response_is_dropped() {
    let mut h = Harness::new();
    let out = h.send(
        &invite("vpn").replace("Call-ID: call-1@partner.example\r\n", ""),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 400 Bad Request (missing Call-ID)"
    );
    // RFC 3261 8.2.6.2: the gateway's final responses carry a To tag, stateless ones too.
    assert!(
        out[0].text.contains("\r\nTo: <sip:vpn@org.example>;tag=gh"),
        "{}",
        out[0].text
    );
    let out = h.send(
        &invite("vpn").replace("CSeq: 1 INVITE", "CSeq: x INVITE"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 400 Bad Request (malformed CSeq)"
    );
    let out = h.send(
        &invite("vpn").replace("Max-Forwards: 70", "Max-Forwards: many"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 400 Bad Request (malformed Max-Forwards)"
    );
    let out = h.send(
        &invite("vpn").replace("SIP/2.0\r\n", "SIP/3.0\r\n"),
        caller_flow(),
    );
    assert_eq!(out[0].first_line(), "SIP/2.0 505 Version Not Supported");
    let out = h.send("SIP/2.0 200 OK\r\nVia: nonsense\r\n\r\n", uas_flow());
    assert!(out.is_empty());
    assert_eq!(h.proxy.stats.malformed_responses_dropped, 1);
}

#[test]
fn loop_is_detected_but_a_spiral_is_not() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("vpn");
    // The same request coming back unchanged (same Request-URI) is a loop.
    // Each time the request comes back through a next hop, that hop's Via is on top.
    let via_of_hop =
        |n: u32| format!("SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKhop{n}\r\n");
    let looped = fwd
        .text
        .replace(
            "INVITE sip:vpn@198.51.100.20:5060",
            "INVITE sip:vpn@org.example",
        )
        .replacen("SIP/2.0\r\n", &via_of_hop(1), 1);
    let out = h.send(&looped, caller_flow());
    assert_eq!(out[0].first_line(), "SIP/2.0 482 Loop Detected");
    // Coming back with another Request-URI is a spiral: forwarded again.
    let spiral = fwd
        .text
        .replace(
            "INVITE sip:vpn@198.51.100.20:5060",
            "INVITE sip:tcp@org.example",
        )
        .replacen("SIP/2.0\r\n", &via_of_hop(2), 1);
    let out = h.send(&spiral, caller_flow());
    assert!(
        out.iter()
            .any(|s| s.first_line().starts_with("INVITE sip:tcp@198.51.100.21")),
        "{out:?}"
    );
}

#[test]
fn responses_are_relayed_without_our_via() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("vpn");
    let out = h.send(&answer(&fwd, 180, "Ringing", ""), uas_flow());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].first_line(), "SIP/2.0 180 Ringing");
    assert_eq!(out[0].dest, Destination::Flow(caller_flow()));
    let vias = out[0].msg().list_values(HeaderName::Via);
    assert_eq!(vias.len(), 1);
    assert!(vias[0].contains("branch=z9hG4bKcaller1"));
    let out = h.send(&answer(&fwd, 200, "OK Fine", "X-Keep: me\r\n"), uas_flow());
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 200 OK Fine",
        "reason phrase kept"
    );
    assert!(out[0].text.contains("X-Keep: me\r\n"));
    assert!(out[0]
        .text
        .contains("Record-Route: <sip:192.0.2.1:5060;lr;gh="));
}

#[test]
fn error_response_is_acked_downstream_and_relayed() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("vpn");
    let out = h.send(&answer(&fwd, 486, "Busy Here", ""), uas_flow());
    let ack = out
        .iter()
        .find(|s| s.first_line().starts_with("ACK "))
        .expect("ACK downstream");
    assert!(matches!(ack.dest, Destination::Addr { .. }));
    let relayed = out
        .iter()
        .find(|s| s.first_line().starts_with("SIP/2.0 486"))
        .expect("486 upstream");
    assert_eq!(relayed.dest, Destination::Flow(caller_flow()));
}

#[test]
fn timer_c_without_provisional_gives_408() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("tcp");
    assert!(matches!(
        fwd.dest,
        Destination::Addr {
            transport: Transport::Tcp,
            ..
        }
    ));
    let out = h.advance(Duration::from_secs(20));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].first_line(), "SIP/2.0 408 Request Timeout");
}

#[test]
fn timer_c_after_provisional_cancels_the_branch_and_gives_408() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("vpn");
    h.send(&answer(&fwd, 180, "Ringing", ""), uas_flow());
    let out = h.advance(Duration::from_secs(20));
    let cancel = out
        .iter()
        .find(|s| s.first_line().starts_with("CANCEL "))
        .expect("CANCEL downstream");
    let fwd_branch = fwd.msg().top_via_value().unwrap().into_owned();
    assert_eq!(
        cancel.msg().top_via_value().unwrap(),
        fwd_branch,
        "CANCEL reuses the INVITE's Via"
    );
    assert!(out
        .iter()
        .any(|s| s.first_line() == "SIP/2.0 408 Request Timeout"));
    // The UAS answers 487 later: it is ACKed, not relayed (the caller has its 408).
    let out = h.send(&answer(&fwd, 487, "Request Terminated", ""), uas_flow());
    assert!(
        out.iter().all(|s| !s.first_line().starts_with("SIP/2.0")),
        "{out:?}"
    );
}

#[test]
fn unanswered_udp_invite_times_out_with_408_on_timer_b() {
    let mut h = Harness::new();
    h.proxy.cfg.timers.timer_c = Duration::from_secs(180);
    h.proxy = new_proxy(CoreConfig {
        timers: TimerConfig::default(),
        ..config()
    });
    let (_, _) = h.forward_invite("vpn");
    let out = h.advance(Duration::from_secs(32));
    let retrans = out
        .iter()
        .filter(|s| s.first_line().starts_with("INVITE"))
        .count();
    assert_eq!(retrans, 6, "Timer A retransmissions");
    assert_eq!(
        out.last().unwrap().first_line(),
        "SIP/2.0 408 Request Timeout"
    );
}

#[test]
fn unreachable_next_hop_gives_503() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("tcp");
    h.proxy.handle_transport_error(fwd.tx.unwrap(), h.now);
    let out = h.drain();
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 503 Service Unavailable (next hop unreachable)"
    );
}

/// The CANCEL of an INVITE built by [`invite`].
fn cancel_of(invite: &str) -> String {
    invite
        .replace("INVITE sip", "CANCEL sip")
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL")
        .replace(
            "Content-Length: 4\r\n\r\nv=0\n",
            "Content-Length: 0\r\n\r\n",
        )
}

/// The DNS answer for a named next hop, as the driver would give it.
fn located(transport: Transport, addr: &str) -> Destination {
    Destination::Addr {
        transport,
        addr: addr.parse().unwrap(),
        server_name: Some("partner.example".into()),
    }
}

#[test]
fn a_named_next_hop_waits_for_dns_then_fails_over_along_its_answer() {
    let mut h = Harness::new();
    let out = h.send(
        &invite("bob").replace("@org.example", "@partner.example"),
        caller_flow(),
    );
    // 100 Trying only: nothing is sent before DNS answers.
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].first_line(), "SIP/2.0 100 Trying");
    let lookup = h.proxy.poll_lookup().expect("a DNS question");
    assert_eq!(lookup.query.host, "partner.example");
    assert_eq!((lookup.query.port, lookup.query.transport), (None, None));
    assert!(h.proxy.poll_lookup().is_none());
    // Two addresses: TCP first (as a NAPTR might order it), then UDP.
    h.proxy.handle_located(
        lookup.id,
        Ok(vec![
            located(Transport::Tcp, "198.51.100.30:5060"),
            located(Transport::Udp, "198.51.100.31:5070"),
        ]),
        h.now,
    );
    let out = h.drain();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, located(Transport::Tcp, "198.51.100.30:5060"));
    assert_eq!(
        out[0].first_line(),
        "INVITE sip:bob@partner.example SIP/2.0"
    );
    assert!(out[0]
        .msg()
        .top_via_value()
        .unwrap()
        .starts_with("SIP/2.0/TCP"));
    // The connection is refused: the same request goes to the next address, as a new
    // branch with the Via of its transport.
    h.proxy.handle_transport_error(out[0].tx.unwrap(), h.now);
    let out = h.drain();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, located(Transport::Udp, "198.51.100.31:5070"));
    let via = out[0].msg().top_via_value().unwrap().into_owned();
    assert!(via.starts_with("SIP/2.0/UDP"), "{via}");
    // Answered there: the caller gets it.
    let out = h.send(
        &answer(&out[0], 200, "OK", ""),
        uas_at("198.51.100.31:5070"),
    );
    assert!(
        out.iter().any(|s| s.first_line() == "SIP/2.0 200 OK"),
        "{out:?}"
    );
    assert_eq!(h.proxy.lookups.stats.failovers, 1);
    assert_eq!(h.proxy.lookups.stats.resolved, 1);
}

/// An INVITE from the caller to bob at partner.example (a name: DNS is asked).
fn partner_invite(call: &str, branch: &str) -> String {
    invite("bob")
        .replace("@org.example", "@partner.example")
        .replace("call-1@", call)
        .replace("z9hG4bKcaller1", branch)
}

/// The UAS answering from `addr`.
fn uas_at(addr: &str) -> Flow {
    Flow {
        remote: addr.parse().unwrap(),
        ..uas_flow()
    }
}

/// DNS's answer for partner.example: two UDP addresses.
fn two_addresses() -> Vec<Destination> {
    vec![
        located(Transport::Udp, "198.51.100.30:5060"),
        located(Transport::Udp, "198.51.100.31:5070"),
    ]
}

/// Answers the pending DNS question with `hops`; what the proxy sends then.
fn answer_lookup(h: &mut Harness, hops: Vec<Destination>) -> Vec<Sent> {
    let lookup = h.proxy.poll_lookup().expect("a DNS question");
    h.proxy.handle_located(lookup.id, Ok(hops), h.now);
    h.drain()
}

/// An INVITE to partner.example whose DNS answer is two UDP addresses; returns the INVITE
/// sent to the first.
fn invite_located_twice(h: &mut Harness, call: &str) -> Sent {
    h.send(&partner_invite(call, "z9hG4bKcaller1"), caller_flow());
    let out = answer_lookup(h, two_addresses());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, two_addresses()[0]);
    out.into_iter().next().unwrap()
}

#[test]
fn a_silent_next_hop_is_failed_over_after_failover_ms_not_timer_b() {
    let mut h = Harness::new();
    let first = invite_located_twice(&mut h, "call-silent@");
    // Silent for just under failover_ms: only the INVITE's own retransmissions (T1, 2·T1).
    let out = h.advance(DEFAULT_FAILOVER - Duration::from_millis(1));
    assert!(
        out.iter()
            .all(|s| s.dest == first.dest && s.first_line().starts_with("INVITE")),
        "{out:?}"
    );
    // Then the request goes to the next address as a new branch...
    let out = h.advance(Duration::from_millis(1));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, located(Transport::Udp, "198.51.100.31:5070"));
    assert_ne!(out[0].branch(), first.branch());
    assert_eq!(h.proxy.lookups.stats.failovers, 1);
    let second = out.into_iter().next().unwrap();
    // ...and the first is abandoned: no more retransmissions to it, and a late answer from
    // it is not relayed.
    let late = h.send(
        &answer(&first, 180, "Ringing", ""),
        uas_at("198.51.100.30:5060"),
    );
    assert!(late.is_empty(), "{late:?}");
    let out = h.send(
        &answer(&second, 200, "OK", ""),
        uas_at("198.51.100.31:5070"),
    );
    assert!(
        out.iter().any(|s| s.first_line() == "SIP/2.0 200 OK"),
        "{out:?}"
    );
    let out = h.advance(Duration::from_secs(40));
    assert!(
        out.iter().all(|s| s.dest != first.dest),
        "the abandoned branch still sends: {out:?}"
    );
}

#[test]
fn an_address_that_failed_is_tried_last_by_the_next_calls_until_it_answers() {
    let mut h = Harness::new();
    let first = invite_located_twice(&mut h, "call-a@");
    h.advance(DEFAULT_FAILOVER);
    assert_eq!(h.proxy.lookups.dead.len(), 1);
    // The next call with the same answer starts at the address that works.
    h.send(&partner_invite("call-b@", "z9hG4bKcaller2"), caller_flow());
    let out = answer_lookup(&mut h, two_addresses());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, located(Transport::Udp, "198.51.100.31:5070"));
    // It fails too: the one that failed first is still there to fail over to.
    h.proxy.handle_transport_error(out[0].tx.unwrap(), h.now);
    let out = h.drain();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].dest, first.dest);
    // It answers: alive again (and the other, refused, stays dead).
    h.send(
        &answer(&out[0], 100, "Trying", ""),
        uas_at("198.51.100.30:5060"),
    );
    assert_eq!(h.proxy.lookups.dead.len(), 1);
    let mut hops = std::collections::VecDeque::from([
        located(Transport::Udp, "198.51.100.31:5070"),
        located(Transport::Udp, "198.51.100.30:5060"),
    ]);
    h.proxy.lookups.dead.order(&mut hops, h.now);
    assert_eq!(hops[0], first.dest);
}

#[test]
fn a_next_hop_that_sent_100_trying_is_not_failed_over() {
    let mut h = Harness::new();
    let first = invite_located_twice(&mut h, "call-trying@");
    let out = h.send(
        &answer(&first, 100, "Trying", ""),
        uas_at("198.51.100.30:5060"),
    );
    assert!(out.is_empty(), "a 100 is not relayed: {out:?}");
    let out = h.advance(DEFAULT_FAILOVER * 2);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.proxy.lookups.stats.failovers, 0);
    let out = h.send(&answer(&first, 200, "OK", ""), uas_at("198.51.100.30:5060"));
    assert!(
        out.iter().any(|s| s.first_line() == "SIP/2.0 200 OK"),
        "{out:?}"
    );
}

#[test]
fn a_name_dns_does_not_know_gives_503_and_the_last_address_failing_too() {
    let mut h = Harness::new();
    h.send(
        &invite("bob").replace("@org.example", "@partner.example"),
        caller_flow(),
    );
    let lookup = h.proxy.poll_lookup().unwrap();
    h.proxy.handle_located(
        lookup.id,
        Err(locate::LocateError("partner.example: no such name".into())),
        h.now,
    );
    let out = h.drain();
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 503 Service Unavailable (next hop not found in DNS)"
    );
    // One address, unreachable: the branch's own 503.
    let mut h = Harness::new();
    h.send(
        &invite("bob")
            .replace("@org.example", "@partner.example")
            .replace("call-1@", "call-2@"),
        caller_flow(),
    );
    let lookup = h.proxy.poll_lookup().unwrap();
    h.proxy.handle_located(
        lookup.id,
        Ok(vec![located(Transport::Tcp, "198.51.100.30:5060")]),
        h.now,
    );
    let out = h.drain();
    h.proxy.handle_transport_error(out[0].tx.unwrap(), h.now);
    let out = h.drain();
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 503 Service Unavailable (next hop unreachable)"
    );
}

#[test]
fn a_call_cancelled_while_dns_is_asked_ends_with_487_and_the_answer_is_dropped() {
    let mut h = Harness::new();
    let inv = invite("bob").replace("@org.example", "@partner.example");
    h.send(&inv, caller_flow());
    let lookup = h.proxy.poll_lookup().unwrap();
    let cancel = cancel_of(&inv);
    let out = h.send(&cancel, caller_flow());
    assert!(
        out.iter()
            .any(|s| s.first_line() == "SIP/2.0 487 Request Terminated"),
        "{out:?}"
    );
    h.proxy.handle_located(
        lookup.id,
        Ok(vec![located(Transport::Udp, "198.51.100.31:5070")]),
        h.now,
    );
    assert!(h.drain().is_empty(), "nothing is sent after the 487");
}

#[test]
fn cancel_is_answered_and_relayed_after_a_provisional() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("vpn");
    let cancel = cancel_of(&invite("vpn"));
    // Before any provisional: 200 to the CANCEL, CANCEL held back (RFC 3261 9.1).
    let out = h.send(&cancel, caller_flow());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].first_line(), "SIP/2.0 200 OK");
    assert_eq!(out[0].msg().cseq().method, "CANCEL");
    let out = h.send(&answer(&fwd, 180, "Ringing", ""), uas_flow());
    assert!(
        out.iter()
            .any(|s| s.first_line().starts_with("CANCEL sip:vpn@198.51.100.20")),
        "{out:?}"
    );
    let out = h.send(&answer(&fwd, 487, "Request Terminated", ""), uas_flow());
    assert!(
        out.iter()
            .any(|s| s.first_line() == "SIP/2.0 487 Request Terminated"),
        "{out:?}"
    );
}

#[test]
fn cancel_for_unknown_transaction_gets_481() {
    let mut h = Harness::new();
    let out = h.send(&cancel_of(&invite("vpn")), caller_flow());
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
}

fn in_dialog(method: &str, route: &str) -> String {
    format!(
        "{method} sip:vpn@198.51.100.20:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.5:5062;branch=z9hG4bKindlg{method}\r\n\
Max-Forwards: 70\r\n\
{route}\
From: <sip:alice@partner.example>;tag=ft1\r\n\
To: <sip:vpn@org.example>;tag=uas1\r\n\
Call-ID: call-1@partner.example\r\n\
CSeq: 2 {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn in_dialog_requests_follow_a_signed_route_only() {
    let mut h = Harness::new();
    let (_, ok) = h.establish("vpn");
    let route = caller_route(&ok);
    let out = h.send(&in_dialog("INFO", &route), caller_flow());
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0]
        .first_line()
        .starts_with("INFO sip:vpn@198.51.100.20:5060"));
    assert!(
        !out[0].text.contains("Route:"),
        "our Route entry is consumed"
    );
    assert_eq!(
        out[0].dest,
        Destination::Addr {
            transport: Transport::Udp,
            addr: UAS.parse().unwrap(),
            server_name: None
        }
    );

    let forged = route.replace("gh=", "gh=00");
    let out = h.send(
        &in_dialog("BYE", &forged).replace("indlgBYE", "forged"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
    let out = h.send(
        &in_dialog("BYE", "").replace("indlgBYE", "noroute"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
}

/// Issue 18, item 2: a dialog's Route entry is not a bearer token. With the MAC of a live
/// dialog, a request may go to that dialog's peer only — not to another host (UDP or TCP: a
/// port scanner), not to another user of the same host, not through a Route of the sender's
/// choosing — carries no WireGuard offer, and once the dialog ended (BYE), nothing passes.
#[test]
fn a_dialogs_route_reaches_its_peer_only_and_only_while_it_lives() {
    let mut h = Harness::new();
    let (fwd, ok) = h.establish("vpn");
    let route = caller_route(&ok);
    let refused = |h: &mut Harness, text: String, code: &str| {
        let out = h.send(&text, caller_flow());
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].first_line().starts_with(code), "{}", out[0].text);
    };
    // Another host, over UDP and TCP.
    for (n, target) in [
        "sip:x@192.0.2.99:5060",
        "sip:x@192.0.2.99:22;transport=tcp",
        "sip:vpn@198.51.100.20:5061",
        "sip:x@partner.example",
    ]
    .iter()
    .enumerate()
    {
        let text = in_dialog("OPTIONS", &route)
            .replace(
                "OPTIONS sip:vpn@198.51.100.20:5060",
                &format!("OPTIONS {target}"),
            )
            .replace("indlgOPTIONS", &format!("host{n}"));
        refused(
            &mut h,
            text,
            "SIP/2.0 403 Forbidden (not this dialog's peer)",
        );
    }
    // A Route of the sender's after ours.
    let text = in_dialog(
        "MESSAGE",
        &route.replace("\r\n", ", <sip:192.0.2.99;lr>\r\n"),
    );
    refused(
        &mut h,
        text,
        "SIP/2.0 403 Forbidden (not this dialog's peer)",
    );
    // A re-INVITE with a WireGuard offer: only a new INVITE offers a tunnel.
    let reinvite = in_dialog("INVITE", &route).replace(
        "Content-Length: 0\r\n\r\n",
        "Content-Type: application/sdp\r\nContent-Length: 14\r\n\r\nm=application \n",
    );
    let reinvite = reinvite.replace("m=application \n", "vnd.wireguard\n");
    refused(&mut h, reinvite, "SIP/2.0 488");
    // The callee's entry (from the INVITE) names the caller's side: the callee reaches the
    // caller with it, the caller cannot use it to reach anything else.
    let callee_rr = fwd.msg().list_values(HeaderName::RecordRoute)[0].clone();
    let text = in_dialog("INFO", &format!("Route: {callee_rr}\r\n")).replace("indlgINFO", "swap");
    refused(
        &mut h,
        text,
        "SIP/2.0 403 Forbidden (not this dialog's peer)",
    );
    // The BYE passes and ends the dialog: the same entry admits nothing afterwards.
    let out = h.send(&in_dialog("BYE", &route), caller_flow());
    assert!(out[0]
        .first_line()
        .starts_with("BYE sip:vpn@198.51.100.20:5060"));
    let text = in_dialog("INFO", &route).replace("indlgINFO", "after");
    refused(&mut h, text, "SIP/2.0 481");
    let ack = in_dialog("ACK", &route).replace("indlgACK", "afterack");
    assert!(
        h.send(&ack, caller_flow()).is_empty(),
        "a stateless ACK goes nowhere either"
    );
    // Nor does another call's Call-ID or tag fit the entry.
    let text = in_dialog("INFO", &route).replace("call-1@", "call-9@");
    refused(&mut h, text, "SIP/2.0 481");
}

/// A Route entry another gateway of the cluster signed (its address, the shared key): the
/// balancer brought the request here because that gateway died. It is ours to verify and pop;
/// the BYE goes on to the endpoint and, the tunnel not being in this table, its row leaves the
/// shared store. A peer's address with a wrong MAC is no dialog of the cluster's.
#[test]
fn a_cluster_peers_signed_route_is_followed() {
    let mut cfg = config();
    cfg.shared_store = true;
    let mut h = Harness::new();
    h.proxy = new_proxy(cfg);
    // What the dead gateway wrote into the caller's route set: the endpoint's side, sealed
    // and signed with the cluster's key.
    let token = super::admission::hop_token(
        &super::topology::TopologyKey::derive(&[7; 32]),
        "sip:vpn@198.51.100.20:5060",
        Some("uas1"),
        false,
    );
    let mac = super::admission::dialog_mac(
        &super::admission::MacKey::new(&[7; 32]),
        "call-1@partner.example",
        "ft1",
        &token,
    );
    let peer = format!("Route: <sip:192.0.2.77:5060;lr;gh={mac};gd={token}>\r\n");
    let out = h.send(&in_dialog("BYE", &peer), caller_flow());
    assert!(
        out[0]
            .first_line()
            .starts_with("BYE sip:vpn@198.51.100.20:5060"),
        "{out:?}"
    );
    assert!(!out[0].text.contains("Route:"), "{}", out[0].text);
    assert!(
        h.written
            .iter()
            .filter(|w| matches!(w, crate::store::StoreWrite::DeleteTunnel { .. }))
            .count()
            == 2,
        "{:?}",
        h.written
    );
    let forged = peer.replace("gh=", "gh=00");
    let out = h.send(
        &in_dialog("BYE", &forged).replace("indlgBYE", "forged"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
}

/// A stored binding of `sip:ep@org.example`, flow held by the gateway `holder`.
fn held_binding(contact_port: u16, holder: &str, reg_id: u32) -> crate::store::BindingRecord {
    let clock = crate::wall_clock();
    crate::store::BindingRecord {
        aor: "sip:ep@org.example".into(),
        contact: format!("sip:ep@198.51.100.40:{contact_port}"),
        transport: "udp".into(),
        remote: format!("198.51.100.40:{contact_port}"),
        expires_at: clock.unix(clock.instant) + 600,
        instance: Some("<urn:uuid:ep>".into()),
        identity: "ep".into(),
        reg_id: Some(reg_id),
        holder: Some(holder.into()),
    }
}

/// RFC 5626 edge proxy across the cluster: gateway B learns from the store that gateway A
/// holds the endpoint's flow, and sends the INVITE to A with a Route naming A and the flow,
/// signed for this request; A sends it on the flow and stays in the dialog. A Route whose MAC
/// does not verify — forged, or lifted onto another request — is refused.
#[test]
fn a_binding_held_by_another_gateway_is_reached_through_it() {
    let a_uri = "sip:192.0.2.2:5060";
    let mut cfg = config();
    cfg.peer_uri = Some(format!("sip:{GW}:5060"));
    cfg.shared_store = true;
    let mut b = Harness::new();
    b.proxy = new_proxy(cfg.clone());
    b.proxy.stored_bindings(
        "sip:ep@org.example",
        vec![held_binding(5070, a_uri, 1)],
        b.now,
    );
    let (_, fwd) = b.forward_invite("ep");
    let a_addr = Destination::Addr {
        transport: Transport::Udp,
        addr: "192.0.2.2:5060".parse().unwrap(),
        server_name: None,
    };
    assert_eq!(fwd.dest, a_addr, "{}", fwd.text);
    assert!(fwd
        .first_line()
        .starts_with("INVITE sip:ep@198.51.100.40:5070 "));
    let route = fwd.msg().list_values(HeaderName::Route);
    assert!(
        route[0].starts_with("<sip:192.0.2.2:5060;lr;gf=udp:198.51.100.40:5070;gm="),
        "{route:?}"
    );

    let mut acfg = config();
    acfg.locals = vec![LocalAddr::new(
        Transport::Udp,
        "192.0.2.2:5060".parse().unwrap(),
        None,
    )];
    acfg.peer_uri = Some(a_uri.into());
    let mut a = Harness::new();
    a.proxy = new_proxy(acfg);
    let from_b = Flow {
        transport: Transport::Udp,
        local: "192.0.2.2:5060".parse().unwrap(),
        remote: format!("{GW}:5060").parse().unwrap(),
        conn: None,
    };
    let out = a.send(&fwd.text, from_b);
    let down: Vec<&Sent> = out
        .iter()
        .filter(|s| s.first_line().starts_with("INVITE"))
        .collect();
    assert_eq!(down.len(), 1, "{out:?}");
    assert_eq!(
        down[0].dest,
        Destination::Addr {
            transport: Transport::Udp,
            addr: "198.51.100.40:5070".parse().unwrap(),
            server_name: None,
        }
    );
    assert!(down[0]
        .first_line()
        .starts_with("INVITE sip:ep@198.51.100.40:5070 "));
    assert!(!down[0].text.contains("gf="), "the flow entry is consumed");
    let rr = down[0].msg().list_values(HeaderName::RecordRoute);
    assert!(rr[0].starts_with("<sip:192.0.2.2:5060;lr;gh="), "{rr:?}");
    assert!(
        rr[1].starts_with(&format!("<sip:{GW}:5060;lr;gh=")),
        "{rr:?}"
    );

    // Forged, or moved to another Call-ID: 403, nothing forwarded.
    let forged = fwd
        .text
        .replace(";gm=", ";gm=00")
        .replace("z9hG4bK", "z9hG4bKf");
    let moved = fwd
        .text
        .replace("call-1@partner.example", "call-2@partner.example")
        .replace("z9hG4bK", "z9hG4bKm");
    for bad in [forged, moved] {
        let out = a.send(&bad, from_b);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 403 Forbidden (peer route not signed by this cluster)"
        );
    }
}

/// Of a device's flows (one RFC 5627 instance), a request goes to one: the flow this gateway
/// holds, else one through a gateway still connected to the store, else the most recent.
#[test]
fn one_flow_per_device_preferring_ours_then_live_peers() {
    let mut cfg = config();
    cfg.peer_uri = Some(format!("sip:{GW}:5060"));
    let mut b = Harness::new();
    b.proxy = new_proxy(cfg);
    let aor = "sip:ep@org.example";
    // Each attempt a new transaction (its own branch and Call-ID).
    let dest_of = |h: &mut Harness, n: &str| {
        let text = invite("ep")
            .replace("z9hG4bKcaller1", &format!("z9hG4bK{}", n.replace(' ', "")))
            .replace("call-1@", &format!("call-{}@", n.replace(' ', "")));
        let out = h.send(&text, caller_flow());
        let fwd: Vec<Sent> = out
            .into_iter()
            .filter(|s| s.first_line().starts_with("INVITE"))
            .collect();
        assert_eq!(fwd.len(), 1, "one branch per device: {fwd:?}");
        fwd[0].dest.clone()
    };
    let addr = |a: &str| Destination::Addr {
        transport: Transport::Udp,
        addr: a.parse().unwrap(),
        server_name: None,
    };
    let ours = format!("sip:{GW}:5060");
    b.proxy.stored_bindings(
        aor,
        vec![
            held_binding(5070, "sip:192.0.2.2:5060", 1),
            held_binding(5071, &ours, 2),
            held_binding(5072, "sip:192.0.2.3:5060", 3),
        ],
        b.now,
    );
    assert_eq!(dest_of(&mut b, "ours"), addr("198.51.100.40:5071"));
    b.proxy.stored_bindings(
        aor,
        vec![
            held_binding(5070, "sip:192.0.2.2:5060", 1),
            held_binding(5072, "sip:192.0.2.3:5060", 3),
        ],
        b.now,
    );
    b.proxy
        .set_live_peers(["sip:192.0.2.3:5060".to_owned(), ours.clone()].into());
    assert_eq!(dest_of(&mut b, "live"), addr("192.0.2.3:5060"));
    b.proxy
        .set_live_peers(["sip:192.0.2.2:5060".to_owned(), ours].into());
    assert_eq!(dest_of(&mut b, "other live"), addr("192.0.2.2:5060"));
    b.proxy.set_live_peers(Default::default());
    let d = dest_of(&mut b, "none live");
    assert!(
        d == addr("192.0.2.2:5060") || d == addr("192.0.2.3:5060"),
        "{d:?}"
    );
}

/// On a shared store, a tunnel the local policy permits waits for the store's count against
/// the cluster's limits: nothing leaves but 100 Trying, the batch carries the tunnel's row
/// and then its reservation; within the limits it is relayed, over them refused with the
/// policy's 403 (and forgotten), and when the store does not answer in time this gateway's
/// own counts decide (counted as unverified).
#[test]
fn tunnel_limits_are_counted_by_the_shared_store_before_relaying() {
    const OFFER: &str = "v=0\r\no=- 1 1 IN IP6 2001:db8:666::666\r\ns=-\r\nc=IN IP6 2001:db8:666::666\r\nt=0 0\r\n\
m=application 57660 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=none\r\n";
    let policy = "[limits]\nmax_tunnels = 10\n[[rule]]\nname = \"t\"\nkind = \"tunnel\"\ncallers = [\"trusted\"]\n\
targets = [\"sip:vpn@org.example\"]\npskmth = [\"none\"]\nprefixes = [\"2001:db8:456::/48\"]\n\
max_tunnels_per_identity = 3\n";
    let mut cfg = config();
    cfg.shared_store = true;
    cfg.policy = std::sync::Arc::new(gatehouse_policy::Policy::parse(policy, "t").unwrap());
    let mut h = Harness::new();
    h.proxy = new_proxy(cfg);
    let tunnel = |n: u32| {
        invite("vpn")
            .replace("caller1", &format!("caller{n}"))
            .replace("call-1@", &format!("call-{n}@"))
            .replace(
                "Content-Length: 4\r\n\r\nv=0\n",
                &format!("Content-Length: {}\r\n\r\n{OFFER}", OFFER.len()),
            )
    };
    let forwarded = |out: &[Sent]| out.iter().any(|s| s.first_line().starts_with("INVITE"));

    let out = h.send(&tunnel(1), caller_flow());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].status(), Some(100));
    let kinds: Vec<&str> = h.written.iter().map(|w| w.label()).collect();
    assert_eq!(
        kinds,
        ["save_tunnel", "reserve_tunnel"],
        "the row, then its count"
    );
    assert!(matches!(
        &h.written[1],
        crate::store::StoreWrite::ReserveTunnel {
            max_total: Some(10),
            max_per_identity: Some(3),
            max_per_target: None,
            ..
        }
    ));
    h.proxy
        .reservation_outcome("call-1@partner.example", "ft1", None, h.now);
    assert!(forwarded(&h.drain()), "granted: relayed");

    let out = h.send(&tunnel(2), caller_flow());
    assert!(!forwarded(&out));
    h.proxy.reservation_outcome(
        "call-2@partner.example",
        "ft1",
        Some(gatehouse_policy::Denied::LimitIdentity),
        h.now,
    );
    let out = h.drain();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].first_line().starts_with("SIP/2.0 403"),
        "{}",
        out[0].text
    );
    assert_eq!(h.proxy.tunnel_count(), 1, "the refused tunnel is forgotten");

    let out = h.send(&tunnel(3), caller_flow());
    assert!(!forwarded(&out));
    h.now += super::reserve::WAIT;
    h.proxy.maintain(h.now);
    assert!(
        forwarded(&h.drain()),
        "the store did not answer: local counts decide"
    );
    // A late answer changes nothing.
    h.proxy.reservation_outcome(
        "call-3@partner.example",
        "ft1",
        Some(gatehouse_policy::Denied::LimitTotal),
        h.now,
    );
    assert!(h.drain().is_empty());
    let c = h.proxy.limit_checks();
    assert_eq!((c.granted, c.refused, c.unverified), (1, 1, 1));
    assert_eq!(h.proxy.parked_setups(), 0);
}

#[test]
fn ack_for_2xx_is_forwarded_statelessly_along_the_route() {
    let mut h = Harness::new();
    let (_, ok) = h.establish("vpn");
    let ack = in_dialog("ACK", &caller_route(&ok)).replace("CSeq: 2 ACK", "CSeq: 1 ACK");
    let out = h.send(&ack, caller_flow());
    assert_eq!(out.len(), 1);
    assert!(out[0]
        .first_line()
        .starts_with("ACK sip:vpn@198.51.100.20:5060"));
    assert!(out[0].tx.is_none(), "no transaction for ACK of 2xx");
    // A retransmitted ACK gets the same branch.
    let again = h.send(&ack, caller_flow());
    assert_eq!(again[0].msg().top_via_value(), out[0].msg().top_via_value());
}

#[test]
fn transport_or_family_change_doubles_record_route() {
    let mut h = Harness::new();
    let (_, fwd) = h.forward_invite("tcp");
    let rr = fwd.msg().list_values(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(
        rr[0].starts_with("<sip:192.0.2.1:5060;transport=tcp;lr;gh="),
        "outbound-facing on top: {rr:?}"
    );
    assert!(rr[1].starts_with("<sip:192.0.2.1:5060;lr;gh="), "{rr:?}");
    assert!(fwd
        .msg()
        .top_via_value()
        .unwrap()
        .starts_with("SIP/2.0/TCP 192.0.2.1:5060;"));

    let mut h = Harness::new();
    let (fwd, ok) = h.establish("v6");
    let rr = fwd.msg().list_values(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(
        rr[0].starts_with("<sip:[2001:db8::1]:5060;lr;gh="),
        "{rr:?}"
    );
    assert!(fwd
        .msg()
        .top_via_value()
        .unwrap()
        .starts_with("SIP/2.0/UDP [2001:db8::1]:5060;"));
    // An in-dialog request through both entries consumes both.
    let out = h.send(
        &in_dialog("BYE", &caller_route(&ok))
            .replace("198.51.100.20:5060", "[2001:db8::20]:5060")
            .replace("sip:vpn@", "sip:v6@"),
        caller_flow(),
    );
    assert!(
        out[0]
            .first_line()
            .starts_with("BYE sip:v6@[2001:db8::20]:5060"),
        "{out:?}"
    );
    assert!(!out[0].text.contains("Route:"));
}

#[test]
fn options_to_the_gateway_is_answered() {
    let mut h = Harness::new();
    let opt = invite("vpn")
        .replace("INVITE sip:vpn@org.example", "OPTIONS sip:192.0.2.1:5060")
        .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
    let out = h.send(&opt, caller_flow());
    assert_eq!(out[0].first_line(), "SIP/2.0 200 OK");
    assert!(out[0].text.contains("Allow: INVITE"));
    // Even from an untrusted source, and with Max-Forwards 0.
    let mut flow = caller_flow();
    flow.remote = "192.0.2.200:5060".parse().unwrap();
    let out = h.send(
        &opt.replace("Max-Forwards: 70", "Max-Forwards: 0")
            .replace("caller1", "c2"),
        flow,
    );
    assert_eq!(out[0].first_line(), "SIP/2.0 200 OK");
}

#[test]
fn retransmitted_invite_is_absorbed_and_100_resent() {
    let mut h = Harness::new();
    let (up, _) = h.forward_invite("vpn");
    let out = h.send(&invite("vpn"), caller_flow());
    assert_eq!(out.len(), 1, "no second forward: {out:?}");
    assert_eq!(out[0].text, up[0].text);
}

#[test]
fn transaction_table_is_bounded() {
    let mut h = Harness::new();
    h.proxy = new_proxy(CoreConfig {
        max_transactions: 2,
        ..config()
    });
    h.forward_invite("vpn"); // server + client transaction
    let out = h.send(
        &invite("vpn")
            .replace("caller1", "caller2")
            .replace("call-1", "call-2"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 503 Service Unavailable (overloaded)"
    );
    assert!(out[0].text.contains("Retry-After: 5\r\n"));
}

#[test]
fn draining_refuses_new_calls_but_relays_in_dialog() {
    let mut h = Harness::new();
    let (_, ok) = h.establish("vpn");
    h.proxy.begin_shutdown();
    let out = h.send(
        &invite("vpn")
            .replace("caller1", "caller2")
            .replace("call-1", "call-2"),
        caller_flow(),
    );
    assert_eq!(
        out[0].first_line(),
        "SIP/2.0 503 Service Unavailable (shutting down)"
    );
    let out = h.send(&in_dialog("BYE", &caller_route(&ok)), caller_flow());
    assert!(out[0].first_line().starts_with("BYE "));
}

#[test]
fn unknown_methods_are_forwarded() {
    let mut h = Harness::new();
    let req = invite("vpn").replace("INVITE", "FOOBAR");
    let out = h.send(&req, caller_flow());
    assert_eq!(out.len(), 1, "no 100 Trying for non-INVITE");
    assert!(out[0]
        .first_line()
        .starts_with("FOOBAR sip:vpn@198.51.100.20:5060"));
    assert!(!out[0].text.contains("Record-Route"));
    let _ = SocketAddr::from(([0, 0, 0, 0], 0));
}

#[test]
fn a_panic_while_handling_one_message_is_contained() {
    let mut h = Harness::new();
    let (_, first) = h.forward_invite("vpn");
    let poisoned = invite("vpn")
        .replace("caller1", "caller2")
        .replace("call-1", "call-2")
        .replace(
            "Max-Forwards: 70\r\n",
            "Max-Forwards: 70\r\nX-Test-Panic: now\r\n",
        );
    let out = h.send(&poisoned, caller_flow());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].first_line(), "SIP/2.0 500 Server Internal Error");
    assert_eq!(h.proxy.stats.internal_errors, 1);
    // The loop and the transaction already running go on: its answer is relayed.
    let out = h.send(&answer(&first, 200, "OK", ""), uas_flow());
    assert!(
        out.iter().any(|s| s.first_line() == "SIP/2.0 200 OK"),
        "{out:?}"
    );
    let out = h.send(
        &invite("vpn")
            .replace("caller1", "caller3")
            .replace("call-1", "call-3"),
        caller_flow(),
    );
    assert!(out.iter().any(|s| s.first_line().starts_with("INVITE ")));
}

fn new_proxy(cfg: crate::core::CoreConfig) -> crate::core::Proxy {
    crate::core::Proxy::new(cfg, Default::default(), crate::wall_clock())
}

// ===== SASL in SIP (sip-sasl.md) =====

mod sasl {
    use super::*;
    use crate::store::Store;
    use gatehouse_auth::scram::ScramClient;
    use gatehouse_auth::SaslParams;

    /// Each round is a new transaction: a new branch every time.
    fn unique() -> u64 {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn store() -> Store {
        let mut s = Store::in_memory().unwrap();
        s.add_user(
            "alice",
            b"alice-secret",
            &["sip:alice@partner.example".into()],
            None,
            4096,
        )
        .unwrap();
        s.add_user(
            "vpn",
            b"vpn-secret",
            &["sip:vpn@org.example".into()],
            None,
            4096,
        )
        .unwrap();
        s
    }

    fn harness() -> Harness {
        let mut cfg = config();
        cfg.routes = RouteTable::default();
        let mut routes = RouteTable::default();
        routes.add_aor(
            "vpn",
            "org.example",
            Route {
                uri: "sip:vpn@198.51.100.20:5060".into(),
                dest: Destination::Addr {
                    transport: Transport::Udp,
                    addr: UAS.parse().unwrap(),
                    server_name: None,
                },
            },
        );
        cfg.routes = routes;
        // The inside: where the endpoints (and the UAS) are.
        cfg.tunnels.internal_networks = vec!["198.51.100.0/24".parse().unwrap()];
        cfg.auth.failures_before_lockout = 3;
        cfg.policy = std::sync::Arc::new(
            gatehouse_policy::Policy::parse(
                "[[rule]]\nname = \"partners\"\nkind = \"any\"\ncallers = [\"*@partner.example\", \"trusted\"]\n",
                "test",
            )
            .unwrap(),
        );
        Harness::on(cfg, store())
    }

    fn outside() -> Flow {
        Flow {
            remote: "192.0.2.200:5062".parse().unwrap(),
            ..caller_flow()
        }
    }

    /// The INVITE of round `cseq` with a Proxy-Authorization value.
    fn invite_round(cseq: u32, auth: Option<&str>) -> String {
        let mut s = invite("vpn")
            .replace("CSeq: 1 INVITE", &format!("CSeq: {cseq} INVITE"))
            .replace(
                "branch=z9hG4bKcaller1",
                &format!("branch=z9hG4bKround{cseq}x{}", unique()),
            );
        if let Some(a) = auth {
            s = s.replacen(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\nProxy-Authorization: {a}\r\n"),
                1,
            );
        }
        s
    }

    fn challenge_of(sent: &Sent) -> SaslParams {
        let m = sent.msg();
        let v = m
            .headers()
            .find(|(i, _)| m.name_text(*i).eq_ignore_ascii_case("Proxy-Authenticate"))
            .map(|(i, _)| m.value(i).into_owned())
            .expect("Proxy-Authenticate");
        SaslParams::parse(&v).unwrap()
    }

    /// Runs the three INVITE rounds; returns the outputs of the last one.
    fn authenticate(h: &mut Harness, client: &mut ScramClient) -> Vec<Sent> {
        authenticate_with(h, client, &|cseq, auth| invite_round(cseq, auth))
    }

    fn authenticate_with(
        h: &mut Harness,
        client: &mut ScramClient,
        build: &dyn Fn(u32, Option<&str>) -> String,
    ) -> Vec<Sent> {
        authenticate_from(h, client, build, outside())
    }

    /// The three rounds, each sent from `flow`.
    fn authenticate_from(
        h: &mut Harness,
        client: &mut ScramClient,
        build: &dyn Fn(u32, Option<&str>) -> String,
        flow: Flow,
    ) -> Vec<Sent> {
        let invite_round = build;
        let out = h.send(&invite_round(1, None), flow);
        assert_eq!(out[0].status(), Some(407));
        let p1 = SaslParams {
            realm: Some("org.example".into()),
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(client.client_first()),
            ..SaslParams::default()
        };
        let out = h.send(&invite_round(2, Some(&p1.emit())), flow);
        assert_eq!(out[0].status(), Some(407), "{out:?}");
        let c = challenge_of(&out[0]);
        let cf = client.client_final(&c.s2c.unwrap()).unwrap();
        let p2 = SaslParams {
            realm: Some("org.example".into()),
            s2s: c.s2s,
            c2s: Some(cf),
            ..SaslParams::default()
        };
        h.send(&invite_round(3, Some(&p2.emit())), flow)
    }

    #[test]
    fn three_round_scram_then_forward_with_credentials_consumed() {
        let mut h = harness();
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate(&mut h, &mut client);
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .expect("forwarded");
        assert!(
            !fwd.text.contains("Proxy-Authorization"),
            "own-realm credentials removed"
        );
        assert!(out.iter().any(|s| s.status() == Some(100)));
        // Every final response relayed for the INVITE carries the server-final.
        let relayed = h.send(&answer(fwd, 200, "OK", ""), uas_flow());
        let ok = relayed
            .iter()
            .find(|s| s.status() == Some(200))
            .expect("200 relayed");
        let m = ok.msg();
        let info = m
            .headers()
            .find(|(i, _)| m.name_text(*i) == "Proxy-Authentication-Info")
            .map(|(i, _)| m.value(i).into_owned())
            .expect("Proxy-Authentication-Info");
        let info = SaslParams::parse(&info).unwrap();
        assert_eq!(info.realm.as_deref(), Some("org.example"));
        client
            .verify_server_final(&info.s2c.unwrap())
            .expect("mutual authentication");
        assert_eq!(h.proxy.sasl_outcomes()[&("SCRAM-SHA-256", "success")], 1);
    }

    #[test]
    fn error_finals_carry_the_server_final_too() {
        let mut h = harness();
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate(&mut h, &mut client);
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        let relayed = h.send(&answer(fwd, 486, "Busy Here", ""), uas_flow());
        let busy = relayed.iter().find(|s| s.status() == Some(486)).unwrap();
        assert!(
            busy.text
                .contains("Proxy-Authentication-Info: SASL realm=\"org.example\", s2c="),
            "{}",
            busy.text
        );
    }

    #[test]
    fn from_aor_must_belong_to_the_identity() {
        let mut h = harness();
        // vpn authenticates but presents From: alice.
        let mut client = ScramClient::new("vpn", b"vpn-secret", None);
        let out = authenticate(&mut h, &mut client);
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 403 Forbidden (identity may not use this address)"
        );
    }

    #[test]
    fn wrong_password_is_a_generic_403_and_repeated_failures_lock_out() {
        let mut h = harness();
        for _ in 0..3 {
            let mut client = ScramClient::new("alice", b"guess", None);
            let out = authenticate(&mut h, &mut client);
            assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
            assert!(
                !out[0].text.contains("s2c"),
                "no server-final after a failure"
            );
        }
        // Locked out now: even the right password fails.
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = h.send(
            &invite_round(
                2,
                Some(
                    &SaslParams {
                        mech: Some("SCRAM-SHA-256".into()),
                        c2s: Some(client.client_first()),
                        ..SaslParams::default()
                    }
                    .emit(),
                ),
            ),
            outside(),
        );
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        let _ = client.client_final(b"");
        assert!(h.proxy.auth_stats().lockouts >= 1);
    }

    /// A reload (`apply_config`) changes, for what comes next: the lockout threshold (three
    /// wrong passwords no longer lock alice out), the registrar's limits (a REGISTER for 600 s
    /// is now too brief) and the timers of new transactions (Timer C of 5 s: 408 after 5 s).
    #[test]
    fn a_reload_applies_lockout_registrar_and_timer_settings() {
        let mut h = harness();
        let dir = std::env::temp_dir().join(format!("gatehouse-core-reload-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("policy.toml"),
            "[[rule]]\nname = \"partners\"\nkind = \"any\"\ncallers = [\"*@partner.example\", \"trusted\"]\n",
        )
        .unwrap();
        let text = format!(
            "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"{GW}:5060\"\n\
[[listen]]\ntransport = \"tcp\"\naddress = \"{GW}:5060\"\n\
[trust]\nsources = [\"203.0.113.0/24\"]\n[auth]\nfailures_before_lockout = 1000\n\
[registrar]\nmin_expires_s = 3600\ndefault_expires_s = 3600\n[timers]\ntimer_c_ms = 5000\n\
failover_ms = 700\ndead_address_ms = 0\n\
[tunnels]\npolicy = \"policy.toml\"\ninternal_networks = [\"198.51.100.0/24\"]\n\
[[route]]\naor = \"sip:tcp@org.example\"\ntarget = \"sip:tcp@198.51.100.21:5060;transport=tcp\"\n"
        );
        let cfg = crate::config::Config::parse_in(&text, "reload.toml", Some(&dir)).unwrap();
        h.proxy.apply_config(&cfg);
        // Branches that start from now on: the new failover deadline and dead-address memory.
        assert_eq!(h.proxy.cfg.failover, Duration::from_millis(700));
        assert_eq!(h.proxy.cfg.dead_address, Duration::ZERO);
        for _ in 0..3 {
            let mut client = ScramClient::new("alice", b"guess", None);
            let out = authenticate(&mut h, &mut client);
            assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        }
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate(&mut h, &mut client);
        assert!(
            out.iter().all(|s| s.status() != Some(403)),
            "not locked out after three failures any more: {out:?}"
        );
        let out = do_register(&mut h, "vpn", b"vpn-secret", "<sip:vpn@198.51.100.30:5060>");
        assert_eq!(out[0].status(), Some(423), "{}", out[0].text);
        let (_, fwd) = h.forward_invite("tcp");
        assert!(fwd.first_line().starts_with("INVITE sip:tcp@"));
        let out = h.advance(Duration::from_secs(5));
        assert!(
            out.iter()
                .any(|s| s.first_line() == "SIP/2.0 408 Request Timeout"),
            "{out:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Behind a declared balancer every request arrives from one address; the client its Via
    /// names is the subscriber: one client's guesses lock that client, not everyone else
    /// the balancer relays, and a request that names no client is refused.
    #[test]
    fn a_balancer_relays_each_client_as_its_own_subscriber() {
        let mut h = harness();
        let mut cfg = h.proxy.config().clone();
        cfg.balancers = vec!["192.0.2.250/32".parse().unwrap()];
        h.boot(cfg, store());
        let balancer = Flow {
            remote: "192.0.2.250:5060".parse().unwrap(),
            ..caller_flow()
        };
        let via = |client: &'static str| {
            move |cseq: u32, auth: Option<&str>| {
                invite_round(cseq, auth).replacen(
                    "Via: SIP/2.0/UDP caller.example:5060;branch=z9hG4bKround",
                    &format!(
                        "Via: SIP/2.0/UDP 192.0.2.250;branch=z9hG4bKlb{cseq}x{}\r\n\
                         Via: SIP/2.0/UDP caller.example:5060;rport=5062;received={client};branch=z9hG4bKround",
                        unique()
                    ),
                    1,
                )
            }
        };
        for _ in 0..3 {
            let mut guess = ScramClient::new("alice", b"guess", None);
            let out = authenticate_from(&mut h, &mut guess, &via("198.51.100.7"), balancer);
            assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
            assert_eq!(
                out[0].dest,
                Destination::Flow(balancer),
                "answered to the balancer"
            );
        }
        assert!(h.proxy.auth_stats().lockouts >= 1, "the guesser is locked");
        // Another client of the same balancer is not.
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_from(&mut h, &mut client, &via("198.51.100.8"), balancer);
        assert!(
            out.iter().any(|s| s.first_line().starts_with("INVITE")),
            "{out:?}"
        );
        // The guesser still is, through the balancer.
        let client = ScramClient::new("alice", b"alice-secret", None);
        let first = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(client.client_first()),
            ..SaslParams::default()
        };
        let out = h.send(&via("198.51.100.7")(2, Some(&first.emit())), balancer);
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        // The balancer's own request (its Via only, as its OPTIONS probes) is its own.
        let probe = "OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.250;branch=z9hG4bKprobe\r\n\
Max-Forwards: 70\r\nFrom: <sip:balancer@org.example>;tag=p\r\nTo: <sip:192.0.2.1:5060>\r\n\
Call-ID: probe-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let out = h.send(probe, balancer);
        assert_eq!(out[0].first_line(), "SIP/2.0 200 OK");
        // A client Via without an address (a name, no `received`): nobody to attribute it to.
        let out = h.send(
            &invite_round(1, None).replacen(
                "Via: SIP/2.0/UDP caller.example",
                "Via: SIP/2.0/UDP 192.0.2.250;branch=z9hG4bKlb\r\nVia: SIP/2.0/UDP caller.example",
                1,
            ),
            balancer,
        );
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 400 Missing Client Via From Balancer"
        );
    }

    /// On a shared store every outcome leaves as a write for the other gateways, and their
    /// outcomes count here: guesses spread over a cluster's gateways add up to one lockout.
    #[test]
    fn outcomes_are_shared_and_other_gateways_failures_count() {
        use crate::store::StoreWrite;
        let mut h = harness();
        let mut cfg = h.proxy.config().clone();
        cfg.shared_store = true;
        h.boot(cfg, store());
        let guesser: std::net::IpAddr = "192.0.2.200".parse().unwrap();
        let mut guess = ScramClient::new("alice", b"guess", None);
        let out = authenticate(&mut h, &mut guess);
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate(&mut h, &mut client);
        assert!(out.iter().any(|s| s.first_line().starts_with("INVITE")));
        let outcomes: Vec<&StoreWrite> = h
            .written
            .iter()
            .filter(|w| matches!(w, StoreWrite::AuthOutcome { .. }))
            .collect();
        assert_eq!(
            outcomes,
            [
                &StoreWrite::AuthOutcome {
                    user: Some("alice".into()),
                    source: guesser,
                    success: false
                },
                &StoreWrite::AuthOutcome {
                    user: Some("alice".into()),
                    source: guesser,
                    success: true
                }
            ]
        );
        // Three failures at other gateways (the harness locks at 3): locked here too.
        for _ in 0..3 {
            h.proxy
                .remote_auth_outcome(Some("alice"), guesser, false, h.now);
        }
        let first = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(ScramClient::new("alice", b"alice-secret", None).client_first()),
            ..SaslParams::default()
        };
        let out = h.send(&invite_round(2, Some(&first.emit())), outside());
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden", "{out:?}");
        assert!(h.proxy.auth_stats().lockouts >= 1);
    }

    /// Issue 9, defect 6: failures for `vpn` from an outside address (no reply needed) do
    /// not lock the internal endpoint's own REGISTER out; the guesser itself is locked.
    #[test]
    fn nobody_can_lock_the_endpoint_out() {
        let mut h = harness();
        // The harness locks after 3 failures.
        for _ in 0..3 {
            let mut guess = ScramClient::new("vpn", b"guess", None);
            let out = authenticate(&mut h, &mut guess);
            assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        }
        assert!(h.proxy.auth_stats().lockouts >= 1, "the guesser is locked");
        let first = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(ScramClient::new("vpn", b"vpn-secret", None).client_first()),
            ..SaslParams::default()
        };
        let out = h.send(&invite_round(2, Some(&first.emit())), outside());
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden", "locked there");
        let out = do_register(&mut h, "vpn", b"vpn-secret", "<sip:vpn@198.51.100.30:5060>");
        assert_eq!(out[0].first_line(), "SIP/2.0 200 OK", "{}", out[0].text);
    }

    #[test]
    fn malformed_sasl_header_gets_400_with_reason() {
        let mut h = harness();
        let out = h.send(
            &invite_round(2, Some("SASL realm=\"org.example\", realm=\"x\"")),
            outside(),
        );
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 400 Bad Request (duplicate SASL realm)"
        );
        let out = h.send(
            &invite_round(3, Some("SASL mech=\"SCRAM-SHA-256\", c2s=\"***\"")),
            outside(),
        );
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 400 Bad Request (SASL c2s is not base64)"
        );
    }

    #[test]
    fn digest_credentials_are_not_ours_and_get_a_challenge() {
        let mut h = harness();
        let out = h.send(
            &invite_round(2, Some("Digest username=\"alice\", realm=\"org.example\"")),
            outside(),
        );
        assert_eq!(out[0].status(), Some(407));
    }

    fn register(cseq: u32, auth: Option<&str>, contact: &str) -> String {
        let n = unique();
        let mut s = format!(
            "REGISTER sip:org.example SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.30:5060;branch=z9hG4bKreg{cseq}x{n};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:vpn@org.example>;tag=r1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: reg-1@endpoint\r\n\
CSeq: {cseq} REGISTER\r\nContact: {contact}\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        );
        if let Some(a) = auth {
            s = s.replacen(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\nAuthorization: {a}\r\n"),
                1,
            );
        }
        s
    }

    fn endpoint() -> Flow {
        Flow {
            remote: "198.51.100.30:5060".parse().unwrap(),
            ..caller_flow()
        }
    }

    /// Issue 18, item 9: an AOR the policy lets receive tunnels registers from the inside
    /// only — its credentials used from outside get 403 and no binding (which would take its
    /// tunnels, or break them: a PSK never crosses an unprotected hop) — unless listed in
    /// `tunnels.register_from_outside`.
    #[test]
    fn a_tunnel_target_registers_from_the_inside_only() {
        let mut h = harness();
        let from_outside = |h: &mut Harness| {
            do_register_from(
                h,
                "vpn",
                b"vpn-secret",
                "<sip:vpn@192.0.2.200:5060>",
                outside(),
            )
        };
        let out = from_outside(&mut h);
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 403 Forbidden (this AOR registers from the internal networks only)"
        );
        assert_eq!(h.proxy.registrations(), 0);
        let mut cfg = h.proxy.config().clone();
        cfg.tunnels
            .register_from_outside
            .insert("sip:vpn@org.example".into());
        h.boot(cfg, store());
        let out = from_outside(&mut h);
        assert_eq!(out[0].status(), Some(200), "{}", out[0].text);
        assert_eq!(h.proxy.registrations(), 1);
    }

    fn do_register(h: &mut Harness, user: &str, password: &[u8], contact: &str) -> Vec<Sent> {
        do_register_from(h, user, password, contact, endpoint())
    }

    /// The three REGISTER rounds from `flow`; returns the outputs of the last one.
    fn do_register_from(
        h: &mut Harness,
        user: &str,
        password: &[u8],
        contact: &str,
        flow: Flow,
    ) -> Vec<Sent> {
        let endpoint = || flow;
        let out = h.send(&register(1, None, contact), endpoint());
        assert_eq!(out[0].first_line(), "SIP/2.0 401 Unauthorized");
        assert!(out[0]
            .text
            .contains("WWW-Authenticate: SASL realm=\"org.example\""));
        let mut client = ScramClient::new(user, password, None);
        let p1 = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(client.client_first()),
            ..SaslParams::default()
        };
        let out = h.send(&register(2, Some(&p1.emit()), contact), endpoint());
        let m = out[0].msg();
        let v = m
            .headers()
            .find(|(i, _)| m.name_text(*i) == "WWW-Authenticate")
            .map(|(i, _)| m.value(i).into_owned())
            .unwrap();
        let c = SaslParams::parse(&v).unwrap();
        let cf = client.client_final(&c.s2c.unwrap()).unwrap();
        let p2 = SaslParams {
            s2s: c.s2s,
            c2s: Some(cf),
            ..SaslParams::default()
        };
        h.send(&register(3, Some(&p2.emit()), contact), endpoint())
    }

    #[test]
    fn register_then_invite_reaches_the_binding() {
        let mut h = harness();
        let out = do_register(&mut h, "vpn", b"vpn-secret", "<sip:vpn@198.51.100.30:5060>");
        assert_eq!(out[0].first_line(), "SIP/2.0 200 OK");
        assert!(
            out[0]
                .text
                .contains("Contact: <sip:vpn@198.51.100.30:5060>;expires=600\r\n"),
            "{}",
            out[0].text
        );
        assert!(out[0]
            .text
            .contains("Authentication-Info: SASL realm=\"org.example\", s2c="));
        assert_eq!(h.proxy.registrations(), 1);
        // A trusted caller's INVITE now goes to the registered flow, not the static route.
        let out = h.send(&invite("vpn"), caller_flow());
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        assert!(
            fwd.first_line()
                .starts_with("INVITE sip:vpn@198.51.100.30:5060 "),
            "{}",
            fwd.first_line()
        );
        assert_eq!(
            fwd.dest,
            Destination::Addr {
                transport: Transport::Udp,
                addr: "198.51.100.30:5060".parse().unwrap(),
                server_name: None
            }
        );
    }

    #[test]
    fn register_requires_owning_the_to_aor() {
        let mut h = harness();
        let out = do_register(&mut h, "alice", b"alice-secret", "<sip:x@198.51.100.30>");
        assert_eq!(
            out[0].first_line(),
            "SIP/2.0 403 Forbidden (identity may not use this address)"
        );
        assert_eq!(h.proxy.registrations(), 0);
    }

    #[test]
    fn bindings_survive_a_restart_and_expire() {
        let dir = std::env::temp_dir().join(format!(
            "gh-reg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.sqlite");
        {
            let mut s = Store::open(&path).unwrap();
            s.add_user(
                "vpn",
                b"vpn-secret",
                &["sip:vpn@org.example".into()],
                None,
                4096,
            )
            .unwrap();
        }
        let mut cfg = config();
        cfg.tunnels.internal_networks = vec!["198.51.100.0/24".parse().unwrap()];
        let mut h = Harness::on(cfg.clone(), Store::open(&path).unwrap());
        let out = do_register(&mut h, "vpn", b"vpn-secret", "<sip:vpn@198.51.100.30:5060>");
        assert_eq!(out[0].status(), Some(200));
        drop(h);
        // A new gateway on the same store routes to the binding at once.
        let mut h = Harness::on(config(), Store::open(&path).unwrap());
        assert_eq!(h.proxy.registrations(), 1);
        let out = h.send(&invite("vpn"), caller_flow());
        assert!(out.iter().any(|s| s
            .first_line()
            .starts_with("INVITE sip:vpn@198.51.100.30:5060")));
        // After the expiry the static route takes over again.
        h.now += Duration::from_secs(601);
        let out = h.send(
            &invite("vpn")
                .replace("caller1", "caller9")
                .replace("call-1", "call-9"),
            caller_flow(),
        );
        assert!(
            out.iter().any(|s| s
                .first_line()
                .starts_with("INVITE sip:vpn@198.51.100.20:5060")),
            "{out:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unregister_and_too_brief_intervals() {
        let mut h = harness();
        do_register(&mut h, "vpn", b"vpn-secret", "<sip:vpn@198.51.100.30:5060>");
        let out = do_register(
            &mut h,
            "vpn",
            b"vpn-secret",
            "<sip:vpn@198.51.100.30:5060>;expires=10",
        );
        assert_eq!(out[0].first_line(), "SIP/2.0 423 Interval Too Brief");
        assert!(out[0].text.contains("Min-Expires: 60\r\n"));
        let out = do_register(
            &mut h,
            "vpn",
            b"vpn-secret",
            "<sip:vpn@198.51.100.30:5060>;expires=0",
        );
        assert_eq!(out[0].status(), Some(200));
        assert_eq!(h.proxy.registrations(), 0);
    }

    #[test]
    fn a_reconnected_instance_replaces_its_binding() {
        let mut h = harness();
        let stored = |h: &mut Harness| -> Vec<String> {
            let store = h.store.as_mut().unwrap();
            let mut v: Vec<String> = store
                .live_bindings(0)
                .unwrap()
                .into_iter()
                .map(|b| b.contact)
                .collect();
            v.sort();
            v
        };
        let instance = "+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-0000000000a1>\";reg-id=1";
        let contact = |port: u16, instance: &str| {
            format!("<sip:vpn@198.51.100.30:{port};transport=tls>;{instance}")
        };
        let out = do_register(&mut h, "vpn", b"vpn-secret", &contact(40001, instance));
        assert_eq!(out[0].status(), Some(200));
        // The endpoint lost its connection and registers from a new flow (new port).
        let out = do_register(&mut h, "vpn", b"vpn-secret", &contact(40002, instance));
        assert_eq!(out[0].status(), Some(200));
        assert_eq!(
            h.proxy.registrations(),
            1,
            "the dead flow's binding is gone"
        );
        assert!(!out[0].text.contains(":40001"), "{}", out[0].text);
        assert_eq!(
            stored(&mut h),
            ["sip:vpn@198.51.100.30:40002;transport=tls"]
        );
        // Another reg-id of the same instance is another flow: both stay.
        let other = instance.replace("reg-id=1", "reg-id=2");
        do_register(&mut h, "vpn", b"vpn-secret", &contact(40003, &other));
        assert_eq!(h.proxy.registrations(), 2);
        // Expired bindings are swept (and leave the store) without anyone looking them up.
        h.now += Duration::from_secs(601);
        h.proxy.maintain(h.now);
        h.drain();
        assert_eq!(h.proxy.registrations(), 0);
        assert!(stored(&mut h).is_empty());
    }

    // ===== tunnels (wireguard-sdp.md) =====

    const OFFER: &str = "v=0\r\no=- 4124031101 285260646 IN IP6 2001:db8:666::666\r\ns=-\r\nc=IN IP6 2001:db8:666::666\r\nt=0 0\r\n\
m=application 57660 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=scram,none\r\n\
a=sendrecv\r\n";

    const POLICY: &str = "org_prefixes = [\"2001:db8:789::/48\"]\n\
[[rule]]\nname = \"partners\"\nkind = \"tunnel\"\ncallers = [\"*@partner.example\"]\ntargets = [\"sip:vpn@org.example\"]\n\
pskmth = [\"scram\", \"none\"]\nprefixes = [\"2001:db8:456::/48\"]\n";

    fn tunnel_harness(store: Store, internal: &str) -> Harness {
        let mut h = harness();
        let mut cfg = h.proxy.config().clone();
        cfg.policy = std::sync::Arc::new(gatehouse_policy::Policy::parse(POLICY, "test").unwrap());
        cfg.tunnels.internal_networks = vec![internal.parse().unwrap()];
        cfg.tunnels.public_endpoints.insert(
            "sip:vpn@org.example".into(),
            "[2001:db8::10]:51820".parse().unwrap(),
        );
        h.boot(cfg, store);
        h
    }

    fn tunnel_invite(sdp: &str) -> impl Fn(u32, Option<&str>) -> String + '_ {
        move |cseq, auth| {
            invite_round(cseq, auth).replace(
                "Content-Length: 4\r\n\r\nv=0\n",
                &format!("Content-Length: {}\r\n\r\n{sdp}", sdp.len()),
            )
        }
    }

    fn fmtp(text: &str) -> String {
        text.lines()
            .find(|l| l.starts_with("a=fmtp:vnd.wireguard"))
            .unwrap_or("")
            .to_owned()
    }

    /// The PSK the caller derives on its own from its transcript.
    fn caller_psk(t: &gatehouse_auth::scram::Transcript) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let pubkey: [u8; 32] = b64
            .decode("YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=")
            .unwrap()
            .try_into()
            .unwrap();
        let binding = gatehouse_auth::scram::PskBinding {
            mech: "SCRAM-SHA-256",
            from: "sip:alice@partner.example",
            to: "sip:vpn@org.example",
            call_id: "call-1@partner.example",
            pubkey: &pubkey,
            prefix: "2001:db8:456:1::/64",
        };
        b64.encode(gatehouse_auth::scram::derive_psk(t, &binding).expose())
    }

    fn answer_sdp() -> String {
        OFFER
            .replace("2001:db8:666::666", "2001:db8:789::20")
            .replace("57660", "51000")
            .replace(
                "prefix=2001:db8:456:1::/64;pskmth=scram,none",
                "prefix=2001:db8:789:1::/64;pskmth=gateway",
            )
    }

    fn answer_with_sdp(fwd: &Sent, sdp: &str) -> String {
        answer(fwd, 200, "OK", "Content-Type: application/sdp\r\n").replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Length: {}\r\n\r\n{sdp}", sdp.len()),
        )
    }

    #[test]
    fn scram_tunnel_hands_the_psk_inward_only() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let mut seen_outside = Vec::new();
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(OFFER));
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .expect("forwarded inward");
        let inward = fmtp(&fwd.text);
        seen_outside.extend(
            out.iter()
                .filter(|s| s.dest == Destination::Flow(outside()))
                .map(|s| s.text.clone()),
        );
        // The 200 with the endpoint's answer goes back out rewritten.
        let relayed = h.send(&answer_with_sdp(fwd, &answer_sdp()), uas_flow());
        let ok = relayed.iter().find(|s| s.status() == Some(200)).unwrap();
        seen_outside.extend(relayed.iter().map(|s| s.text.clone()));
        let info = ok.msg();
        let info = info
            .headers()
            .find(|(i, _)| info.name_text(*i) == "Proxy-Authentication-Info")
            .map(|(i, _)| info.value(i).into_owned())
            .unwrap();
        let transcript = client
            .verify_server_final(
                &gatehouse_auth::SaslParams::parse(&info)
                    .unwrap()
                    .s2c
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(
            inward,
            format!(
                "a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=gateway;psk={}",
                caller_psk(&transcript)
            ),
            "the endpoint gets the PSK the caller derives independently"
        );
        let answer_out = fmtp(&ok.text);
        assert!(answer_out.ends_with(";pskmth=scram"), "{answer_out}");
        assert!(
            ok.text.contains("c=IN IP6 2001:db8::10\r\n")
                && ok.text.contains("m=application 51820 udp"),
            "{}",
            ok.text
        );
        for text in &seen_outside {
            assert!(
                !text.contains("psk="),
                "a psk left towards the outside:\n{text}"
            );
        }
        assert_eq!(h.proxy.tunnel_count(), 1);
        let t = h.proxy.tunnels().next().unwrap();
        assert_eq!(
            (t.identity.as_str(), t.pskmth.as_str(), t.state),
            ("alice", "scram", crate::tunnel::TunnelState::Established)
        );
    }

    /// Federation (docs/realm-crossover.md): alice, authenticated here over TLS, opens a
    /// tunnel to another organisation's domain. The offer leaves with `pskmth=xover` and no
    /// key of ours; the partner's 407 comes back with our server-final; her next rounds (the
    /// partner's credentials, not ours) resume on her connection only, and the home side can
    /// read her channel for that call and that domain only.
    #[test]
    fn an_outward_tunnel_leaves_unkeyed_and_resumes_on_its_connection_only() {
        let mut h = harness();
        let mut cfg = h.proxy.config().clone();
        cfg.policy = std::sync::Arc::new(
            gatehouse_policy::Policy::parse(
                "org_prefixes = [\"2001:db8:456::/48\"]\n\
[[rule]]\nname = \"out\"\nkind = \"tunnel\"\ncallers = [\"sip:alice@partner.example\"]\n\
targets = [\"*@far.example\"]\npskmth = [\"scram\", \"xover\"]\nrequire_psk = true\n",
                "t",
            )
            .unwrap(),
        );
        cfg.routes.add_domain(
            "far.example",
            Route {
                uri: "sip:far.example".into(),
                dest: Destination::Addr {
                    transport: Transport::Tls,
                    addr: "203.0.113.80:5061".parse().unwrap(),
                    server_name: Some("far.example".into()),
                },
            },
        );
        h.boot(cfg, store());
        let tls = |conn: u64| Flow {
            transport: Transport::Tls,
            local: format!("{GW}:5061").parse().unwrap(),
            remote: "198.51.100.7:40000".parse().unwrap(),
            conn: Some(conn),
        };
        for conn in [7, 8] {
            h.proxy.set_connection_tls(
                conn,
                gatehouse_auth::TlsInfo {
                    exporter: vec![conn as u8; 32],
                    peer_identity: None,
                    ..Default::default()
                },
            );
        }
        let offer = OFFER.replace("pskmth=scram,none", "pskmth=scram,xover");
        let build = |cseq: u32, auth: Option<&str>| {
            tunnel_invite(&offer)(cseq, auth)
                .replace("sip:vpn@org.example", "sip:vpn@far.example")
                .replace(
                    "SIP/2.0/UDP caller.example:5060",
                    "SIP/2.0/TLS caller.example:40000",
                )
        };
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_from(&mut h, &mut client, &build, tls(7));
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .expect("relayed to the partner");
        assert_eq!(
            fmtp(&fwd.text),
            "a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=xover",
            "no key of ours, the partner keys it by crossover"
        );
        assert!(!fwd.text.contains("realm=\"org.example\""), "{}", fwd.text);
        let t = h.proxy.tunnels().next().unwrap();
        assert_eq!(
            (t.identity.as_str(), t.pskmth.as_str(), t.to.as_str()),
            ("alice", "xover", "sip:vpn@far.example")
        );
        // The partner challenges; alice gets its 407 with our server-final.
        let far = Flow {
            transport: Transport::Tls,
            local: format!("{GW}:40001").parse().unwrap(),
            remote: "203.0.113.80:5061".parse().unwrap(),
            conn: Some(9),
        };
        let challenge = "Proxy-Authenticate: SASL realm=\"far.example\", mech=\"SXOVER-PLUS\"\r\n";
        let back = h.send(
            &answer(fwd, 407, "Proxy Authentication Required", challenge),
            far,
        );
        let relayed = back.iter().find(|s| s.status() == Some(407)).unwrap();
        assert!(
            relayed.text.contains("realm=\"far.example\""),
            "{}",
            relayed.text
        );
        let info = relayed.msg();
        let info = info
            .headers()
            .find(|(i, _)| info.name_text(*i) == "Proxy-Authentication-Info")
            .map(|(i, _)| info.value(i).into_owned())
            .expect("our server-final on the partner's challenge");
        client
            .verify_server_final(&SaslParams::parse(&info).unwrap().s2c.unwrap())
            .unwrap();
        // The home side: her channel with us, for this call relayed by far.example only.
        let calls = h.proxy.outward_calls();
        let domains = |d: &str| vec![d.to_owned()];
        let from = "sip:alice@partner.example";
        assert_eq!(
            calls.channel_for(
                "call-1@partner.example",
                "ft1",
                from,
                &domains("far.example"),
                h.now
            ),
            Some((vec![7; 32], "198.51.100.7".parse().unwrap()))
        );
        assert_eq!(
            calls.channel_for(
                "call-1@partner.example",
                "ft1",
                from,
                &domains("other.example"),
                h.now
            ),
            None
        );
        assert_eq!(
            calls.channel_for(
                "call-1@partner.example",
                "ft1",
                "sip:eve@partner.example",
                &domains("far.example"),
                h.now
            ),
            None
        );
        // Her next round carries the partner's credentials: resumed on her connection...
        let partner_round = SaslParams {
            realm: Some("far.example".into()),
            mech: Some("SXOVER-PLUS".into()),
            c2s: Some(b"sealed".to_vec()),
            ..SaslParams::default()
        }
        .emit();
        let out = h.send(&build(4, Some(&partner_round)), tls(7));
        let again = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .expect("resumed without a new exchange with us");
        assert!(
            again.text.contains("realm=\"far.example\""),
            "{}",
            again.text
        );
        // The far end accepts that round; a housekeeping tick after the challenged set-ups
        // must not end the dialog the accepted one made: alice's BYE goes through.
        let answer_sdp = answer_sdp().replace("pskmth=gateway", "pskmth=xover");
        let ok = h.send(&answer_with_sdp(again, &answer_sdp), far);
        let ok = ok
            .iter()
            .find(|s| s.status() == Some(200))
            .expect("200 to alice");
        assert!(!ok.text.contains("psk="), "{}", ok.text);
        h.proxy.maintain(h.now);
        let bye = format!(
            "BYE sip:vpn@198.51.100.20:5060 SIP/2.0\r\nVia: SIP/2.0/TLS caller.example:40000;branch=z9hG4bKbyefed\r\n\
Max-Forwards: 70\r\n{}From: <sip:alice@partner.example>;tag=ft1\r\nTo: <sip:vpn@far.example>;tag=uas1\r\n\
Call-ID: call-1@partner.example\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
            caller_route(ok)
        );
        let out = h.send(&bye, tls(7));
        assert!(
            out.iter().any(|s| s.first_line().starts_with("BYE ")),
            "{out:?}"
        );
        // ... never on another connection, for another target, or after its time.
        let out = h.send(&build(5, Some(&partner_round)), tls(8));
        assert_eq!(
            out[0].status(),
            Some(407),
            "another connection: our challenge"
        );
        let elsewhere = build(6, Some(&partner_round)).replacen(
            "INVITE sip:vpn@far.example",
            "INVITE sip:ceo@far.example",
            1,
        );
        let out = h.send(&elsewhere, tls(7));
        assert_eq!(
            out[0].status(),
            Some(407),
            "another Request-URI: our challenge"
        );
        h.now += crate::core::outward::TTL;
        h.proxy.maintain(h.now);
        let out = h.send(&build(7, Some(&partner_round)), tls(7));
        assert_eq!(out[0].status(), Some(407), "after its time: our challenge");
        assert!(h.proxy.outward_calls().is_empty());
    }

    #[test]
    fn a_psk_in_an_answer_from_inside_is_stripped() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(OFFER));
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        let leaky = answer_sdp().replace(
            "pskmth=gateway",
            "pskmth=gateway;psk=5c+9c1SPsTZJYcy7A7FGjvGchpDHI6mTAmNNCJw0W5Q=",
        );
        let relayed = h.send(&answer_with_sdp(fwd, &leaky), uas_flow());
        assert!(relayed.iter().all(|s| !s.text.contains("psk=")));
    }

    #[test]
    fn policy_denial_is_403_with_warning_and_nothing_goes_inside() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let org = OFFER.replace("prefix=2001:db8:456:1::/64", "prefix=2001:db8:789:5::/64");
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(&org));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].first_line(), "SIP/2.0 403 Forbidden");
        assert!(
            out[0]
                .text
                .contains("Warning: 399 gatehouse \"policy: prefix overlaps the organisation's\""),
            "{}",
            out[0].text
        );
        assert_eq!(h.proxy.policy_denials["org_prefix"], 1);
        assert_eq!(h.proxy.tunnel_count(), 0);
    }

    #[test]
    fn bad_offer_is_488_naming_the_fault() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let bad = OFFER.replace(
            "pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=",
            "pubkey=c2hvcnQ=",
        );
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(&bad));
        assert_eq!(out[0].first_line(), "SIP/2.0 488 Not Acceptable Here");
        assert!(out[0]
            .text
            .contains("Warning: 399 gatehouse \"pubkey is not 32 bytes of base64\""));
    }

    /// A caller allowed only plain calls cannot smuggle a WireGuard offer (with its own
    /// `pskmth=gateway;psk=` and an organisation prefix) past the tunnel checks by
    /// relabelling or wrapping it (issue 9, item 5).
    #[test]
    fn a_wireguard_offer_is_one_whatever_its_label() {
        const CALLS_ONLY: &str =
            "[[rule]]\nname = \"calls\"\nkind = \"call\"\ncallers = [\"*@partner.example\"]\n";
        let smuggled = OFFER
            .replace("prefix=2001:db8:456:1::/64", "prefix=2001:db8:789:5::/64")
            .replace(
                "pskmth=scram,none",
                "pskmth=gateway;psk=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=",
            );
        let multipart = format!(
            "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/sdp\r\n\r\n{smuggled}\r\n--b--\r\n"
        );
        let shouting = smuggled.replace("vnd.wireguard", "VND.WireGuard");
        let cases: [(&str, &str, &str); 5] = [
            ("text/plain", &smuggled, "415"),
            ("multipart/mixed;boundary=b", &multipart, "415"),
            ("application/sdp", &shouting, "488"),
            (
                "application/sdp\r\nContent-Encoding: gzip",
                &smuggled,
                "415",
            ),
            ("application/octet-stream", &shouting, "415"),
        ];
        for (ctype, body, status) in cases {
            let mut h = tunnel_harness(store(), "198.51.100.0/24");
            h.proxy.set_policy(std::sync::Arc::new(
                gatehouse_policy::Policy::parse(CALLS_ONLY, "t").unwrap(),
            ));
            let mut client = ScramClient::new("alice", b"alice-secret", None);
            let build = |cseq, auth: Option<&str>| {
                tunnel_invite(body)(cseq, auth).replace(
                    "Content-Type: application/sdp",
                    &format!("Content-Type: {ctype}"),
                )
            };
            let out = authenticate_with(&mut h, &mut client, &build);
            assert_eq!(out.len(), 1, "{ctype}: {out:?}");
            assert!(
                out[0]
                    .first_line()
                    .starts_with(&format!("SIP/2.0 {status} ")),
                "{ctype}: {}",
                out[0].text
            );
            assert_eq!(h.proxy.tunnel_count(), 0);
        }
    }

    #[test]
    fn multipart_needs_a_rule_and_loses_every_psk() {
        let audio = "v=0\r\no=- 1 1 IN IP4 192.0.2.200\r\ns=-\r\nc=IN IP4 192.0.2.200\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        let body = format!("--b\r\nContent-Type: application/sdp\r\n\r\n{audio}\r\n--b--\r\n");
        for (allowed, expect) in [(false, "415"), (true, "INVITE")] {
            let mut h = tunnel_harness(store(), "198.51.100.0/24");
            let rule = format!(
                "[[rule]]\nname = \"calls\"\nkind = \"call\"\ncallers = [\"*@partner.example\"]\nmultipart = {allowed}\n"
            );
            h.proxy.set_policy(std::sync::Arc::new(
                gatehouse_policy::Policy::parse(&rule, "t").unwrap(),
            ));
            let mut client = ScramClient::new("alice", b"alice-secret", None);
            let build = |cseq, auth: Option<&str>| {
                tunnel_invite(&body)(cseq, auth).replace(
                    "Content-Type: application/sdp",
                    "Content-Type: multipart/mixed;boundary=b",
                )
            };
            let out = authenticate_with(&mut h, &mut client, &build);
            assert!(
                out.iter().any(|s| s.first_line().contains(expect)),
                "multipart = {allowed}: {out:?}"
            );
        }
    }

    #[test]
    fn a_psk_is_never_handed_to_an_unprotected_hop() {
        let mut h = tunnel_harness(store(), "10.0.0.0/8");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(OFFER));
        assert_eq!(out[0].first_line(), "SIP/2.0 500 Server Internal Error");
        assert!(out.iter().all(|s| !s.text.contains("psk=")));
    }

    /// Alice's SCRAM tunnel INVITE answered 200 by the endpoint: (the INVITE forwarded
    /// inside, what the endpoint's answer made the gateway send).
    fn establish_tunnel(h: &mut Harness) -> (Sent, Vec<Sent>) {
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_with(h, &mut client, &tunnel_invite(OFFER));
        let fwd = out
            .into_iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        let relayed = h.send(&answer_with_sdp(&fwd, &answer_sdp()), uas_flow());
        (fwd, relayed)
    }

    /// A store file in a scratch directory holding `alice`: (directory, file).
    fn file_store_with_alice() -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "gh-tun-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.sqlite");
        let mut s = Store::open(&path).unwrap();
        s.add_user(
            "alice",
            b"alice-secret",
            &["sip:alice@partner.example".into()],
            None,
            4096,
        )
        .unwrap();
        (dir, path)
    }

    /// Issue 18, item 1: the policy judges the target the request goes to (its Request-URI
    /// as routed), not the To header routing never reads, and the tunnel records that
    /// target. alice may tunnel to vpn only; the domain's route would take `ceo` to the PBX.
    #[test]
    fn policy_judges_the_request_uri_routing_follows_not_to() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut cfg = h.proxy.config().clone();
        let pbx = Route {
            uri: "sip:198.51.100.30:5060".into(),
            dest: Destination::Addr {
                transport: Transport::Udp,
                addr: "198.51.100.30:5060".parse().unwrap(),
                server_name: None,
            },
        };
        cfg.routes.add_domain("org.example", pbx.clone());
        cfg.routes.add_domain("partner.example", pbx);
        h.boot(cfg, store());
        for (n, ruri) in [
            "sip:ceo@org.example",
            "sip:+15550100@org.example",
            "sip:x@partner.example",
        ]
        .iter()
        .enumerate()
        {
            let mut client = ScramClient::new("alice", b"alice-secret", None);
            let build = |cseq: u32, auth: Option<&str>| {
                tunnel_invite(OFFER)(cseq, auth)
                    .replacen("INVITE sip:vpn@org.example", &format!("INVITE {ruri}"), 1)
                    .replace("call-1@", &format!("call-r{n}@"))
            };
            let out = authenticate_with(&mut h, &mut client, &build);
            assert_eq!(out.len(), 1, "{ruri}: nothing relayed: {out:?}");
            assert_eq!(out[0].status(), Some(403), "{ruri}: {}", out[0].text);
            assert!(
                out[0].text.contains("policy: no rule permits this"),
                "{}",
                out[0].text
            );
        }
        assert_eq!(h.proxy.tunnel_count(), 0);
        // The other way round: To names someone else, the Request-URI is vpn: permitted, and
        // the tunnel is recorded as going to vpn, where it goes.
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let build = |cseq: u32, auth: Option<&str>| {
            tunnel_invite(OFFER)(cseq, auth)
                .replace("To: <sip:vpn@org.example>", "To: <sip:ceo@org.example>")
        };
        let out = authenticate_with(&mut h, &mut client, &build);
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .expect("relayed");
        assert_eq!(
            fwd.dest,
            Destination::Addr {
                transport: Transport::Udp,
                addr: UAS.parse().unwrap(),
                server_name: None
            }
        );
        let t: Vec<_> = h.proxy.tunnels().collect();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, "sip:vpn@org.example");
    }

    /// Issue 18, item 3: a prefix or public key a live tunnel holds belongs to its identity.
    /// bob may claim neither a prefix around or inside alice's nor her key; beside them he
    /// may, and once her tunnel ends, what was hers is free.
    #[test]
    fn a_tunnel_cannot_take_over_another_identitys_prefix_or_key() {
        let with_bob = || {
            let mut s = store();
            s.add_user(
                "bob",
                b"bob-secret",
                &["sip:bob@partner.example".into()],
                None,
                4096,
            )
            .unwrap();
            s
        };
        let mut h = tunnel_harness(with_bob(), "198.51.100.0/24");
        let (fwd, relayed) = establish_tunnel(&mut h);
        assert!(relayed.iter().any(|s| s.status() == Some(200)));
        let bob_offer = |prefix: &str, key: &str| {
            OFFER
                .replace("prefix=2001:db8:456:1::/64", &format!("prefix={prefix}"))
                .replace("YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=", key)
        };
        const BOB_KEY: &str = "Ym9iYm9iYm9iYm9iYm9iYm9iYm9iYm9iYm9iYm9iYm8=";
        const ALICE_KEY: &str = "YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=";
        let bob_tries = |h: &mut Harness, n: u32, sdp: String| {
            let mut client = ScramClient::new("bob", b"bob-secret", None);
            let build = move |cseq: u32, auth: Option<&str>| {
                tunnel_invite(&sdp)(cseq, auth)
                    .replace("sip:alice@partner.example", "sip:bob@partner.example")
                    .replace("call-1@", &format!("call-bob{n}@"))
                    .replace("tag=ft1", &format!("tag=bob{n}"))
            };
            authenticate_with(h, &mut client, &build)
        };
        for (n, (prefix, key, reason)) in [
            (
                "2001:db8:456::/48",
                BOB_KEY,
                "prefix held by another identity's tunnel",
            ),
            ("2001:db8:456:1:8000::/65", BOB_KEY, "prefix held"),
            (
                "2001:db8:456:2::/64",
                ALICE_KEY,
                "public key held by another identity's tunnel",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let out = bob_tries(&mut h, n as u32, bob_offer(prefix, key));
            assert_eq!(out.len(), 1, "{prefix}: nothing relayed: {out:?}");
            assert_eq!(out[0].status(), Some(403), "{}", out[0].text);
            assert!(out[0].text.contains(reason), "{}", out[0].text);
        }
        assert_eq!(h.proxy.policy_denials.get("prefix_held"), Some(&2));
        assert_eq!(h.proxy.policy_denials.get("key_held"), Some(&1));
        let out = bob_tries(&mut h, 7, bob_offer("2001:db8:456:2::/64", BOB_KEY));
        assert!(
            out.iter().any(|s| s.first_line().starts_with("INVITE")),
            "{out:?}"
        );
        // alice's tunnel ends (her BYE): the /48 around her old prefix is free for bob (his
        // own /64 inside it is his).
        let bye = format!(
            "BYE sip:vpn@198.51.100.20:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.200:5062;branch=z9hG4bKbyealice\r\n\
Max-Forwards: 70\r\n{}From: <sip:alice@partner.example>;tag=ft1\r\nTo: <sip:vpn@org.example>;tag=uas1\r\n\
Call-ID: call-1@partner.example\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
            caller_route(relayed.iter().find(|s| s.status() == Some(200)).unwrap())
        );
        let out = h.send(&bye, outside());
        assert!(
            out.iter().any(|s| s.first_line().starts_with("BYE ")),
            "{out:?}"
        );
        let _ = fwd;
        let out = bob_tries(&mut h, 8, bob_offer("2001:db8:456::/48", BOB_KEY));
        assert!(
            out.iter().any(|s| s.first_line().starts_with("INVITE")),
            "{out:?}"
        );
    }

    #[test]
    fn bye_from_either_side_and_a_restart_in_the_middle() {
        let (dir, path) = file_store_with_alice();
        let mut h = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        let (fwd, relayed) = establish_tunnel(&mut h);
        assert!(relayed.iter().any(|s| s.status() == Some(200)));
        // The endpoint's route set: the Record-Route of the INVITE it received.
        let rr = fwd.msg().list_values(HeaderName::RecordRoute);
        drop(h);
        // Restart: the table is complete and in-dialog BYE still routes.
        let mut h = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        assert_eq!(h.proxy.tunnel_count(), 1);
        // BYE from the inside (endpoint -> caller), Route = Record-Route in order.
        let bye = format!(
            "BYE sip:alice@203.0.113.5:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bKbyein\r\nMax-Forwards: 70\r\n\
Route: {}\r\nFrom: <sip:vpn@org.example>;tag=uas1\r\nTo: <sip:alice@partner.example>;tag=ft1\r\nCall-ID: call-1@partner.example\r\n\
CSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
            rr.join(", ")
        );
        let out = h.send(&bye, uas_flow());
        assert!(
            out.iter()
                .any(|s| s.first_line().starts_with("BYE sip:alice@203.0.113.5:5062")),
            "{out:?}"
        );
        assert_eq!(h.proxy.tunnel_count(), 0, "BYE tears the tunnel down");
        drop(h);
        let h = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        assert_eq!(h.proxy.tunnel_count(), 0, "and the store agrees");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `kill -9` right after the 200 left: no Drop, no tick flush. The tunnel is in the store
    /// because it was written before the 200 was handed to the transport (issue 9, item 7).
    #[test]
    fn a_tunnel_is_durable_before_its_200_leaves() {
        let (dir, path) = file_store_with_alice();
        let mut h = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        let (_, relayed) = establish_tunnel(&mut h);
        assert!(relayed.iter().any(|s| s.status() == Some(200)));
        // Crash: the proxy vanishes without running any of its code again.
        std::mem::forget(h);
        let mut h = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        assert_eq!(h.proxy.tunnel_count(), 1);
        let now = h.now;
        h.proxy
            .teardown("call-1@partner.example", now)
            .expect("the restarted gateway can tear the tunnel down");
        let byes = h.drain();
        assert_eq!(
            byes.iter()
                .filter(|s| s.first_line().starts_with("BYE "))
                .count(),
            2,
            "{byes:?}"
        );
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 9, item 8: with `[topology] hide`, nothing that leaves towards the outside names
    /// an internal address, and in-dialog requests still find their way both ways.
    #[test]
    fn topology_hiding_leaves_no_internal_address_outside() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut cfg = h.proxy.config().clone();
        cfg.hide_topology = true;
        cfg.trusted = vec![];
        h.boot(cfg, store());
        let is_outside = |s: &Sent| {
            let ip = match &s.dest {
                Destination::Flow(f) => f.remote.ip(),
                Destination::Addr { addr, .. } => addr.ip(),
                Destination::Name { .. } => return true,
            };
            !matches!(ip, std::net::IpAddr::V4(v4) if v4.octets()[..3] == [198, 51, 100] || v4.octets()[0] == 10)
        };
        const INTERNAL: [&str; 3] = ["198.51.100.", "10.0.0.7", "2001:db8:789::20"];
        let mut outward: Vec<String> = Vec::new();
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let out = authenticate_with(&mut h, &mut client, &tunnel_invite(OFFER));
        outward.extend(out.iter().filter(|s| is_outside(s)).map(|s| s.text.clone()));
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        // The answer carries an internal proxy's Record-Route above the gateway's own.
        let answer = answer_with_sdp(fwd, &answer_sdp()).replacen(
            "Record-Route: ",
            "Record-Route: <sip:10.0.0.7;lr>\r\nRecord-Route: ",
            1,
        );
        let relayed = h.send(&answer, uas_flow());
        outward.extend(
            relayed
                .iter()
                .filter(|s| is_outside(s))
                .map(|s| s.text.clone()),
        );
        let ok = relayed
            .iter()
            .find(|s| s.status() == Some(200))
            .unwrap()
            .msg();
        for text in &outward {
            for addr in INTERNAL {
                assert!(!text.contains(addr), "{addr} leaked in:\n{text}");
            }
        }
        let contact = crate::sip::NameAddr::parse(&ok.value_of(HeaderName::Contact).unwrap())
            .unwrap()
            .uri
            .to_owned();
        assert!(contact.starts_with("sip:gh."), "{contact}");

        // The caller's BYE along its route set reaches the endpoint through the internal proxy.
        let route: Vec<String> = ok
            .list_values(HeaderName::RecordRoute)
            .into_iter()
            .rev()
            .collect();
        let bye = format!(
            "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.200:5062;branch=z9hG4bKbyeout\r\nMax-Forwards: 70\r\n\
Route: {}\r\nFrom: <sip:alice@partner.example>;tag=ft1\r\nTo: <sip:vpn@org.example>;tag=uas1\r\n\
Call-ID: call-1@partner.example\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
            route.join(", ")
        );
        let out = h.send(&bye, outside());
        let inward = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE "))
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(
            inward.first_line(),
            "BYE sip:vpn@198.51.100.20:5060 SIP/2.0"
        );
        assert!(
            matches!(inward.dest, Destination::Addr { addr, .. } if addr.to_string() == "10.0.0.7:5060")
        );
    }

    /// Issue 18, item 7: a request from the inside to the outside keeps none of the inside's
    /// Record-Route entries (nor the gateway's inward-facing one); they travel sealed in the
    /// Contact token, so the outside's BYE still goes back through the internal proxy.
    #[test]
    fn topology_hiding_keeps_the_insides_record_route_inside_on_requests() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut cfg = h.proxy.config().clone();
        cfg.hide_topology = true;
        cfg.trusted = vec!["198.51.100.0/24".parse().unwrap()];
        cfg.policy = std::sync::Arc::new(gatehouse_policy::Policy::trusted_only());
        cfg.routes.add_domain(
            "outside.example",
            Route {
                uri: "sip:192.0.2.50:5060".into(),
                dest: Destination::Addr {
                    transport: Transport::Udp,
                    addr: "192.0.2.50:5060".parse().unwrap(),
                    server_name: None,
                },
            },
        );
        h.boot(cfg, store());
        let pbx = uas_at("198.51.100.40:5060");
        let invite = "INVITE sip:bob@outside.example SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.40:5060;branch=z9hG4bKpbx1\r\n\
Record-Route: <sip:10.0.0.7;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@org.example>;tag=in1\r\nTo: <sip:bob@outside.example>\r\n\
Call-ID: out-1@org.example\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@198.51.100.41:5060>\r\nContent-Length: 0\r\n\r\n";
        let out = h.send(invite, pbx);
        let fwd = out
            .iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap_or_else(|| panic!("{out:?}"));
        for internal in ["10.0.0.7", "198.51.100."] {
            assert!(
                !fwd.text.contains(internal),
                "{internal} leaked:\n{}",
                fwd.text
            );
        }
        let rr = fwd.msg().list_values(HeaderName::RecordRoute);
        assert_eq!(rr.len(), 1, "only the gateway's outward entry: {rr:?}");
        // The outside answers and later hangs up along its route set, to the Contact token.
        let contact =
            crate::sip::NameAddr::parse(&fwd.msg().value_of(HeaderName::Contact).unwrap())
                .unwrap()
                .uri
                .to_owned();
        assert!(contact.starts_with("sip:gh."), "{contact}");
        let outside_flow = uas_at("192.0.2.50:5060");
        let ok = answer(fwd, 200, "OK", "");
        let back = h.send(&ok, outside_flow);
        assert!(back.iter().any(|s| s.status() == Some(200)), "{back:?}");
        let bye = format!(
            "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKobye\r\nMax-Forwards: 70\r\n\
Route: {}\r\nFrom: <sip:bob@outside.example>;tag=uas1\r\nTo: <sip:alice@org.example>;tag=in1\r\n\
Call-ID: out-1@org.example\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            rr[0]
        );
        let out = h.send(&bye, outside_flow);
        let inward = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE "))
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(
            inward.first_line(),
            "BYE sip:alice@198.51.100.41:5060 SIP/2.0"
        );
        assert!(
            inward.text.contains("Route: <sip:10.0.0.7;lr>"),
            "{}",
            inward.text
        );
        assert!(
            matches!(inward.dest, Destination::Addr { addr, .. } if addr.to_string() == "10.0.0.7:5060"),
            "{:?}",
            inward.dest
        );
    }

    #[test]
    fn topology_hiding_sends_no_inside_via_and_restores_it() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let mut cfg = h.proxy.config().clone();
        cfg.hide_topology = true;
        cfg.trusted = vec![];
        h.boot(cfg, store());
        let (fwd, _) = establish_tunnel(&mut h);
        let fwd = &fwd;
        // The endpoint hangs up: its BYE goes out with the gateway's Via only.
        let rr = fwd.msg().list_values(HeaderName::RecordRoute);
        let bye = format!(
            "BYE sip:alice@203.0.113.5:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bKbyein\r\n\
Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKinner\r\nMax-Forwards: 70\r\nRoute: {}\r\n\
From: <sip:vpn@org.example>;tag=uas1\r\nTo: <sip:alice@partner.example>;tag=ft1\r\n\
Call-ID: call-1@partner.example\r\nCSeq: 5 BYE\r\nContact: <sip:vpn@198.51.100.20:5060>\r\nContent-Length: 0\r\n\r\n",
            rr.join(", ")
        );
        let out = h.send(&bye, uas_flow());
        let outward = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE "))
            .unwrap_or_else(|| panic!("{out:?}"));
        let m = outward.msg();
        assert_eq!(m.list_values(HeaderName::Via).len(), 1, "{}", outward.text);
        assert!(!outward.text.contains("198.51.100."), "{}", outward.text);
        assert!(!outward.text.contains("10.0.0.9"), "{}", outward.text);
        // The caller's 200 goes back inside with the inside's Vias restored.
        let back = h.send(&answer(outward, 200, "OK", ""), outside());
        let ok = back
            .iter()
            .find(|s| s.status() == Some(200))
            .unwrap_or_else(|| panic!("{back:?}"));
        let vias = ok.msg().list_values(HeaderName::Via);
        assert_eq!(vias.len(), 2, "{}", ok.text);
        assert!(vias[0].contains("198.51.100.20:5060;branch=z9hG4bKbyein"));
        assert!(vias[1].contains("10.0.0.9:5060;branch=z9hG4bKinner"));
    }

    #[test]
    fn bye_from_the_caller_tears_down() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let (_, relayed) = establish_tunnel(&mut h);
        let ok = relayed
            .iter()
            .find(|s| s.status() == Some(200))
            .unwrap()
            .msg();
        let route: Vec<String> = ok
            .list_values(HeaderName::RecordRoute)
            .into_iter()
            .rev()
            .collect();
        let bye = in_dialog("BYE", &format!("Route: {}\r\n", route.join(", ")));
        let out = h.send(&bye, outside());
        assert!(
            out.iter().any(|s| s.first_line().starts_with("BYE ")),
            "{out:?}"
        );
        assert_eq!(h.proxy.tunnel_count(), 0);
    }

    /// A tunnel that ended elsewhere (another gateway's BYE, a resynchronisation) takes its
    /// dialog with it: its pinned entry does not stay in the dialog table for ever, and its
    /// Route admits nothing more.
    #[test]
    fn a_tunnel_ended_elsewhere_ends_its_dialog() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let (_, relayed) = establish_tunnel(&mut h);
        let ok = relayed.iter().find(|s| s.status() == Some(200)).unwrap();
        assert_eq!(h.proxy.dialog_count(), 1);
        h.proxy.forget_tunnel("call-1@partner.example", "ft1");
        let now = h.now;
        h.proxy.maintain(now);
        assert_eq!(h.proxy.dialog_count(), 0);
        let out = h.send(&in_dialog("INFO", &caller_route(ok)), outside());
        assert_eq!(out[0].status(), Some(481), "{}", out[0].text);
    }

    #[test]
    fn admin_teardown_sends_bye_both_ways() {
        let mut h = tunnel_harness(store(), "198.51.100.0/24");
        let (_, _) = establish_tunnel(&mut h);
        assert!(h.proxy.teardown("nope", h.now).is_err());
        h.proxy.teardown("call-1@partner.example", h.now).unwrap();
        let out = h.drain();
        let to_endpoint = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE sip:vpn@198.51.100.20:5060"))
            .expect("BYE inward");
        assert!(
            to_endpoint
                .text
                .contains("To: <sip:vpn@org.example>;tag=uas1"),
            "{}",
            to_endpoint.text
        );
        let to_caller = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE sip:alice@203.0.113.5:5062"))
            .expect("BYE outward");
        assert_eq!(
            to_caller.dest,
            Destination::Addr {
                transport: Transport::Udp,
                addr: "192.0.2.200:5062".parse().unwrap(),
                server_name: None
            }
        );
        assert_eq!(h.proxy.tunnel_count(), 0);
    }

    /// Two gateways on one store: a tunnel set up through a balancer (its Record-Route) at
    /// the first is torn down by the second from the stored record alone — the BYE towards
    /// the caller follows the balancer's route — and the row leaves the store.
    #[test]
    fn another_gateway_tears_down_from_the_stored_record() {
        let (dir, path) = file_store_with_alice();
        let mut second = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        let mut first = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        let mut client = ScramClient::new("alice", b"alice-secret", None);
        let plain = tunnel_invite(OFFER);
        let via_balancer = |cseq: u32, auth: Option<&str>| {
            plain(cseq, auth).replacen(
                "Max-Forwards: 70\r\n",
                "Max-Forwards: 70\r\nRecord-Route: <sip:192.0.2.250;lr;ftag=ft1>\r\n",
                1,
            )
        };
        let out = authenticate_with(&mut first, &mut client, &via_balancer);
        let fwd = out
            .into_iter()
            .find(|s| s.first_line().starts_with("INVITE"))
            .unwrap();
        first.send(&answer_with_sdp(&fwd, &answer_sdp()), uas_flow());
        let stored = Store::open(&path)
            .unwrap()
            .tunnel("call-1@partner.example")
            .unwrap()
            .expect("the tunnel's row");
        assert_eq!(
            stored.caller.as_ref().map(|p| p.route.as_str()),
            Some("<sip:192.0.2.250;lr;ftag=ft1>")
        );
        assert!(second
            .proxy
            .teardown("call-1@partner.example", second.now)
            .is_err());
        second.proxy.teardown_stored(stored, second.now).unwrap();
        let out = second.drain();
        let to_caller = out
            .iter()
            .find(|s| s.first_line().starts_with("BYE sip:alice@203.0.113.5:5062"))
            .expect("BYE outward");
        assert!(
            to_caller
                .text
                .contains("\r\nRoute: <sip:192.0.2.250;lr;ftag=ft1>\r\n"),
            "{}",
            to_caller.text
        );
        assert!(out
            .iter()
            .any(|s| s.first_line().starts_with("BYE sip:vpn@198.51.100.20:5060")));
        assert_eq!(second.proxy.tunnel_count(), 0);
        assert_eq!(
            Store::open(&path)
                .unwrap()
                .tunnel("call-1@partner.example")
                .unwrap(),
            None,
            "the row is gone"
        );
        drop((first, second));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A row another gateway proposed and never finished (it was killed mid-set-up): ending it
    /// from the stored record sends no BYE (there is no dialog), removes the row, and leaves
    /// nothing in this gateway's table.
    #[test]
    fn a_proposal_left_by_another_gateway_is_removed_without_bye() {
        let (dir, path) = file_store_with_alice();
        let mut second = tunnel_harness(Store::open(&path).unwrap(), "198.51.100.0/24");
        let proposed = crate::tunnel::Tunnel {
            call_id: "left@partner.example".into(),
            caller_tag: "ft1".into(),
            callee_tag: None,
            identity: "alice".into(),
            from: "sip:alice@partner.example".into(),
            to: "sip:vpn@org.example".into(),
            prefixes: "2001:db8:456::/48".into(),
            pubkey: String::new(),
            pskmth: "scram".into(),
            created_unix: 1,
            state: crate::tunnel::TunnelState::Proposed,
            caller: None,
            callee: None,
        };
        Store::open(&path)
            .unwrap()
            .apply(&[persist::StoreWrite::SaveTunnel(Box::new(proposed.clone()))])
            .unwrap();
        second.proxy.teardown_stored(proposed, second.now).unwrap();
        let out = second.drain();
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(second.proxy.tunnel_count(), 0);
        assert_eq!(
            Store::open(&path)
                .unwrap()
                .tunnel("left@partner.example")
                .unwrap(),
            None,
            "the row is gone"
        );
        drop(second);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Everything the gateway logs at trace level during a full tunnel flow, with no secret in it.
    #[test]
    fn no_secret_in_logs_at_trace_level() {
        use std::io::Write as _;
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        // The process-wide subscriber (this is the only test that installs one): a scoped one
        // races with callsites other test threads register, and the capture then misses lines.
        // Capturing every thread also makes the secret check cover the other tests' flows.
        tracing::subscriber::set_global_default(subscriber)
            .expect("only this test installs a subscriber");
        let (psk, inward) = {
            tracing::trace!("trace logging is on");
            let mut h = tunnel_harness(store(), "198.51.100.0/24");
            let mut client = ScramClient::new("alice", b"alice-secret", None);
            let out = authenticate_with(&mut h, &mut client, &tunnel_invite(OFFER));
            let fwd = out
                .iter()
                .find(|s| s.first_line().starts_with("INVITE"))
                .unwrap();
            let inward = fmtp(&fwd.text);
            let relayed = h.send(&answer_with_sdp(fwd, &answer_sdp()), uas_flow());
            let ok = relayed
                .iter()
                .find(|s| s.status() == Some(200))
                .unwrap()
                .msg();
            let info = ok
                .headers()
                .find(|(i, _)| ok.name_text(*i) == "Proxy-Authentication-Info")
                .map(|(i, _)| ok.value(i).into_owned())
                .unwrap();
            let t = client
                .verify_server_final(
                    &gatehouse_auth::SaslParams::parse(&info)
                        .unwrap()
                        .s2c
                        .unwrap(),
                )
                .unwrap();
            (caller_psk(&t), inward)
        };
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("trace logging is on") && logs.contains("authenticated"),
            "the capture works: {logs}"
        );
        assert!(inward.contains(&psk), "the PSK is real");
        for secret in [psk.as_str(), "alice-secret", "psk="] {
            assert!(!logs.contains(secret), "`{secret}` in the logs:\n{logs}");
        }
        let _ = std::io::sink().flush();
    }
}

/// Realm crossover, foreign side (docs/realm-crossover.md), through the sans-IO core with a
/// sans-IO home (`XoverHome`) playing the partner's crossover service: the rounds are parked
/// and asked as questions (no transaction, no branch), resumed by the home's answers, and the
/// tunnel offer reaches the inside with exactly the caller's key; a handle used from another
/// connection, and a home that never answers, end in 403.
#[test]
fn a_crossover_caller_is_parked_relayed_and_admitted_by_its_home() {
    use base64::Engine;
    use gatehouse_auth::xover::{
        derive_key, Facts, HomeKey, HomeKeys, HomeOutcome, Relayed, XoverClient, XoverHome,
        MECHANISM,
    };
    use gatehouse_auth::{Credential, SaslParams, SaslServer, ServerSettings};

    let mut cfg = config();
    cfg.trusted = Vec::new();
    cfg.crossover = Some(crate::core::crossover::CrossoverCore {
        realms: crate::config::crossover::Allowed::Any,
        deadline: Duration::from_secs(2),
        max_pending: 8,
        max_pending_per_realm: 8,
        max_pending_per_source: 8,
    });
    cfg.tunnels.internal_networks = vec!["198.51.100.0/24".parse().unwrap()];
    cfg.policy = std::sync::Arc::new(
        gatehouse_policy::Policy::parse(
            "[[rule]]\nname = \"x\"\nkind = \"tunnel\"\ncallers = [\"*@partner.example\"]\n\
crossover = [\"partner.example\"]\ntargets = [\"sip:vpn@org.example\"]\npskmth = [\"xover\"]\n",
            "t",
        )
        .unwrap(),
    );
    let mut h = Harness::new();
    h.proxy = new_proxy(cfg);
    let tls = |conn: u64| Flow {
        transport: Transport::Tls,
        local: format!("{GW}:5061").parse().unwrap(),
        remote: "203.0.113.5:40000".parse().unwrap(),
        conn: Some(conn),
    };
    for conn in [1, 2] {
        h.proxy.set_connection_tls(
            conn,
            gatehouse_auth::TlsInfo {
                exporter: vec![conn as u8; 32],
                peer_identity: None,
                ..Default::default()
            },
        );
    }
    // The home: bob's SCRAM verifier at partner.example, its key pair.
    let home_sk = [0x42u8; 32];
    let public = *HomeKey::from_private(&home_sk).unwrap().public();
    let mut home = XoverHome::new(
        HomeKeys {
            realm: "partner.example".into(),
            keys: vec![HomeKey::from_private(&home_sk).unwrap()],
        },
        SaslServer::new(ServerSettings {
            realm: "partner.example".into(),
            mechanisms: vec![gatehouse_auth::Mechanism::ScramSha256],
            ttl: Duration::from_secs(30),
            max_pending: 16,
            max_pending_per_source: 16,
            iterations: 4096,
            secret: gatehouse_auth::Secret::new([1; 32]),
            seed: gatehouse_auth::Secret::new([2; 32]),
        }),
        16,
        Duration::from_secs(30),
    );
    let mut creds = std::collections::HashMap::new();
    creds.insert(
        "bob".to_owned(),
        Credential {
            username: "bob".into(),
            verifier: gatehouse_auth::scram::Verifier::derive(
                b"bob-secret",
                b"0123456789abcdef".to_vec(),
                4096,
            ),
            aors: vec!["sip:bob@partner.example".into()],
            mechanisms: None,
            enabled: true,
        },
    );
    let pubkey = "YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=";
    let body = format!(
        "v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\na=fmtp:vnd.wireguard pubkey={pubkey};prefix=2001:db8:b0b::/64;pskmth=xover\r\n"
    );
    let invite = |cseq: u32, auth: Option<&SaslParams>| {
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        format!(
            "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/TLS 203.0.113.5:40000;branch=z9hG4bKx{cseq};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@partner.example>;tag=b1\r\nTo: <sip:vpn@org.example>\r\n\
Call-ID: xover-1@partner.example\r\nCSeq: {cseq} INVITE\r\nContact: <sip:bob@203.0.113.5:40000;transport=tls>\r\n\
{auth}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let facts = Facts {
        foreign_domain: "org.example".into(),
        call_id: "xover-1@partner.example".into(),
        from_tag: "b1".into(),
        from_aor: "sip:bob@partner.example".into(),
        channel_binding: vec![1; 32],
        offer_pubkey: base64::engine::general_purpose::STANDARD
            .decode(pubkey)
            .unwrap(),
        offer_prefix: "2001:db8:b0b::/64".into(),
    };
    // Round 0: the challenge offers SXOVER-PLUS on TLS.
    let out = h.send(&invite(1, None), tls(1));
    let offered = out[0]
        .msg()
        .value_of(HeaderName::ProxyAuthenticate)
        .unwrap()
        .into_owned();
    assert!(offered.contains(MECHANISM), "{offered}");
    // Round 1: parked, nothing sent; the question carries what this gateway sees.
    let (mut client, c1) = XoverClient::start(
        &public,
        "bob@partner.example",
        b"bob-secret",
        facts.clone(),
        [9; 32],
        None,
    )
    .unwrap();
    let p1 = SaslParams {
        realm: Some("org.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(c1),
        ..SaslParams::default()
    };
    assert!(h.send(&invite(2, Some(&p1)), tls(1)).is_empty());
    assert_eq!(
        h.proxy.transactions(),
        0,
        "no transaction for a parked round"
    );
    let q = h.proxy.poll_crossover().expect("a question for the driver");
    assert_eq!(q.realm, "partner.example");
    assert_eq!(q.facts.channel_binding, vec![1; 32]);
    assert_eq!(q.facts.foreign_domain, "org.example");
    let domains = vec!["org.example".to_owned()];
    let source: std::net::IpAddr = GW.parse().unwrap();
    let home_now = h.now;
    let mut ask = |q: &crate::core::crossover::Question| {
        let rel = Relayed {
            facts: &q.facts,
            domains: &domains,
            source,
        };
        match home.step(&q.params, &rel, &creds, &|_| false, home_now) {
            Ok(HomeOutcome::Challenge { handle, token }) => {
                crate::core::crossover::Answer::Challenge { handle, token }
            }
            Ok(HomeOutcome::Success {
                identity,
                released_to,
                key,
                token,
                ..
            }) => crate::core::crossover::Answer::Success {
                identity,
                released_to,
                key,
                token,
            },
            Err(_) => crate::core::crossover::Answer::Refused,
        }
    };
    let answer = ask(&q);
    h.proxy.handle_crossover(q.id, answer, h.now);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status(), Some(407));
    let ch = SaslParams::parse(
        &out[0]
            .msg()
            .value_of(HeaderName::ProxyAuthenticate)
            .unwrap(),
    )
    .unwrap();
    let c2 = client.step(&ch.s2c.clone().unwrap()).unwrap();
    let p2 = SaslParams {
        realm: Some("org.example".into()),
        s2s: ch.s2s.clone(),
        c2s: Some(c2),
        ..SaslParams::default()
    };
    // Our handle from another TLS connection: refused without asking the home.
    let stolen = h.send(&invite(3, Some(&p2)), tls(2));
    assert_eq!(stolen[0].status(), Some(403));
    assert!(h.proxy.poll_crossover().is_none());
    // (The handle is single use: the genuine caller starts again from round 1.)
    let (mut client, c1) = XoverClient::start(
        &public,
        "bob@partner.example",
        b"bob-secret",
        facts.clone(),
        [8; 32],
        None,
    )
    .unwrap();
    let p1 = SaslParams {
        c2s: Some(c1),
        ..p1
    };
    assert!(h.send(&invite(4, Some(&p1)), tls(1)).is_empty());
    let q = h.proxy.poll_crossover().unwrap();
    let answer = ask(&q);
    h.proxy.handle_crossover(q.id, answer, h.now);
    let out = h.drain();
    let ch = SaslParams::parse(
        &out[0]
            .msg()
            .value_of(HeaderName::ProxyAuthenticate)
            .unwrap(),
    )
    .unwrap();
    let c2 = client.step(&ch.s2c.clone().unwrap()).unwrap();
    let p2 = SaslParams {
        realm: Some("org.example".into()),
        s2s: ch.s2s,
        c2s: Some(c2),
        ..SaslParams::default()
    };
    assert!(h.send(&invite(5, Some(&p2)), tls(1)).is_empty());
    let q = h.proxy.poll_crossover().unwrap();
    let answer = ask(&q);
    h.proxy.handle_crossover(q.id, answer, h.now);
    let out = h.drain();
    // Relayed inward with the key the caller derives; 100 Trying to the caller.
    let fwd = out
        .iter()
        .find(|s| s.first_line().starts_with("INVITE"))
        .expect("relayed inward");
    assert!(fwd.msg().value_of(HeaderName::ProxyAuthorization).is_none());
    let ok = answer_ok(fwd);
    let out = h.send(&ok, uas_flow());
    let to_caller = out.iter().find(|s| s.status() == Some(200)).unwrap();
    let reply = to_caller.msg();
    let info = reply
        .headers()
        .find(|(i, _)| {
            reply
                .name_text(*i)
                .eq_ignore_ascii_case("Proxy-Authentication-Info")
        })
        .map(|(i, _)| reply.value(i).into_owned())
        .expect("the home's final token");
    let info = SaslParams::parse(&info).unwrap();
    let ok = client.finish(&info.s2c.unwrap()).unwrap();
    let key = derive_key(&ok.transcript, &facts);
    let psk = base64::engine::general_purpose::STANDARD.encode(key.expose());
    assert!(fwd.text.contains(&format!("psk={psk}")), "{}", fwd.text);
    assert!(!to_caller.text.contains("psk="));

    // A home that never answers: the round ends in 403 at the deadline, nothing else waits.
    let (_, c1) = XoverClient::start(
        &public,
        "bob@partner.example",
        b"bob-secret",
        facts,
        [7; 32],
        None,
    )
    .unwrap();
    let p1 = SaslParams {
        realm: Some("org.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(c1),
        ..SaslParams::default()
    };
    assert!(h.send(&invite(6, Some(&p1)), tls(1)).is_empty());
    let _unanswered = h.proxy.poll_crossover().unwrap();
    h.now += Duration::from_secs(3);
    h.proxy.maintain(h.now);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status(), Some(403));

    // One source has at most `max_pending_per_source` (8 here) rounds waiting for homes.
    for cseq in 10..18 {
        assert!(h.send(&invite(cseq, Some(&p1)), tls(1)).is_empty());
    }
    let out = h.send(&invite(18, Some(&p1)), tls(1));
    assert_eq!(out[0].status(), Some(503), "{}", out[0].text);
}

/// A 200 with a WireGuard answer (`pskmth=gateway`) to a forwarded INVITE.
fn answer_ok(fwd: &Sent) -> String {
    let body = "v=0\r\no=- 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\n\
m=application 51821 udp vnd.wireguard\r\na=fmtp:vnd.wireguard pubkey=pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=;prefix=2001:db8:789:1::/64;pskmth=gateway\r\n";
    answer(fwd, 200, "OK", "Content-Type: application/sdp\r\n").replace(
        "Content-Length: 0\r\n\r\n",
        &format!("Content-Length: {}\r\n\r\n{body}", body.len()),
    )
}
