//! The second round of attacks (issue 18) against a running gateway, end to end: each asserts
//! that the attack fails and that the victim (a call, a target, an address) is unharmed.
//! The tunnel takeover (item 3) is shown in the core (`a_tunnel_cannot_take_over_another_
//! identitys_prefix_or_key`) and at the endpoint (`wgsip` `endpoint::tests`).

use std::net::UdpSocket;
use std::time::Duration;

use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use gatehouse_sip::flow::Transport;
use gatehouse_sip::{HeaderName, Message};

use crate::admin::admin_setup;
use crate::client::{header, SipClient};
use crate::harness::WAIT;
use crate::operations::{http_get, sample};
use crate::sasl::{challenge, setup_policy, setup_with, Call, Uas};
use gatehouse::admin::client::AdminClient;

/// How long a test listens for a message that must not come, after the event that would
/// have come after it (the gateway's own answer) arrived.
const QUIET: Duration = Duration::from_millis(300);

/// The three SCRAM rounds of an INVITE built by `build` from the plain round; returns the
/// final answer.
fn rounds(
    client: &mut SipClient,
    scram: &mut ScramClient,
    call: &mut Call,
    build: &dyn Fn(String) -> String,
) -> Message {
    client.send(&build(call.invite(client, None)));
    let r1 = client.recv_final_or_challenge();
    assert_eq!(r1.status(), Some(407), "{r1:?}");
    let p = SaslParams {
        realm: Some("org.example".into()),
        mech: Some(scram.mechanism().into()),
        c2s: Some(scram.client_first()),
        ..SaslParams::default()
    };
    client.send(&build(call.invite(client, Some(&p))));
    let r2 = client.recv_final_or_challenge();
    assert_eq!(r2.status(), Some(407), "{r2:?}");
    let c = challenge(&r2);
    let p = SaslParams {
        realm: Some("org.example".into()),
        s2s: c.s2s,
        c2s: Some(scram.client_final(&c.s2c.unwrap()).unwrap()),
        ..SaslParams::default()
    };
    client.send(&build(call.invite(client, Some(&p))));
    client.recv_final_or_challenge()
}

/// alice may reach `sip:vpn@org.example` only; the domain's route sends everything else at
/// org.example to the PBX. A Request-URI naming the PBX's users (or its dial-out) with To vpn
/// is judged as what it is: 403, and the PBX hears nothing.
#[test]
fn to_cannot_smuggle_a_request_past_the_policy() {
    let pbx = Uas::start();
    let s = setup_policy(
        None,
        &format!("[[route]]\ndomain = \"org.example\"\ntarget = \"sip:{}\"\n", pbx.addr),
        "[[rule]]\nname = \"alice-vpn\"\nkind = \"any\"\ncallers = [\"sip:alice@partner.example\"]\n\
targets = [\"sip:vpn@org.example\"]\n",
        |_| {},
    );
    let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
    for ruri in ["sip:ceo@org.example", "sip:+15550100@org.example"] {
        let mut scram = ScramClient::new("alice", b"alice-secret", None);
        let mut call = Call::new("smuggle");
        let build =
            |m: String| m.replacen("INVITE sip:vpn@org.example", &format!("INVITE {ruri}"), 1);
        let r = rounds(&mut client, &mut scram, &mut call, &build);
        assert_eq!(r.status(), Some(403), "{ruri}: {r:?}");
        assert!(
            header(&r, "Warning").is_some_and(|w| w.contains("policy")),
            "{r:?}"
        );
    }
    assert!(
        pbx.requests.recv_timeout(QUIET).is_err(),
        "nothing reached the PBX"
    );
    // The permitted target still works.
    let mut scram = ScramClient::new("alice", b"alice-secret", None);
    let mut call = Call::new("vpn");
    let r = rounds(&mut client, &mut scram, &mut call, &|m| m);
    assert_eq!(r.status(), Some(200), "{r:?}");
}

/// After a call, its Route entry admits requests to that call's peer only, and only while the
/// call lives: OPTIONS to another UDP host, MESSAGE through a Route of the attacker's, a TCP
/// INVITE to a closed port (the port scanner) are refused, nothing reaches the victim host,
/// and after the BYE the entry admits nothing.
#[test]
fn a_dialogs_route_is_not_a_bearer_token() {
    let s = setup_with("", |_| {});
    let victim = UdpSocket::bind("127.0.0.1:0").unwrap();
    victim.set_read_timeout(Some(QUIET)).unwrap();
    let victim_addr = victim.local_addr().unwrap();
    let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
    let mut scram = ScramClient::new("alice", b"alice-secret", None);
    let mut call = Call::new("bearer");
    let ok = rounds(&mut client, &mut scram, &mut call, &|m| m);
    assert_eq!(ok.status(), Some(200), "{ok:?}");
    assert!(s
        .uas
        .requests
        .recv_timeout(WAIT)
        .unwrap()
        .starts_with("INVITE "));
    let route: Vec<String> = ok
        .list_values(HeaderName::RecordRoute)
        .into_iter()
        .rev()
        .collect();
    let to = ok.value_of(HeaderName::To).unwrap().into_owned();
    let local = client.local;
    let request = |method: &str, ruri: &str, route: &str, n: u32| {
        format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKatk{n}x{cid};rport\r\nMax-Forwards: 70\r\n\
Route: {route}\r\nFrom: <sip:alice@partner.example>;tag=alice1\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: {n} {method}\r\n\
Content-Length: 0\r\n\r\n",
            l = local,
            cid = call.call_id,
        )
    };
    let ours = route.join(", ");
    let attacks = [
        request("OPTIONS", &format!("sip:x@{victim_addr}"), &ours, 10),
        request(
            "MESSAGE",
            &format!("sip:vpn@{}", s.uas.addr),
            &format!("{ours}, <sip:{victim_addr};lr>"),
            11,
        ),
        request("INVITE", "sip:x@127.0.0.1:9;transport=tcp", &ours, 12),
    ];
    for attack in &attacks {
        client.send(attack);
        let r = client.recv_final_or_challenge();
        assert_eq!(r.status(), Some(403), "{attack}\n{r:?}");
    }
    assert!(
        victim.recv_from(&mut [0u8; 2048]).is_err(),
        "nothing reached the victim host"
    );
    // The call itself is unharmed: its BYE reaches the UAS and is answered.
    let bye = request("BYE", &format!("sip:vpn@{}", s.uas.addr), &ours, 20);
    client.send(&bye);
    assert_eq!(client.recv_final_or_challenge().status(), Some(200));
    // The call is over: its entry admits nothing more.
    client.send(&request(
        "INFO",
        &format!("sip:vpn@{}", s.uas.addr),
        &ours,
        21,
    ));
    assert_eq!(client.recv_final_or_challenge().status(), Some(481));
}

/// Guessing an admin password from one source: after the lockout threshold the right
/// password is refused too (from that source), each failure is counted, and another admin's
/// login elsewhere is unaffected.
#[test]
fn admin_logins_are_locked_out_like_sip() {
    let (s, addr) = admin_setup("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    for _ in 0..10 {
        let err = AdminClient::new(addr, "root", "guess")
            .request("GET", "/api/v1/status", None)
            .unwrap_err();
        assert!(err.to_string().contains("403"), "{err}");
    }
    let err = AdminClient::new(addr, "root", "root-secret")
        .request("GET", "/api/v1/status", None)
        .unwrap_err();
    assert!(
        err.to_string().contains("403"),
        "locked out after the guesses: {err}"
    );
    // Another admin is not locked out by root's guesser.
    let mut viewer = AdminClient::new(addr, "viewer", "viewer-secret");
    assert_eq!(
        viewer
            .request("GET", "/api/v1/status", None)
            .unwrap()
            .status,
        200
    );
    let (_, text) = http_get(s.gw.metrics.expect("metrics listener"), "/metrics");
    let failures = sample(&text, "gatehouse_admin_logins_total{outcome=\"failure\"}").unwrap();
    let locked = sample(&text, "gatehouse_admin_logins_total{outcome=\"locked\"}").unwrap();
    assert!(failures >= 5.0, "failures counted: {failures}");
    assert!(locked >= 1.0, "refusals while locked counted: {locked}");
}

/// One request spoofed from a victim's address draws one answer to the victim; copies of it
/// from another address are answered to that address, not to the victim.
#[test]
fn the_stateless_cache_is_no_reflector() {
    let s = setup_with("", |_| {});
    let gw = s.gw.addr(Transport::Udp);
    let victim = UdpSocket::bind("127.0.0.1:0").unwrap();
    victim.set_read_timeout(Some(WAIT)).unwrap();
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    attacker.set_read_timeout(Some(WAIT)).unwrap();
    // The "spoofed" request: sent from the victim's socket, as a spoofer would.
    let invite = format!(
        "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKreflect;rport\r\nMax-Forwards: 70\r\n\
From: <sip:alice@partner.example>;tag=r1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: reflect@test\r\nCSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n",
        victim.local_addr().unwrap()
    );
    victim.send_to(invite.as_bytes(), gw).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = victim.recv_from(&mut buf).expect("the first answer");
    assert!(buf[..n].starts_with(b"SIP/2.0 407"));
    for _ in 0..20 {
        attacker.send_to(invite.as_bytes(), gw).unwrap();
        let (n, _) = attacker
            .recv_from(&mut buf)
            .expect("each copy is answered to its own sender");
        assert!(buf[..n].starts_with(b"SIP/2.0 407"));
    }
    victim.set_read_timeout(Some(QUIET)).unwrap();
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "the victim got nothing more"
    );
}

/// The admin listener cannot be filled: one source gets 8 connections, the 9th is closed at
/// once; a connection that starts a request and never finishes its header is closed after
/// the header deadline (5 s); places given back are free again for the operator.
#[test]
fn the_admin_listener_has_caps_and_deadlines() {
    use std::io::{Read, Write};
    let (_s, addr) = admin_setup("");
    let mut held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // The 9th from the same source is closed by the gateway: end of stream, without waiting.
    let mut ninth = std::net::TcpStream::connect(addr).unwrap();
    ninth.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(
        ninth.read(&mut [0u8; 64]).expect("closed, not silent"),
        0,
        "the 9th connection of one source is closed"
    );
    // Slowloris: a request begun and never finished is ended by the gateway.
    held[0]
        .write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    held[0]
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = held[0]
        .read(&mut buf)
        .expect("the gateway ends the connection before the test's limit");
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Places given back are free again.
    held.truncate(4);
    let mut c = AdminClient::new(addr, "root", "root-secret");
    assert_eq!(
        c.request("GET", "/api/v1/status", None).unwrap().status,
        200
    );
}
