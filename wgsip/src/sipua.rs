//! A small SIP user agent over UDP: requests, responses, and the SIP-SASL rounds with the
//! gateway (the caller's 407 flow, the endpoint's 401 flow), verifying the server-final.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use gatehouse_auth::scram::{ScramClient, Transcript};
use gatehouse_auth::xover::{self, XoverClient, XoverSuccess};
use gatehouse_auth::SaslParams;
use gatehouse_sip::{HeaderName, Limits, Message};

enum Conn {
    Udp(UdpSocket),
    Tls(
        Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
        gatehouse_sip::framer::StreamFramer,
    ),
}

/// The UA's connection to the gateway (UDP, or one TLS connection that also carries the
/// requests the gateway sends back) and its addresses.
pub struct Ua {
    conn: std::sync::Mutex<Conn>,
    pub gateway: SocketAddr,
    pub local: SocketAddr,
    exporter: Option<Vec<u8>>,
}

impl std::fmt::Debug for Ua {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ua")
            .field("gateway", &self.gateway)
            .field("local", &self.local)
            .finish()
    }
}

/// Random token for tags, branches and Call-IDs.
pub fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Value of the first header with this (case-insensitive) name.
pub fn header(m: &Message, name: &str) -> Option<String> {
    m.headers()
        .find(|(i, _)| m.name_text(*i).eq_ignore_ascii_case(name))
        .map(|(i, _)| m.value(i).into_owned())
}

/// Host:port text of a socket address for SIP (IPv6 bracketed).
pub fn hostport(a: SocketAddr) -> String {
    a.to_string()
}

impl Ua {
    pub fn bind(local: SocketAddr, gateway: SocketAddr) -> anyhow::Result<Ua> {
        let sock = UdpSocket::bind(local).with_context(|| format!("cannot bind {local}"))?;
        let local = sock.local_addr()?;
        Ok(Ua {
            conn: std::sync::Mutex::new(Conn::Udp(sock)),
            gateway,
            local,
            exporter: None,
        })
    }

    /// A TLS connection to the gateway, verified against `ca` (PEM) for `server_name`.
    pub fn connect_tls(
        gateway: SocketAddr,
        ca: &std::path::Path,
        server_name: Option<&str>,
    ) -> anyhow::Result<Ua> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read {}", ca.display()))?
        {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = match server_name {
            Some(n) => ServerName::try_from(n.to_owned())?,
            None => ServerName::IpAddress(gateway.ip().into()),
        };
        let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let tcp = TcpStream::connect_timeout(&gateway, Duration::from_secs(10))
            .with_context(|| format!("cannot reach {gateway}"))?;
        // SIP messages are small and each waits for an answer: no Nagle delay.
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr()?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        let mut exporter = vec![0u8; 32];
        stream
            .conn
            .export_keying_material(&mut exporter[..], b"EXPORTER-Channel-Binding", None)?;
        Ok(Ua {
            conn: std::sync::Mutex::new(Conn::Tls(
                Box::new(stream),
                gatehouse_sip::framer::StreamFramer::new(65535),
            )),
            gateway,
            local,
            exporter: Some(exporter),
        })
    }

    /// Connects to the first gateway of the configuration (see `Sip::for_gateway`).
    pub fn open(cfg: &crate::config::Sip) -> anyhow::Result<Ua> {
        let gateway = *cfg
            .gateway_list()
            .first()
            .context("no gateway configured")?;
        match (cfg.transport.as_str(), &cfg.tls_ca) {
            ("tls", Some(ca)) => Ua::connect_tls(gateway, ca, cfg.tls_server_name.as_deref()),
            _ => Ua::bind(cfg.bind, gateway),
        }
    }

    /// The connection (one user at a time: each flow is served by one thread).
    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Via transport token.
    pub fn transport(&self) -> &'static str {
        match &*self.conn() {
            Conn::Udp(_) => "UDP",
            Conn::Tls(..) => "TLS",
        }
    }

    /// tls-exporter channel binding (TLS only): the UA then runs SCRAM-SHA-256-PLUS.
    pub fn channel_binding(&self) -> Option<Vec<u8>> {
        self.exporter.clone()
    }

    /// `;transport=tls` for Contact URIs over TLS.
    pub fn contact_params(&self) -> &'static str {
        match &*self.conn() {
            Conn::Udp(_) => "",
            Conn::Tls(..) => ";transport=tls",
        }
    }

    pub fn send(&self, msg: &str, to: SocketAddr) -> anyhow::Result<()> {
        match &mut *self.conn() {
            Conn::Udp(sock) => {
                sock.send_to(msg.as_bytes(), to)?;
            }
            // Everything goes over the one connection (the gateway sends requests back on it).
            Conn::Tls(stream, _) => {
                stream.write_all(msg.as_bytes())?;
                stream.flush()?;
            }
        }
        Ok(())
    }

    /// The next parsable message within `limit`.
    pub fn recv(&self, limit: Duration) -> anyhow::Result<Option<(Message, SocketAddr)>> {
        let deadline = Instant::now() + limit;
        // On the stack: a load generator calls this thousands of times a second.
        let mut buf = [0u8; 65535];
        if let Conn::Tls(stream, framer) = &mut *self.conn() {
            loop {
                if let Some(gatehouse_sip::framer::Frame::Message(b)) = framer.next_frame()? {
                    if let Ok(m) = Message::parse(b, &Limits::default()) {
                        return Ok(Some((m, self.gateway)));
                    }
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                stream.sock.set_read_timeout(Some(left))?;
                match stream.read(&mut buf) {
                    Ok(0) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the gateway closed the TLS connection",
                        )
                        .into())
                    }
                    Ok(n) => framer.buffer().extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let conn = self.conn();
        let Conn::Udp(sock) = &*conn else {
            return Ok(None);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Ok(m) =
                        Message::parse(Bytes::copy_from_slice(&buf[..n]), &Limits::default())
                    {
                        return Ok(Some((m, from)));
                    }
                }
                // A signal (SIGTERM to hang up) interrupts the wait: the caller checks its flag.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a request and waits for its final response (matching CSeq), retransmitting on
    /// silence like Timer A/E (UDP).
    pub fn transact(
        &self,
        request: &str,
        cseq: u32,
        on_other: &mut dyn FnMut(&Message, SocketAddr),
    ) -> anyhow::Result<Message> {
        let deadline = Instant::now() + Duration::from_secs(32);
        let mut interval = Duration::from_millis(500);
        self.send(request, self.gateway)?;
        let mut next = Instant::now() + interval;
        loop {
            let now = Instant::now();
            if now >= deadline {
                // An I/O error: the gateway is gone, and connecting again is the cure.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no final response from the gateway",
                )
                .into());
            }
            if now >= next {
                if self.transport() == "UDP" {
                    self.send(request, self.gateway)?;
                    interval = (interval * 2).min(Duration::from_secs(4));
                    next = now + interval;
                } else {
                    // A reliable transport retransmits for us: just wait (Timer B/F).
                    next = deadline;
                }
            }
            let Some((m, from)) = self.recv(next.saturating_duration_since(now))? else {
                continue;
            };

            match m.status() {
                Some(s) if m.cseq().seq == cseq && s >= 200 => return Ok(m),
                Some(_) if m.cseq().seq == cseq => next = deadline, // provisional: stop retransmitting
                _ => on_other(&m, from),
            }
        }
    }

    /// Runs the SASL rounds: `build(cseq, credentials)` makes each request, numbered from
    /// `first_cseq` (each round is a new request of the same dialog or registration, so the
    /// CSeq grows by one per round). Returns the final response and, after a success, the
    /// transcript of the verified exchange.
    pub fn authenticate(
        &self,
        build: &dyn Fn(u32, Option<&SaslParams>) -> String,
        first_cseq: u32,
        client: ScramClient,
        proxy: bool,
        on_other: &mut dyn FnMut(&Message, SocketAddr),
    ) -> anyhow::Result<(Message, Option<Transcript>)> {
        let challenge_status = if proxy { 407 } else { 401 };
        let r = self.transact(&build(first_cseq, None), first_cseq, on_other)?;
        if r.status() != Some(challenge_status) {
            return Ok((r, None));
        }
        self.authenticate_from(r, build, first_cseq + 1, client, proxy, on_other)
    }

    /// [`Ua::authenticate`] from a challenge already received (`challenge`, 401 or 407): its
    /// rounds are numbered from `cseq`, two of them.
    pub fn authenticate_from(
        &self,
        challenge: Message,
        build: &dyn Fn(u32, Option<&SaslParams>) -> String,
        mut cseq: u32,
        mut client: ScramClient,
        proxy: bool,
        on_other: &mut dyn FnMut(&Message, SocketAddr),
    ) -> anyhow::Result<(Message, Option<Transcript>)> {
        let (challenge_hdr, info_hdr) = if proxy {
            ("Proxy-Authenticate", "Proxy-Authentication-Info")
        } else {
            ("WWW-Authenticate", "Authentication-Info")
        };
        let challenge_status = if proxy { 407 } else { 401 };
        let mut r = challenge;
        let mech = client.mechanism().to_owned();
        let offered =
            SaslParams::parse(&header(&r, challenge_hdr).context("challenge without SASL")?)?;
        if !offered
            .mech
            .unwrap_or_default()
            .split(' ')
            .any(|m| m == mech)
        {
            bail!("the gateway does not offer {mech}");
        }
        let realm = offered.realm;
        let p = SaslParams {
            realm: realm.clone(),
            mech: Some(mech),
            c2s: Some(client.client_first()),
            ..SaslParams::default()
        };
        r = self.transact(&build(cseq, Some(&p)), cseq, on_other)?;
        if r.status() != Some(challenge_status) {
            bail!(
                "authentication refused: {} {}",
                r.status().unwrap_or(0),
                r.reason().unwrap_or_default()
            );
        }
        let c = SaslParams::parse(&header(&r, challenge_hdr).context("no SASL challenge")?)?;
        let server_first = c.s2c.context("no server-first")?;
        let client_final = client.client_final(&server_first)?;
        cseq += 1;
        let p = SaslParams {
            realm,
            s2s: c.s2s,
            c2s: Some(client_final),
            ..SaslParams::default()
        };
        r = self.transact(&build(cseq, Some(&p)), cseq, on_other)?;
        let Some(info) = header(&r, info_hdr) else {
            bail!(
                "authentication failed: {} {}",
                r.status().unwrap_or(0),
                r.reason().unwrap_or_default()
            );
        };
        let info = SaslParams::parse(&info)?;
        // Mutual authentication: only a gateway that knows our verifier can produce this.
        let transcript = client
            .verify_server_final(&info.s2c.context("no server-final")?)
            .context("the gateway failed to prove itself (server-final does not verify)")?;
        Ok((r, Some(transcript)))
    }
}

impl Ua {
    /// Runs a realm crossover (SXOVER-PLUS) through the gateway: the sealed rounds with the
    /// caller's home, relayed; returns the final response and, after a success whose home
    /// statement verified (server-final, identity, the domain the key went to), what the
    /// home vouched.
    pub fn authenticate_xover(
        &self,
        build: &dyn Fn(u32, Option<&SaslParams>) -> String,
        first_cseq: u32,
        start: &dyn Fn() -> anyhow::Result<(XoverClient, Vec<u8>)>,
        on_other: &mut dyn FnMut(&Message, SocketAddr),
    ) -> anyhow::Result<(Message, Option<XoverSuccess>)> {
        let r = self.transact(&build(first_cseq, None), first_cseq, on_other)?;
        if r.status() != Some(407) {
            return Ok((r, None));
        }
        self.authenticate_xover_from(r, build, first_cseq + 1, start, on_other)
    }

    /// [`Ua::authenticate_xover`] from a 407 already received (`challenge`: the foreign
    /// gateway's, relayed by our own gateway in a federation): two rounds numbered from `cseq`.
    pub fn authenticate_xover_from(
        &self,
        challenge: Message,
        build: &dyn Fn(u32, Option<&SaslParams>) -> String,
        mut cseq: u32,
        start: &dyn Fn() -> anyhow::Result<(XoverClient, Vec<u8>)>,
        on_other: &mut dyn FnMut(&Message, SocketAddr),
    ) -> anyhow::Result<(Message, Option<XoverSuccess>)> {
        let mut r = challenge;
        let offered = SaslParams::parse(
            &header(&r, "Proxy-Authenticate").context("challenge without SASL")?,
        )?;
        if !offered
            .mech
            .unwrap_or_default()
            .split(' ')
            .any(|m| m == xover::MECHANISM)
        {
            bail!(
                "the gateway does not offer {} (it needs TLS and [crossover] enabled)",
                xover::MECHANISM
            );
        }
        let realm = offered.realm;
        let (mut client, first) = start()?;
        let p = SaslParams {
            realm: realm.clone(),
            mech: Some(xover::MECHANISM.into()),
            c2s: Some(first),
            ..SaslParams::default()
        };
        r = self.transact(&build(cseq, Some(&p)), cseq, on_other)?;
        if r.status() != Some(407) {
            bail!(
                "crossover refused: {} {}",
                r.status().unwrap_or(0),
                r.reason().unwrap_or_default()
            );
        }
        let c = SaslParams::parse(&header(&r, "Proxy-Authenticate").context("no SASL challenge")?)?;
        let next = client
            .step(&c.s2c.context("no home-next token")?)
            .context("the home's answer does not open (not our home?)")?;
        cseq += 1;
        let p = SaslParams {
            realm,
            s2s: c.s2s,
            c2s: Some(next),
            ..SaslParams::default()
        };
        r = self.transact(&build(cseq, Some(&p)), cseq, on_other)?;
        let Some(info) = header(&r, "Proxy-Authentication-Info") else {
            bail!(
                "authentication failed: {} {}",
                r.status().unwrap_or(0),
                r.reason().unwrap_or_default()
            );
        };
        let info = SaslParams::parse(&info)?;
        // Mutual: only our home can seal this; it names us and the domain it released to.
        let ok = client
            .finish(&info.s2c.context("no home-final")?)
            .context("the home's final statement does not verify")?;
        Ok((r, Some(ok)))
    }
}

/// Builds a response to `req` with the given status, To tag and extra lines (already CRLF-ended).
pub fn respond(
    req: &Message,
    status: u16,
    reason: &str,
    to_tag: &str,
    extra: &str,
    body: &str,
) -> String {
    let mut s = format!("SIP/2.0 {status} {reason}\r\n");
    for (i, h) in req.headers() {
        let v = req.value(i);
        match h.name {
            HeaderName::Via
            | HeaderName::From
            | HeaderName::CallId
            | HeaderName::CSeq
            | HeaderName::RecordRoute => {
                s.push_str(&format!("{}: {v}\r\n", h.name.canonical()));
            }
            HeaderName::To if v.contains("tag=") => s.push_str(&format!("To: {v}\r\n")),
            HeaderName::To => s.push_str(&format!("To: {v};tag={to_tag}\r\n")),
            _ => {}
        }
    }
    s.push_str(extra);
    if body.is_empty() {
        s.push_str("Content-Length: 0\r\n\r\n");
    } else {
        s.push_str(&format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    s
}
