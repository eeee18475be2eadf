//! RFC 3263 against a real DNS server: dnsmasq, started by the test on a loopback port with
//! NAPTR, SRV and A records of partner domains under `.test`, and a gateway whose `[dns]
//! servers` names it. Answerers are UDP sockets of the test.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    bin, free_port, gateway_config, tool, wait_udp_bound, Gateway, Proc, TempDir,
};
use gatehouse::flow::Transport;

/// A UDP answerer: answers each INVITE with 200 OK and remembers its Request-URI.
struct Answerer {
    sock: UdpSocket,
    seen: std::cell::RefCell<Vec<String>>,
}

impl Answerer {
    fn bind() -> Answerer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Answerer {
            sock,
            seen: Default::default(),
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    /// Answers what has arrived, noting the Request-URIs of the INVITEs.
    fn answer(&self) {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let Some(rest) = text.strip_prefix("INVITE ") else {
                continue;
            };
            self.seen
                .borrow_mut()
                .push(rest.split(' ').next().unwrap_or("").to_owned());
            let mut resp = String::from("SIP/2.0 200 OK\r\n");
            for line in text.lines() {
                let name = line.split(':').next().unwrap_or("").trim();
                match name.to_ascii_lowercase().as_str() {
                    "via" | "from" | "call-id" | "cseq" | "record-route" => {
                        resp.push_str(line);
                        resp.push_str("\r\n");
                    }
                    "to" => {
                        resp.push_str(line);
                        resp.push_str(";tag=answerer\r\n");
                    }
                    _ => {}
                }
            }
            resp.push_str(&format!(
                "Contact: <sip:bob@127.0.0.1:{}>\r\nContent-Length: 0\r\n\r\n",
                self.port()
            ));
            self.sock.send_to(resp.as_bytes(), from).unwrap();
        }
    }

    fn saw(&self, ruri: &str) -> bool {
        self.seen.borrow().iter().any(|u| u == ruri)
    }
}

/// Sends an INVITE for `ruri` from a trusted loopback caller; the first final response.
fn call(gw: SocketAddr, ruri: &str, call_id: &str, answerers: &[&Answerer]) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let invite = format!(
        "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{call_id};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:alice@org.example>;tag=a1\r\nTo: <{ruri}>\r\nCall-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\nContact: <sip:alice@{local}>\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(invite.as_bytes(), gw).unwrap();
    let mut buf = vec![0u8; 65_536];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        for a in answerers {
            a.answer();
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.starts_with("SIP/2.0 1") {
                return text;
            }
        }
    }
    panic!("no final response to {ruri}");
}

#[test]
fn partner_domains_are_located_through_naptr_and_srv_with_failover() {
    if !tool("dnsmasq") {
        return;
    }
    let dir = TempDir::new("dns");
    let d = dir.path();
    let first = Answerer::bind();
    let second = Answerer::bind();
    // Nothing listens there: a TCP connect is refused at once.
    let dead = free_port();
    // Bound but never answers: a UDP server that is down without saying so.
    let mute = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let dns_port = free_port();
    let (p1, p2) = (first.port(), second.port());
    let mut dnsmasq = Proc::spawn(
        "dnsmasq",
        Command::new("dnsmasq").args([
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--bind-interfaces".to_owned(),
            "--listen-address=127.0.0.1".to_owned(),
            format!("--port={dns_port}"),
            "--pid-file=".to_owned(),
            "--log-queries".to_owned(),
            "--log-facility=-".to_owned(),
            // Everything under .test is answered here (NXDOMAIN when unknown).
            "--local=/test/".to_owned(),
            // partner.test: TCP first by NAPTR order, its only server dead; then UDP.
            "--naptr-record=partner.test,10,10,s,SIP+D2T,,_sip._tcp.partner.test".to_owned(),
            "--naptr-record=partner.test,20,10,s,SIP+D2U,,_sip._udp.partner.test".to_owned(),
            format!("--srv-host=_sip._tcp.partner.test,dead.partner.test,{dead},10,0"),
            format!("--srv-host=_sip._udp.partner.test,live.partner.test,{p1},10,0"),
            "--host-record=dead.partner.test,127.0.0.1".to_owned(),
            "--host-record=live.partner.test,127.0.0.1".to_owned(),
            // The domain's own address, where a resolver ignoring NAPTR/SRV would go.
            "--host-record=partner.test,127.0.0.2".to_owned(),
            // srv.test: no NAPTR; two UDP servers, the lower priority number first.
            format!("--srv-host=_sip._udp.srv.test,b.srv.test,{p1},20,0"),
            format!("--srv-host=_sip._udp.srv.test,a.srv.test,{p2},10,0"),
            "--host-record=a.srv.test,127.0.0.1".to_owned(),
            "--host-record=b.srv.test,127.0.0.1".to_owned(),
            // silent.test: the preferred UDP server never answers, the second does.
            format!("--srv-host=_sip._udp.silent.test,mute.silent.test,{mute_port},10,0"),
            format!("--srv-host=_sip._udp.silent.test,live.silent.test,{p1},20,0"),
            "--host-record=mute.silent.test,127.0.0.1".to_owned(),
            "--host-record=live.silent.test,127.0.0.1".to_owned(),
        ]),
        d,
    );
    wait_udp_bound(&mut dnsmasq, dns_port);
    let extra = format!(
        "[dns]\nservers = [\"127.0.0.1:{dns_port}\"]\ntimeout_ms = 1000\n\
[timers]\nfailover_ms = 400\n\
[[route]]\ndomain = \"silent.test\"\ntarget = \"sip:silent.test\"\n\
[[route]]\ndomain = \"partner.test\"\ntarget = \"sip:partner.test\"\n\
[[route]]\ndomain = \"srv.test\"\ntarget = \"sip:srv.test\"\n\
[[route]]\ndomain = \"nowhere.test\"\ntarget = \"sip:nowhere.test\"\n"
    );
    let gw = Gateway::start(&gateway_config(&["udp", "tcp"], &extra));
    let gw_udp = gw.addr(Transport::Udp);

    // NAPTR -> SRV (TCP) -> connection refused -> next NAPTR (UDP) -> SRV -> A -> answered.
    let ok = call(gw_udp, "sip:bob@partner.test", "dns-1", &[&first, &second]);
    assert!(
        ok.starts_with("SIP/2.0 200"),
        "{ok}\ndnsmasq:\n{}",
        dnsmasq.log_text()
    );
    let log = dnsmasq.log_text();
    let asked = |q: &str| {
        log.find(q)
            .unwrap_or_else(|| panic!("{q} not asked:\n{log}"))
    };
    // The order of RFC 3263: NAPTR, then the SRV names it gave, TCP before UDP.
    assert!(asked("query[NAPTR] partner.test") < asked("query[SRV] _sip._tcp.partner.test"));
    assert!(
        asked("query[SRV] _sip._tcp.partner.test") < asked("query[SRV] _sip._udp.partner.test")
    );
    assert!(!log.contains("query[A] partner.test"), "{log}");
    // The Request-URI is the caller's: the route named only the domain.
    assert!(first.saw("sip:bob@partner.test"));

    // No NAPTR: SRV, the lowest priority number first.
    for (n, user) in ["carol", "dave"].iter().enumerate() {
        let ruri = format!("sip:{user}@srv.test");
        let ok = call(gw_udp, &ruri, &format!("dns-srv-{n}"), &[&first, &second]);
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        assert!(second.saw(&ruri) && !first.saw(&ruri), "{ruri}");
    }

    // A silent UDP server (RFC 3263 would wait for Timer B, 32 s): after failover_ms without
    // a word from it, the next SRV target; the mute one saw the INVITE (and its
    // retransmission), then nothing more. (`call` gives up after 20 s: Timer B would not do.)
    let answered_by_the_live_server = |user: &str, call_id: &str| {
        let ruri = format!("sip:{user}@silent.test");
        let ok = call(gw_udp, &ruri, call_id, &[&first, &second]);
        assert!(ok.starts_with("SIP/2.0 200"), "{ok}");
        assert!(first.saw(&ruri), "{ruri}");
    };
    answered_by_the_live_server("frank", "dns-silent");
    mute.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut to_mute = 0;
    while let Ok((n, _)) = mute.recv_from(&mut buf) {
        assert!(buf[..n].starts_with(b"INVITE sip:frank@silent.test "));
        to_mute += 1;
    }
    assert!(
        (1..=2).contains(&to_mute),
        "{to_mute} INVITEs to the silent server"
    );
    // The next call does not wait for it again: the address that failed is tried last
    // (dead_address_ms, 60 s by default), so the INVITE goes straight to the live one.
    answered_by_the_live_server("grace", "dns-silent-2");
    assert!(
        mute.recv_from(&mut buf).is_err(),
        "the silent server was asked again"
    );

    // A name DNS does not know: 503 with the reason, at once.
    let started = std::time::Instant::now();
    let refused = call(gw_udp, "sip:erin@nowhere.test", "dns-4", &[&first, &second]);
    assert!(
        refused.starts_with("SIP/2.0 503 Service Unavailable (next hop not found in DNS)"),
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    gw.stop();

    // `check-config --resolve` shows where each route target would go, in order, and fails on
    // a name without an address.
    let file = d.join("gateway.toml");
    std::fs::write(&file, gateway_config(&["udp", "tcp"], &extra)).unwrap();
    let out = Command::new(bin("gatehouse"))
        .args(["check-config", "--resolve"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "partner.test: tcp 127.0.0.1:{dead}, udp 127.0.0.1:{p1}\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "srv.test: udp 127.0.0.1:{p2}, udp 127.0.0.1:{p1}\n"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("nowhere.test: not found in DNS"),
        "{stderr}"
    );
}
