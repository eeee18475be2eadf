//! SASL in SIP against a running gateway: the three-round INVITE flow over UDP, TCP and
//! TLS (-PLUS with channel binding), mutual authentication, and the negative cases that
//! need real connections.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::mpsc;

use bytes::Bytes;
use gatehouse::store::Store;
use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use gatehouse_sip::flow::Transport;
use gatehouse_sip::{HeaderName, Limits, Message};

use crate::client::{header, SipClient};
use crate::harness::{Gateway, TempDir, WAIT};

/// A UDP answerer: 200 to INVITE and BYE, records every request it gets.
pub struct Uas {
    pub addr: std::net::SocketAddr,
    pub requests: mpsc::Receiver<String>,
}

impl Uas {
    pub fn start() -> Uas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(WAIT * 3)).unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n]), &Limits::default())
                else {
                    continue;
                };
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
                if !m.is_request() || m.method_text() == "ACK" {
                    continue;
                }
                let mut resp = String::from("SIP/2.0 200 OK\r\n");
                for (i, h) in m.headers() {
                    let v = m.value(i);
                    match h.name {
                        HeaderName::Via
                        | HeaderName::From
                        | HeaderName::CallId
                        | HeaderName::CSeq
                        | HeaderName::RecordRoute => {
                            resp.push_str(&format!("{}: {v}\r\n", h.name.canonical()));
                        }
                        HeaderName::To if v.contains("tag=") => {
                            resp.push_str(&format!("To: {v}\r\n"))
                        }
                        HeaderName::To => resp.push_str(&format!("To: {v};tag=uas\r\n")),
                        _ => {}
                    }
                }
                resp.push_str(&format!(
                    "Contact: <sip:vpn@{addr}>\r\nContent-Length: 0\r\n\r\n"
                ));
                let _ = sock.send_to(resp.as_bytes(), from);
            }
        });
        Uas { addr, requests: rx }
    }
}

pub struct Setup {
    pub dir: TempDir,
    pub gw: Gateway,
    pub uas: Uas,
    pub ca: rustls::pki_types::CertificateDer<'static>,
}

/// A gateway that trusts nobody, with users alice (sip:alice@partner.example) and vpn.
pub fn setup(extra: &str) -> Setup {
    setup_with(extra, |_| {})
}

/// As [`setup`], with `prepare` run on the seeded store before the gateway starts.
pub fn setup_with(extra: &str, prepare: impl FnOnce(&Path)) -> Setup {
    setup_on(None, extra, prepare)
}

/// As [`setup_with`], on the store at `store` (a file or a `postgres://` URL; a new file in
/// the test's folder when `None`). A store already seeded (another gateway of the same test
/// uses it) is used as it is.
pub fn setup_on(store: Option<&Path>, extra: &str, prepare: impl FnOnce(&Path)) -> Setup {
    setup_policy(
        store,
        extra,
        "[[rule]]\nname = \"partners\"\nkind = \"any\"\ncallers = [\"*@partner.example\"]\n",
        prepare,
    )
}

/// As [`setup_on`], with `policy` as the policy file.
pub fn setup_policy(
    store: Option<&Path>,
    extra: &str,
    policy: &str,
    prepare: impl FnOnce(&Path),
) -> Setup {
    let dir = TempDir::new("sasl");
    let store_path = store.map_or_else(|| dir.path().join("store.sqlite"), Path::to_path_buf);
    let seeded = Store::open(&store_path)
        .unwrap()
        .user("alice")
        .unwrap()
        .is_some();
    if !seeded {
        seed(&store_path);
    }
    prepare(&store_path);
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let uas = Uas::start();
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let mut config = String::from("[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 200\n");
    for t in ["udp", "tcp", "tls"] {
        config.push_str(&format!(
            "[[listen]]\ntransport = \"{t}\"\naddress = \"127.0.0.1:0\"\n"
        ));
    }
    config.push_str(&format!(
        "[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[auth]\nstore = \"{}\"\nmechanisms = [\"SCRAM-SHA-256-PLUS\", \"SCRAM-SHA-256\", \"PLAIN\"]\n\
[tunnels]\npolicy = \"{}\"\n{extra}\n\
[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display(),
        store_path.display(),
        dir.path().join("policy.toml").display(),
        uas.addr
    ));
    let gw = Gateway::start(&config);
    Setup {
        dir,
        gw,
        uas,
        ca: key.cert.der().clone(),
    }
}

pub fn seed(path: &Path) {
    let mut s = Store::open(path).unwrap();
    s.add_admin("root", b"root-secret", gatehouse::store::Role::Admin)
        .unwrap();
    s.add_admin("viewer", b"viewer-secret", gatehouse::store::Role::ReadOnly)
        .unwrap();
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
}

pub struct Call {
    pub call_id: String,
    cseq: u32,
    branch: u32,
}

impl Call {
    pub fn new(tag: &str) -> Call {
        Call {
            call_id: format!("{tag}-{}@test", rand_u32()),
            cseq: 0,
            branch: 0,
        }
    }

    /// The next INVITE round (new CSeq, new branch, same Call-ID and From tag).
    pub fn invite(&mut self, c: &SipClient, auth: Option<&SaslParams>) -> String {
        self.cseq += 1;
        self.branch += 1;
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        format!(
            "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/{t} {l};branch=z9hG4bK{cid}-{b};rport\r\nMax-Forwards: 70\r\n\
From: <sip:alice@partner.example>;tag=alice1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: {cid}\r\nCSeq: {s} INVITE\r\n\
Contact: <sip:alice@{l};transport={t}>\r\n{auth}Content-Length: 0\r\n\r\n",
            t = c.transport(),
            l = c.local,
            cid = self.call_id,
            b = self.branch,
            s = self.cseq
        )
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(1);
    h.finish() as u32
}

pub fn challenge(m: &Message) -> SaslParams {
    SaslParams::parse(&header(m, "Proxy-Authenticate").expect("Proxy-Authenticate")).unwrap()
}

/// Runs the INVITE flow; returns the final response of the last round.
pub fn authenticated_invite(
    client: &mut SipClient,
    scram: &mut ScramClient,
    call: &mut Call,
) -> Message {
    client.send(&call.invite(client, None));
    let r1 = client.recv_final_or_challenge();
    assert_eq!(r1.status(), Some(407));
    let offered = challenge(&r1).mech.unwrap();
    assert!(
        offered.split(' ').any(|m| m == scram.mechanism()),
        "{} not offered in {offered}",
        scram.mechanism()
    );
    let p = SaslParams {
        realm: Some("org.example".into()),
        mech: Some(scram.mechanism().into()),
        c2s: Some(scram.client_first()),
        ..SaslParams::default()
    };
    client.send(&call.invite(client, Some(&p)));
    let r2 = client.recv_final_or_challenge();
    assert_eq!(r2.status(), Some(407), "{r2:?}");
    let c = challenge(&r2);
    let cf = scram.client_final(&c.s2c.unwrap()).unwrap();
    let p = SaslParams {
        realm: Some("org.example".into()),
        s2s: c.s2s,
        c2s: Some(cf),
        ..SaslParams::default()
    };
    client.send(&call.invite(client, Some(&p)));
    client.recv_final_or_challenge()
}

fn full_flow(mut client: SipClient, plus: bool, uas: &Uas) {
    let cb = if plus { client.exporter() } else { None };
    let mut scram = ScramClient::new("alice", b"alice-secret", cb);
    let mut call = Call::new("flow");
    let ok = authenticated_invite(&mut client, &mut scram, &mut call);
    assert_eq!(ok.status(), Some(200), "{ok:?}");
    let info = SaslParams::parse(&header(&ok, "Proxy-Authentication-Info").expect("server-final"))
        .unwrap();
    scram
        .verify_server_final(&info.s2c.unwrap())
        .expect("the gateway proves itself");
    // What reached the inside carries no credentials of our realm.
    let inside = uas.requests.recv_timeout(WAIT).unwrap();
    assert!(inside.starts_with("INVITE "), "{inside}");
    assert!(!inside.contains("Proxy-Authorization"), "{inside}");
    // BYE through the route set reaches the UAS and is answered.
    let rr = ok.list_values(HeaderName::RecordRoute);
    let route: Vec<String> = rr.iter().rev().cloned().collect();
    let bye = format!(
        "BYE sip:vpn@{} SIP/2.0\r\nVia: SIP/2.0/{} {};branch=z9hG4bKbye{};rport\r\nMax-Forwards: 70\r\nRoute: {}\r\n\
From: <sip:alice@partner.example>;tag=alice1\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 99 BYE\r\nContent-Length: 0\r\n\r\n",
        uas.addr,
        client.transport(),
        client.local,
        call.call_id,
        route.join(", "),
        ok.value_of(HeaderName::To).unwrap(),
        call.call_id
    );
    client.send(&bye);
    let r = client.recv_final_or_challenge();
    assert_eq!(
        r.status(),
        Some(200),
        "BYE answered through the gateway: {r:?}"
    );
}

#[test]
fn invite_flow_over_udp() {
    let s = setup("");
    full_flow(SipClient::udp(s.gw.addr(Transport::Udp)), false, &s.uas);
}

#[test]
fn invite_flow_over_tcp() {
    let s = setup("");
    full_flow(SipClient::tcp(s.gw.addr(Transport::Tcp)), false, &s.uas);
}

#[test]
fn invite_flow_over_tls_with_scram_plus() {
    let s = setup("");
    let client = SipClient::tls(s.gw.addr(Transport::Tls), s.ca.clone());
    full_flow(client, true, &s.uas);
}

#[test]
fn tls_offers_plus_and_refuses_a_foreign_channel_binding() {
    let s = setup("");
    let mut client = SipClient::tls(s.gw.addr(Transport::Tls), s.ca.clone());
    // Binding data of another TLS connection (what a man in the middle would forward).
    let mut scram = ScramClient::new("alice", b"alice-secret", Some(vec![7u8; 32]));
    let mut call = Call::new("mitm");
    let r = authenticated_invite(&mut client, &mut scram, &mut call);
    assert_eq!(r.status(), Some(403), "{r:?}");
    assert!(header(&r, "Proxy-Authentication-Info").is_none());
}

#[test]
fn plus_is_not_offered_over_udp() {
    let s = setup("");
    let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
    let mut call = Call::new("udp");
    client.send(&call.invite(&client, None));
    let r = client.recv_final_or_challenge();
    assert_eq!(challenge(&r).mech.as_deref(), Some("SCRAM-SHA-256"));
}

#[test]
fn unknown_user_gets_the_same_challenge_shape_as_a_known_user() {
    let s = setup("");
    let shape = |user: &str| {
        let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
        let scram = ScramClient::new(user, b"whatever", None);
        let mut call = Call::new(user);
        client.send(&call.invite(&client, None));
        client.recv_final_or_challenge();
        let p = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(scram.client_first()),
            ..SaslParams::default()
        };
        client.send(&call.invite(&client, Some(&p)));
        let r = client.recv_final_or_challenge();
        let c = challenge(&r);
        let sf = String::from_utf8(c.s2c.unwrap()).unwrap();
        // Byte shape: status, header names, parameter names and lengths.
        let names: Vec<String> = r
            .headers()
            .map(|(i, _)| r.name_text(i).into_owned())
            .collect();
        let fields: Vec<String> = sf
            .split(',')
            .map(|f| format!("{}{}", &f[..2], f.len()))
            .collect();
        (
            r.status(),
            r.reason().unwrap().into_owned(),
            names,
            fields,
            c.s2s.unwrap().len(),
        )
    };
    assert_eq!(shape("alice"), shape("mallory"));
}

#[test]
fn svcrack_finds_no_password() {
    if !crate::harness::tool("svcrack") {
        return;
    }
    let s = setup("");
    let dir = TempDir::new("svcrack");
    // The real password is in the word list.
    std::fs::write(
        dir.path().join("words.txt"),
        "123456\npassword\nalice-secret\nletmein\n",
    )
    .unwrap();
    let gw = s.gw.addr(Transport::Udp);
    let local = crate::harness::free_port().to_string();
    let mut crack = crate::harness::Proc::spawn(
        "svcrack",
        std::process::Command::new("svcrack").args([
            "-u",
            "alice",
            "-d",
            "words.txt",
            "-P",
            &local,
            "-x",
            "127.0.0.1",
            "-p",
            &gw.port().to_string(),
            "127.0.0.1",
        ]),
        dir.path(),
    );
    // svcrack cannot answer a SASL challenge; give it a bounded time, then end it.
    let _ = crack.wait_or_end(std::time::Duration::from_secs(8));
    let log = crack.log_text();
    assert!(
        !log.contains("alice-secret"),
        "svcrack found the password:\n{log}"
    );
}

#[test]
fn external_with_a_verified_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::io::{Read, Write};
    use std::sync::Arc;
    // A client CA and a certificate for the partner's gateway (CN = the store username).
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Partner CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut client_params = CertificateParams::new(vec!["partner-gw.example".to_owned()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "partner-gw");
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let dir = TempDir::new("external");
    let d = dir.path();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(d.join("cert.pem"), server.cert.pem()).unwrap();
    std::fs::write(d.join("key.pem"), server.signing_key.serialize_pem()).unwrap();
    std::fs::write(d.join("client-ca.pem"), ca_cert.pem()).unwrap();
    let store = d.join("store.sqlite");
    {
        let mut st = Store::open(&store).unwrap();
        st.add_user(
            "partner-gw",
            b"unused-for-external",
            &["sip:gw@partner.example".into()],
            None,
            4096,
        )
        .unwrap();
    }
    std::fs::write(
        d.join("policy.toml"),
        "[[rule]]\nname = \"p\"\nkind = \"any\"\ncallers = [\"*@partner.example\"]\n",
    )
    .unwrap();
    let uas = Uas::start();
    let gw = Gateway::start(&format!(
        "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 200\n[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:0\"\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{c}\"\nprivate_key = \"{k}\"\nclient_ca = \"{ca}\"\n\
[auth]\nstore = \"{st}\"\nmechanisms = [\"SCRAM-SHA-256-PLUS\", \"EXTERNAL\"]\n[tunnels]\npolicy = \"{p}\"\n\
[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@{uas}\"\n",
        c = d.join("cert.pem").display(),
        k = d.join("key.pem").display(),
        ca = d.join("client-ca.pem").display(),
        st = store.display(),
        p = d.join("policy.toml").display(),
        uas = uas.addr
    ));
    // A TLS client presenting the certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.cert.der().clone()).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(client_key.serialize_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![client_cert.der().clone()], key_der)
    .unwrap();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let tcp = std::net::TcpStream::connect(gw.addr(Transport::Tls)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let local = tcp.local_addr().unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let invite = |cseq: u32, auth: &str| {
        format!(
            "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch=z9hG4bKext{cseq}\r\nMax-Forwards: 70\r\n\
From: <sip:gw@partner.example>;tag=e1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: external@test\r\nCSeq: {cseq} INVITE\r\n\
Contact: <sip:gw@{local};transport=tls>\r\n{auth}Content-Length: 0\r\n\r\n"
        )
    };
    let mut framer = gatehouse_sip::framer::StreamFramer::new(65535);
    let mut next_final =
        |tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| loop {
            if let Some(gatehouse_sip::framer::Frame::Message(b)) = framer.next_frame().unwrap() {
                let m = Message::parse(b, &Limits::default()).unwrap();
                if m.status() != Some(100) {
                    return m;
                }
                continue;
            }
            let mut buf = [0u8; 8192];
            let n = tls.read(&mut buf).unwrap();
            assert!(n > 0);
            framer.buffer().extend_from_slice(&buf[..n]);
        };
    tls.write_all(invite(1, "").as_bytes()).unwrap();
    let r = next_final(&mut tls);
    assert_eq!(r.status(), Some(407));
    let offered = challenge(&r).mech.unwrap();
    assert!(
        offered.split(' ').any(|m| m == "EXTERNAL"),
        "EXTERNAL offered to a certificate holder: {offered}"
    );
    let p = SaslParams {
        mech: Some("EXTERNAL".into()),
        c2s: Some(Vec::new()),
        ..SaslParams::default()
    };
    tls.write_all(invite(2, &format!("Proxy-Authorization: {}\r\n", p.emit())).as_bytes())
        .unwrap();
    let r = next_final(&mut tls);
    assert_eq!(r.status(), Some(200), "{r:?}");
    let inside = uas.requests.recv_timeout(WAIT).unwrap();
    assert!(inside.starts_with("INVITE ") && !inside.contains("Proxy-Authorization"));
}
