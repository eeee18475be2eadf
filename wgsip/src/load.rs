//! `gatehouse-load`: complete SASL tunnel set-ups against a gateway at a target rate — what
//! SIPp cannot do, since it does not speak SASL.
//!
//! Each call is the real caller's flow (`wgsip call` without WireGuard): INVITE with a
//! WireGuard offer -> 407 with the mechanisms (ACK) -> INVITE with client-first -> 407 with
//! server-first (ACK) -> INVITE with client-final -> 200 whose `Proxy-Authentication-Info`
//! carries the server-final, which is verified (a set-up whose gateway does not prove itself
//! counts as failed) -> ACK and BYE along the route set. The set-up time is from the first
//! INVITE to the verified 200. One UDP socket, no retransmissions (a lost datagram shows as
//! a timeout: on loopback there are none unless something is overloaded).
//!
//! PBKDF2 runs once per run (the SaltedPassword is cached, RFC 5802 section 5.1), so the
//! client's own cost per set-up is a few HMACs, and the gateway is what gets measured.
//!
//! Over TLS (`tls`: one connection, verified against a CA) the exchange is SCRAM-SHA-256-PLUS
//! bound to the connection. With `crossover` the caller is a stranger to the gateway: it
//! answers the gateway's 407 with SXOVER-PLUS sealed to its home's key (docs/realm-crossover.md),
//! two rounds relayed by the gateway to the home, and verifies the home's statement; each
//! set-up then costs the client an HPKE set-up and its own PBKDF2 (the exchange is sealed: no
//! cache), the foreign gateway its relays and the home its verification — measure each process.

// A load tool reports on standard output.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use gatehouse_auth::scram::{SaltedCache, ScramClient};
use gatehouse_auth::xover::{self, Facts, XoverClient};
use gatehouse_auth::SaslParams;
use gatehouse_sip::{HeaderName, Limits, Message, NameAddr};

use crate::sipua::{header, token, Ua};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub gateway: SocketAddr,
    /// Where to bind (port 0: any).
    pub local: SocketAddr,
    /// The AOR called, e.g. `sip:vpn@org.example`.
    pub target: String,
    pub username: String,
    pub password: String,
    /// The From AOR (an AOR of `username`).
    pub from: String,
    /// Set-ups started per second.
    pub rate: u32,
    /// Set-ups in all.
    pub count: u32,
    /// Set-ups in flight at most (a new one waits for a place).
    pub concurrency: usize,
    /// A set-up not finished in this time fails.
    pub timeout: Duration,
    /// Print a progress line every second.
    pub progress: bool,
    /// Leave each tunnel up after its ACK (no BYE).
    pub hold: bool,
    /// One TLS connection instead of UDP.
    pub tls: Option<TlsTarget>,
    /// Realm crossover: authenticate by the caller's home through the gateway (TLS only).
    pub crossover: Option<CrossoverCaller>,
}

/// The gateway's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// PEM file of the CA its certificate chains to.
    pub ca: std::path::PathBuf,
    /// The name its certificate must carry (default: its address).
    pub server_name: Option<String>,
}

/// A caller the gateway does not know, vouched for by its home.
#[derive(Debug, Clone)]
pub struct CrossoverCaller {
    /// The home realm's HPKE public key.
    pub home_key: [u8; 32],
    /// `user@realm` at the home.
    pub identity: String,
}

/// What happened.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub started: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Set-ups that succeeded but whose BYE was never answered (the gateway holding the
    /// dialog gone, with nobody to take its in-dialog requests over).
    pub byes_unanswered: u32,
    /// Failures by reason (`407 then 403`, `timeout`, `server-final`...).
    pub failures: HashMap<String, u32>,
    /// Set-up times of the successful set-ups, sorted.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// The `q` quantile (0..=1) of the set-up times.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies.get(i).copied()
    }

    /// Set-ups per second achieved.
    pub fn rate(&self) -> f64 {
        self.succeeded as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The summary printed at the end.
    pub fn summary(&self) -> String {
        let ms =
            |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3));
        let mut s = format!(
            "set-ups: {} started, {} succeeded, {} failed in {:.2} s ({:.0}/s)\n\
             set-up time ms: p50 {} p90 {} p99 {} p99.9 {} max {}\n",
            self.started,
            self.succeeded,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.rate(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.9)),
            ms(self.quantile(0.99)),
            ms(self.quantile(0.999)),
            ms(self.latencies.last().copied()),
        );
        if self.byes_unanswered > 0 {
            s.push_str(&format!("BYE unanswered: {}\n", self.byes_unanswered));
        }
        let mut reasons: Vec<_> = self.failures.iter().collect();
        reasons.sort();
        for (reason, n) in reasons {
            s.push_str(&format!("failed: {n} x {reason}\n"));
        }
        s
    }
}

/// Where one set-up is.
enum Stage {
    /// INVITE without credentials sent; waiting for the 407 with the mechanisms.
    Offered,
    /// client-first sent; waiting for server-first.
    First,
    /// client-final sent; waiting for the 200 with the server-final.
    Final,
    /// 200 verified, BYE sent; waiting for its 200.
    Closing,
}

/// How a set-up authenticates.
enum Auth {
    /// With the gateway itself.
    Scram(ScramClient),
    /// With its home, through the gateway: the facts it seals, then the exchange.
    Xover(Facts, Option<Box<XoverClient>>),
}

struct Call {
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// Branch of the INVITE in flight (its ACK for a 407 reuses it).
    branch: String,
    auth: Auth,
    stage: Stage,
    started: Instant,
    /// Its WireGuard offer: a key and a prefix of its own (no two live tunnels share either:
    /// the gateway and the endpoint refuse a second claim).
    offer: String,
}

/// The offer of one set-up: a public key derived from its Call-ID and a /128 of its own
/// inside `2001:db8:456:1::/64` (`run` is this run's random salt, `n` the set-up's number);
/// returns the SDP, the key and the prefix.
fn offer(call_id: &str, run: u32, n: u32, pskmth: &str) -> (String, [u8; 32], String) {
    use base64::Engine;
    use sha2::Digest;
    let raw: [u8; 32] = sha2::Sha256::digest(call_id).into();
    let key = base64::engine::general_purpose::STANDARD.encode(raw);
    let prefix = format!(
        "2001:db8:456:1:{:x}:{:x}:{:x}:{:x}/128",
        run >> 16,
        run & 0xffff,
        n >> 16,
        n & 0xffff
    );
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey={key};prefix={prefix};pskmth={pskmth}\r\n"
    );
    (sdp, raw, prefix)
}

/// The way to the gateway: a UDP socket, or one TLS connection.
enum Wire {
    Udp(UdpSocket),
    Tls(Box<Ua>),
}

struct Runner<'a> {
    o: &'a LoadOptions,
    wire: Wire,
    local: SocketAddr,
    calls: HashMap<String, Call>,
    salted: SaltedCache,
    report: LoadReport,
    /// This run's salt in its offers' prefixes (runs of one identity overlap in time).
    run: u32,
}

impl Runner<'_> {
    fn send(&self, text: &str) {
        // A send error on loopback means the socket buffer is full: the set-up times out
        // and is counted, which is what overload should look like.
        match &self.wire {
            Wire::Udp(sock) => {
                let _ = sock.send_to(text.as_bytes(), self.o.gateway);
            }
            Wire::Tls(ua) => {
                let _ = ua.send(text, self.o.gateway);
            }
        }
    }

    /// The Via transport and the Contact's parameters.
    fn transport(&self) -> (&'static str, &'static str) {
        match &self.wire {
            Wire::Udp(_) => ("UDP", ""),
            Wire::Tls(_) => ("TLS", ";transport=tls"),
        }
    }

    /// The connection's tls-exporter (channel binding), over TLS.
    fn channel_binding(&self) -> Option<Vec<u8>> {
        match &self.wire {
            Wire::Udp(_) => None,
            Wire::Tls(ua) => ua.channel_binding(),
        }
    }

    fn invite(&self, c: &Call, auth: Option<&SaslParams>) -> String {
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        let (tp, cp) = self.transport();
        format!(
            "INVITE {t} SIP/2.0\r\nVia: SIP/2.0/{tp} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n\
From: <{f}>;tag={tag}\r\nTo: <{t}>\r\nCall-ID: {cid}\r\nCSeq: {s} INVITE\r\nContact: <sip:{u}@{l}{cp}>\r\n{auth}\
Content-Type: application/sdp\r\nContent-Length: {n}\r\n\r\n{o}",
            t = self.o.target,
            l = self.local,
            b = c.branch,
            f = self.o.from,
            tag = c.from_tag,
            cid = c.call_id,
            s = c.cseq,
            u = self.o.username,
            n = c.offer.len(),
            o = c.offer,
        )
    }

    /// ACK of a non-2xx final response: same branch, same CSeq number, the response's To.
    fn ack_non_2xx(&self, c: &Call, resp: &Message) -> String {
        let (tp, _) = self.transport();
        format!(
            "ACK {t} SIP/2.0\r\nVia: SIP/2.0/{tp} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n\
From: <{f}>;tag={tag}\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: {s} ACK\r\nContent-Length: 0\r\n\r\n",
            t = self.o.target,
            l = self.local,
            b = c.branch,
            f = self.o.from,
            tag = c.from_tag,
            to = resp.value_of(HeaderName::To).unwrap_or_default(),
            cid = c.call_id,
            s = c.cseq,
        )
    }

    /// ACK or BYE in the dialog a 2xx made (Request-URI = Contact, Route = Record-Route
    /// reversed).
    fn in_dialog(&self, c: &Call, ok: &Message, method: &str, cseq: u32) -> String {
        let contact = ok
            .value_of(HeaderName::Contact)
            .and_then(|v| NameAddr::parse(&v).map(|n| n.uri.to_owned()))
            .unwrap_or_else(|| self.o.target.clone());
        let rr = ok.list_values(HeaderName::RecordRoute);
        let route = if rr.is_empty() {
            String::new()
        } else {
            let rev: Vec<String> = rr.into_iter().rev().collect();
            format!("Route: {}\r\n", rev.join(", "))
        };
        let (tp, _) = self.transport();
        format!(
            "{method} {contact} SIP/2.0\r\nVia: SIP/2.0/{tp} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n{route}\
From: <{f}>;tag={tag}\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
            l = self.local,
            b = token(),
            f = self.o.from,
            tag = c.from_tag,
            to = ok.value_of(HeaderName::To).unwrap_or_default(),
            cid = c.call_id,
        )
    }

    fn start(&mut self, now: Instant) {
        let call_id = format!("{}@load", token());
        let from_tag = token();
        let pskmth = if self.o.crossover.is_some() {
            "xover"
        } else {
            "scram,none"
        };
        let (sdp, pubkey, prefix) = offer(&call_id, self.run, self.report.started, pskmth);
        let auth = match &self.o.crossover {
            Some(_) => Auth::Xover(
                Facts {
                    foreign_domain: target_host(&self.o.target),
                    call_id: call_id.clone(),
                    from_tag: from_tag.clone(),
                    from_aor: self.o.from.clone(),
                    channel_binding: self.channel_binding().unwrap_or_default(),
                    offer_pubkey: pubkey.to_vec(),
                    offer_prefix: prefix,
                },
                None,
            ),
            None => Auth::Scram(ScramClient::new(
                &self.o.username,
                self.o.password.as_bytes(),
                self.channel_binding(),
            )),
        };
        let call = Call {
            offer: sdp,
            call_id,
            from_tag,
            cseq: 1,
            branch: token(),
            auth,
            stage: Stage::Offered,
            started: now,
        };
        let invite = self.invite(&call, None);
        self.send(&invite);
        self.report.started += 1;
        self.calls.insert(call.call_id.clone(), call);
    }

    fn fail(&mut self, call_id: &str, reason: String) {
        if self.calls.remove(call_id).is_some() {
            self.report.failed += 1;
            *self.report.failures.entry(reason).or_default() += 1;
        }
    }

    fn on_response(&mut self, resp: Message, now: Instant) {
        let call_id = resp.call_id().into_owned();
        let status = resp.status().unwrap_or(0);
        if status < 200 {
            return;
        }
        let Some(mut c) = self.calls.remove(&call_id) else {
            return; // a retransmission of something already finished
        };
        let step = self.step(&mut c, &resp, status, now);
        match step {
            Ok(true) => {
                self.calls.insert(call_id, c);
            }
            Ok(false) => {}
            Err(reason) => {
                self.calls.insert(call_id.clone(), c);
                self.fail(&call_id, reason);
            }
        }
    }

    /// Advances one set-up; `Ok(true)` while it goes on.
    fn step(
        &mut self,
        c: &mut Call,
        resp: &Message,
        status: u16,
        now: Instant,
    ) -> Result<bool, String> {
        let stage_name = match c.stage {
            Stage::Offered => "offer",
            Stage::First => "client-first",
            Stage::Final => "client-final",
            Stage::Closing => "bye",
        };
        if resp.cseq().method != "INVITE" {
            // The BYE's 200 ends the call.
            return Ok(false);
        }
        if resp.cseq().seq != c.cseq || matches!(c.stage, Stage::Closing) {
            // A stale retransmission, or a second final for an INVITE already answered 200
            // (a balancer that failed the INVITE over to another gateway): the set-up is
            // counted already.
            return Ok(true);
        }
        match (&c.stage, status) {
            (Stage::Offered | Stage::First, 407) => {
                let ack = self.ack_non_2xx(c, resp);
                self.send(&ack);
                let challenge = header(resp, "Proxy-Authenticate")
                    .and_then(|v| SaslParams::parse(&v).ok())
                    .ok_or_else(|| format!("{stage_name}: 407 without a SASL challenge"))?;
                let params = match (&c.stage, &mut c.auth) {
                    (Stage::Offered, Auth::Scram(scram)) => SaslParams {
                        realm: challenge.realm.clone(),
                        mech: Some(scram.mechanism().into()),
                        c2s: Some(scram.client_first()),
                        ..SaslParams::default()
                    },
                    (Stage::Offered, Auth::Xover(facts, client)) => {
                        let (x, first) = self.xover_start(facts, &challenge)?;
                        *client = Some(Box::new(x));
                        SaslParams {
                            realm: challenge.realm.clone(),
                            mech: Some(xover::MECHANISM.into()),
                            c2s: Some(first),
                            ..SaslParams::default()
                        }
                    }
                    (_, auth) => {
                        let s2c = challenge
                            .s2c
                            .ok_or_else(|| "client-first: 407 without a server token".to_owned())?;
                        let next = match auth {
                            Auth::Scram(scram) => scram
                                .client_final_cached(&s2c, &mut self.salted)
                                .map_err(|e| format!("server-first: {e}"))?,
                            Auth::Xover(_, Some(x)) => x
                                .step(&s2c)
                                .map_err(|e| format!("home-next: {}", e.label()))?,
                            Auth::Xover(_, None) => return Err("client-first: not sent".into()),
                        };
                        SaslParams {
                            realm: challenge.realm.clone(),
                            s2s: challenge.s2s,
                            c2s: Some(next),
                            ..SaslParams::default()
                        }
                    }
                };
                c.stage = match c.stage {
                    Stage::Offered => Stage::First,
                    _ => Stage::Final,
                };
                c.cseq += 1;
                c.branch = token();
                let invite = self.invite(c, Some(&params));
                self.send(&invite);
                Ok(true)
            }
            (Stage::Final, 200..=299) => {
                let ack = self.in_dialog(c, resp, "ACK", c.cseq);
                self.send(&ack);
                let last = header(resp, "Proxy-Authentication-Info")
                    .and_then(|v| SaslParams::parse(&v).ok())
                    .and_then(|p| p.s2c);
                let verified = last.is_some_and(|sf| match &mut c.auth {
                    Auth::Scram(scram) => scram.verify_server_final(&sf).is_ok(),
                    // Mutual with the home: its final opens, SCRAM's server-final verifies,
                    // and the statement names us and the domain we called.
                    Auth::Xover(facts, Some(x)) => x.finish(&sf).is_ok_and(|ok| {
                        self.o
                            .crossover
                            .as_ref()
                            .is_some_and(|o| ok.identity == o.identity)
                            && ok.released_to == facts.foreign_domain
                    }),
                    Auth::Xover(_, None) => false,
                });
                if !self.o.hold {
                    let bye = self.in_dialog(c, resp, "BYE", c.cseq + 1);
                    self.send(&bye);
                }
                if !verified {
                    return Err("200 without a valid server-final".into());
                }
                self.report.succeeded += 1;
                self.report.latencies.push(now - c.started);
                c.stage = Stage::Closing;
                // A held tunnel is done here; otherwise the BYE's 200 ends the call.
                Ok(!self.o.hold)
            }
            (_, code) => {
                if code >= 300 {
                    let ack = self.ack_non_2xx(c, resp);
                    self.send(&ack);
                }
                Err(format!(
                    "{stage_name}: {code} {}",
                    resp.reason().unwrap_or_default()
                ))
            }
        }
    }

    /// The first crossover token, for a gateway that offers SXOVER-PLUS.
    fn xover_start(
        &self,
        facts: &Facts,
        challenge: &SaslParams,
    ) -> Result<(XoverClient, Vec<u8>), String> {
        let offered = challenge
            .mech
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .any(|m| m == xover::MECHANISM);
        if !offered {
            return Err("offer: the gateway does not offer SXOVER-PLUS".into());
        }
        let Some(o) = &self.o.crossover else {
            return Err("offer: no home key".into());
        };
        #[allow(clippy::disallowed_methods)] // the caller's ephemeral key material
        let ikm: [u8; 32] = rand::random();
        XoverClient::start(
            &o.home_key,
            &o.identity,
            self.o.password.as_bytes(),
            facts.clone(),
            ikm,
            None,
        )
        .map_err(|e| format!("offer: {}", e.label()))
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.o.timeout;
        let late: Vec<(String, bool)> = self
            .calls
            .values()
            .filter(|c| now.duration_since(c.started) > timeout)
            .map(|c| (c.call_id.clone(), matches!(c.stage, Stage::Closing)))
            .collect();
        for (id, closing) in late {
            if closing {
                // Set up and counted; only the BYE's answer went missing.
                self.calls.remove(&id);
                self.report.byes_unanswered += 1;
            } else {
                self.fail(&id, "timeout".into());
            }
        }
    }
}

/// Runs the load; returns the report (also printed when `progress` is set).
pub fn run(o: &LoadOptions) -> anyhow::Result<LoadReport> {
    let (wire, local) = match &o.tls {
        Some(t) => {
            let ua = Ua::connect_tls(o.gateway, &t.ca, t.server_name.as_deref())?;
            let local = ua.local;
            (Wire::Tls(Box::new(ua)), local)
        }
        None if o.crossover.is_some() => {
            anyhow::bail!("realm crossover needs TLS (the home checks the caller's channel)")
        }
        None => {
            let sock =
                UdpSocket::bind(o.local).with_context(|| format!("cannot bind {}", o.local))?;
            sock.set_read_timeout(Some(Duration::from_millis(1)))?;
            let local = sock.local_addr()?;
            (Wire::Udp(sock), local)
        }
    };
    let mut r = Runner {
        o,
        wire,
        local,
        calls: HashMap::new(),
        salted: SaltedCache::default(),
        report: LoadReport::default(),
        run: rand::random(),
    };
    let t0 = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(o.rate.max(1)));
    let mut next_start = t0;
    let mut next_progress = t0 + Duration::from_secs(1);
    let mut next_expiry = t0 + Duration::from_millis(100);
    let mut buf = vec![0u8; 65_536];
    let limits = Limits::default();
    loop {
        let now = Instant::now();
        while r.report.started < o.count && now >= next_start && r.calls.len() < o.concurrency {
            r.start(now);
            next_start += interval;
        }
        if r.report.started >= o.count && r.calls.is_empty() {
            break;
        }
        let received = match &r.wire {
            Wire::Udp(sock) => match sock.recv_from(&mut buf) {
                Ok((n, _)) => Message::parse(Bytes::copy_from_slice(&buf[..n]), &limits).ok(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                Err(e) => return Err(e).context("receiving"),
            },
            Wire::Tls(ua) => ua
                .recv(Duration::from_millis(1))
                .context("receiving")?
                .map(|(m, _)| m),
        };
        if let Some(m) = received.filter(|m| !m.is_request()) {
            r.on_response(m, Instant::now());
        }
        let now = Instant::now();
        if now >= next_expiry {
            r.expire(now);
            next_expiry = now + Duration::from_millis(100);
        }
        if o.progress && now >= next_progress {
            next_progress += Duration::from_secs(1);
            println!(
                "{:>5.1} s  started {:>7}  ok {:>7}  failed {:>5}  in flight {:>5}",
                now.duration_since(t0).as_secs_f64(),
                r.report.started,
                r.report.succeeded,
                r.report.failed,
                r.calls.len()
            );
        }
    }
    r.report.elapsed = t0.elapsed();
    r.report.latencies.sort();
    Ok(r.report)
}

/// The host of the target AOR (the foreign domain a crossover caller seals), lower case.
fn target_host(target: &str) -> String {
    let rest = target.split_once(':').map_or(target, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    host.split([':', ';', '>'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}
