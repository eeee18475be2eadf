//! Realm crossover between two organisations on one machine (docs/realm-crossover.md): the
//! gateway of org.example relays bob's SXOVER-PLUS rounds to the crossover service of his home,
//! partner.example's gateway, over mutual TLS with certificates from a test CA. bob has no
//! account at org.example. The caller here is the test itself (a TLS SIP client running
//! `XoverClient`), so that every refusal can be provoked byte by byte; the WireGuard test in
//! the namespaces (`wireguard::tunnel_by_realm_crossover`) runs the real `wgsip`.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use gatehouse::store::Store;
use gatehouse_auth::xover::{derive_key, Facts, HomeKey, XoverClient, MECHANISM};
use gatehouse_auth::SaslParams;
use gatehouse_sip::flow::Transport;
use gatehouse_sip::{HeaderName, Limits, Message};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::CertificateDer;

use crate::client::{header, SipClient};
use crate::harness::{free_port, Gateway, TempDir, WAIT};

const OFFER_KEY: &str = "YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=";
const OFFER_PREFIX: &str = "2001:db8:b0b::/64";
const HOME_SK: [u8; 32] = [0x42; 32];

pub fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// A test CA and the certificates of the parties.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Federation test CA");
        let key = KeyPair::generate().unwrap();
        let cert = ca.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(ca, key),
        }
    }

    /// Writes `NAME.pem` and `NAME.key` for a certificate naming `names` (server and client use).
    pub fn issue(&self, dir: &Path, name: &str, names: &[&str]) {
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A UDP answerer for tunnel INVITEs: answers with a WireGuard SDP (`pskmth=gateway`), and
/// hands the test every request it got.
pub struct WgUas {
    pub addr: SocketAddr,
    pub requests: mpsc::Receiver<String>,
}

impl WgUas {
    pub fn start() -> WgUas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(WAIT * 6)).unwrap();
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
                            resp.push_str(&format!("{}: {v}\r\n", h.name.canonical()))
                        }
                        HeaderName::To => resp.push_str(&format!("To: {v};tag=uas\r\n")),
                        _ => {}
                    }
                }
                let body = if m.method_text() == "INVITE" {
                    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 51821 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=;prefix=2001:db8:789:1::/64;pskmth=gateway\r\n"
                } else {
                    ""
                };
                let ctype = if body.is_empty() {
                    ""
                } else {
                    "Content-Type: application/sdp\r\n"
                };
                resp.push_str(&format!(
                    "Contact: <sip:vpn@{addr}>\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
                let _ = sock.send_to(resp.as_bytes(), from);
            }
        });
        WgUas { addr, requests: rx }
    }

    /// The inward INVITE's `psk` (what the internal endpoint was handed).
    pub fn inward_psk(&self) -> Option<String> {
        let deadline = Instant::now() + WAIT * 2;
        while Instant::now() < deadline {
            let Ok(r) = self.requests.recv_timeout(WAIT) else {
                break;
            };
            if r.starts_with("INVITE ") {
                return r.split(";psk=").nth(1).map(|rest| {
                    rest.split(['\r', ';', '\n'])
                        .next()
                        .unwrap_or("")
                        .to_owned()
                });
            }
        }
        None
    }
}

/// How to vary the two organisations for one test.
pub struct Variant {
    /// Domains the home lets ask.
    pub foreign_domains: &'static str,
    /// The names in the foreign gateway's client certificate.
    pub foreign_cert: &'static [&'static str],
    /// Where the foreign gateway finds partner.example's home: the home itself (`None`), or
    /// another address (an impostor, a silent listener).
    pub home_at: Option<SocketAddr>,
    pub deadline_ms: u64,
    /// Find homes through this DNS server (SRV `_sxover._tcp.REALM`) instead of pinning.
    pub dns: Option<SocketAddr>,
    /// The home's crossover port (chosen in advance when DNS must name it).
    pub home_port: Option<u16>,
    /// `[crossover.home] rate_per_domain` (rounds per second; each set-up is two).
    pub home_rate: u32,
    /// More of org.example's configuration (a table at the end).
    pub org_extra: &'static str,
    /// The prefixes org.example's crossover rule lets partner.example's callers offer.
    pub partner_prefixes: &'static str,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            foreign_domains: "[\"org.example\"]",
            foreign_cert: &["org.example"],
            home_at: None,
            deadline_ms: 3000,
            dns: None,
            home_port: None,
            home_rate: 20,
            org_extra: "",
            partner_prefixes: "2001:db8:b0b::/48",
        }
    }
}

/// Two organisations: partner.example's gateway (bob's home, crossover service on
/// `home_port`) and org.example's (crossover on, bob unknown there), and the org's tunnel UAS.
pub struct Federation {
    /// Kept for the gateways' files; removed at the end.
    _dir: TempDir,
    pub pki: Pki,
    /// partner.example's gateway (kept running for the test).
    _home: Gateway,
    pub org: Gateway,
    pub uas: WgUas,
    pub home_public: [u8; 32],
}

pub fn federation(v: Variant) -> Federation {
    let dir = TempDir::new("xover");
    let d = dir.path();
    let pki = Pki::new();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    pki.issue(d, "partner", &["partner.example"]);
    pki.issue(d, "org", &["org.example", "localhost"]);
    pki.issue(d, "org-client", v.foreign_cert);
    std::fs::write(d.join("home.key"), format!("{}\n", b64().encode(HOME_SK))).unwrap();
    let home_public = *HomeKey::from_private(&HOME_SK).unwrap().public();

    // partner.example: bob's home.
    let home_store = d.join("home.sqlite");
    Store::open(&home_store)
        .unwrap()
        .add_user(
            "bob",
            b"bob-secret",
            &["sip:bob@partner.example".into()],
            None,
            4096,
        )
        .unwrap();
    let home_port = v.home_port.unwrap_or_else(free_port);
    let home = Gateway::start(&format!(
        "[sip]\ndomains = [\"partner.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{d}/partner.pem\"\nprivate_key = \"{d}/partner.key\"\n\
[auth]\nstore = \"{s}\"\nfailures_before_lockout = 3\n\
[crossover]\ntrusted_cas = \"{d}/ca.pem\"\n\
[crossover.home]\nlisten = \"127.0.0.1:{home_port}\"\nkey_file = \"{d}/home.key\"\nforeign_domains = {fd}\nrate_per_domain = {rate}\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n",
        d = d.display(),
        s = home_store.display(),
        fd = v.foreign_domains,
        rate = v.home_rate,
    ));
    crate::harness::wait_tcp_listening(home_port);

    // org.example: crossover on; bob has no account here.
    let org_store = d.join("org.sqlite");
    crate::sasl::seed(&org_store);
    std::fs::write(
        d.join("policy.toml"),
        format!(
            "org_prefixes = [\"2001:db8:789::/48\"]\n\
[[rule]]\nname = \"partners-by-crossover\"\nkind = \"tunnel\"\ncallers = [\"*@partner.example\"]\n\
crossover = [\"partner.example\"]\ntargets = [\"sip:vpn@org.example\"]\npskmth = [\"xover\"]\nrequire_psk = true\n\
prefixes = [\"{}\"]\n\
[[rule]]\nname = \"local-calls\"\nkind = \"call\"\ncallers = [\"*@partner.example\"]\n",
            v.partner_prefixes
        ),
    )
    .unwrap();
    let uas = WgUas::start();
    let home_at = v
        .home_at
        .unwrap_or_else(|| format!("127.0.0.1:{home_port}").parse().unwrap());
    let discovery = match v.dns {
        Some(dns) => format!("[dns]\nservers = [\"{dns}\"]\ntimeout_ms = 1000\n"),
        None => format!("[crossover.homes]\n\"partner.example\" = \"{home_at}\"\n"),
    };
    let org = Gateway::start(&format!(
        "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:0\"\n[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{d}/org.pem\"\nprivate_key = \"{d}/org.key\"\n\
[auth]\nstore = \"{s}\"\n\
[tunnels]\npolicy = \"{d}/policy.toml\"\ninternal_networks = [\"127.0.0.0/8\"]\n\
[crossover]\nenabled = true\ncertificate = \"{d}/org-client.pem\"\nprivate_key = \"{d}/org-client.key\"\n\
trusted_cas = \"{d}/ca.pem\"\nallow_private = true\ndeadline_ms = {dl}\n\
{discovery}\
[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@{uas}\"\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n{extra}",
        extra = v.org_extra,
        d = d.display(),
        s = org_store.display(),
        dl = v.deadline_ms,
        uas = uas.addr,
    ));
    Federation {
        _dir: dir,
        pki,
        _home: home,
        org,
        uas,
        home_public,
    }
}

/// One caller: a TLS connection to org.example and one call's identifiers.
pub struct Caller {
    pub client: SipClient,
    pub call_id: String,
    pub from_tag: String,
    cseq: u32,
}

impl Caller {
    pub fn connect(f: &Federation, call_id: &str) -> Caller {
        Caller {
            client: SipClient::tls(f.org.addr(Transport::Tls), f.pki.ca_der.clone()),
            call_id: call_id.to_owned(),
            from_tag: "bob1".into(),
            cseq: 0,
        }
    }

    pub fn facts(&self) -> Facts {
        Facts {
            foreign_domain: "org.example".into(),
            call_id: self.call_id.clone(),
            from_tag: self.from_tag.clone(),
            from_aor: "sip:bob@partner.example".into(),
            channel_binding: self.client.exporter().unwrap(),
            offer_pubkey: b64().decode(OFFER_KEY).unwrap(),
            offer_prefix: OFFER_PREFIX.into(),
        }
    }

    /// Sends the next INVITE round and returns its final response (or challenge).
    pub fn invite(&mut self, auth: Option<&SaslParams>) -> Message {
        let msg = self.invite_text(auth);
        self.client.send(&msg);
        self.client.recv_final_or_challenge()
    }
}

fn challenge(m: &Message) -> SaslParams {
    SaslParams::parse(&header(m, "Proxy-Authenticate").expect("Proxy-Authenticate")).unwrap()
}

fn first_round(c: &mut Caller, token: Vec<u8>) -> Message {
    let r = c.invite(None);
    assert_eq!(r.status(), Some(407));
    let offered = challenge(&r).mech.unwrap();
    assert!(offered.split(' ').any(|m| m == MECHANISM), "{offered}");
    c.invite(Some(&SaslParams {
        realm: Some("org.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(token),
        ..SaslParams::default()
    }))
}

/// bob's whole exchange with `password`; the last response and the client.
fn call(f: &Federation, c: &mut Caller, password: &[u8]) -> (Message, XoverClient) {
    let (mut x, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        password,
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    let r = first_round(c, token);
    assert_eq!(r.status(), Some(407), "{r:?}");
    let ch = challenge(&r);
    assert_eq!(ch.mech.as_deref(), Some(MECHANISM));
    let next = x.step(&ch.s2c.unwrap()).expect("the home's token opens");
    let r = c.invite(Some(&SaslParams {
        realm: Some("org.example".into()),
        s2s: ch.s2s,
        c2s: Some(next),
        ..SaslParams::default()
    }));
    (r, x)
}

/// 32 unpredictable bytes (from the standard library's randomly keyed hasher).
pub fn rand_ikm() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(7);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[test]
fn a_caller_with_no_account_here_is_authenticated_by_its_home_and_gets_the_same_key() {
    let f = federation(Variant::default());
    let mut c = Caller::connect(&f, "xover-ok@test");
    let (r, mut x) = call(&f, &mut c, b"bob-secret");
    assert_eq!(r.status(), Some(200), "{r:?}");
    // Mutual: the home's final statement verifies at the caller, names bob and org.example.
    let info = SaslParams::parse(&header(&r, "Proxy-Authentication-Info").unwrap()).unwrap();
    let ok = x.finish(&info.s2c.unwrap()).expect("home-final verifies");
    assert_eq!(ok.identity, "bob@partner.example");
    assert_eq!(ok.released_to, "org.example");
    // The internal endpoint was handed exactly the key the caller derives; the answer that
    // reached the caller carries none.
    let key = derive_key(&ok.transcript, &c.facts());
    assert_eq!(f.uas.inward_psk(), Some(b64().encode(key.expose())));
    let body = String::from_utf8_lossy(r.body()).into_owned();
    assert!(
        body.contains("pskmth=xover") && !body.contains("psk="),
        "{body}"
    );
    // What the foreign gateway relayed to the caller and inward carries no SCRAM message in
    // clear (its log is checked in the namespaces test, where it runs as a process).
    let relayed = [
        challenge_text(&r),
        String::from_utf8_lossy(r.body()).into_owned(),
    ];
    for text in relayed {
        for clear in ["n=bob", "c=biws", "r=rO", ",p="] {
            assert!(!text.contains(clear), "`{clear}` in {text}");
        }
    }
    assert_eq!(f.outcome("foreign", "success"), 1);
    assert_eq!(f.home_outcome("released"), 1);
}

impl Federation {
    /// The test CA's PEM file.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self._dir.path().join("ca.pem")
    }

    /// `gatehouse_crossover_total{side, outcome}` at the foreign gateway (org.example).
    pub fn outcome(&self, side: &str, outcome: &str) -> u64 {
        counter(self.org.metrics.expect("metrics"), side, outcome)
    }

    /// The same at the home (partner.example).
    pub fn home_outcome(&self, outcome: &str) -> u64 {
        counter(self._home.metrics.expect("metrics"), "home", outcome)
    }
}

pub fn counter(metrics: SocketAddr, side: &str, outcome: &str) -> u64 {
    // The foreign side's counters are synchronised on the loop's 250 ms tick.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, text) = crate::operations::http_get(metrics, "/metrics");
        let needle = format!("gatehouse_crossover_total{{outcome=\"{outcome}\",side=\"{side}\"}} ");
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// The decoded `s2c` of a response's SASL header, as text (lossy).
fn challenge_text(m: &Message) -> String {
    let v = header(m, "Proxy-Authentication-Info")
        .or_else(|| header(m, "Proxy-Authenticate"))
        .unwrap_or_default();
    SaslParams::parse(&v)
        .ok()
        .and_then(|p| p.s2c)
        .map(|t| String::from_utf8_lossy(&t).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_wrong_password_is_refused_and_the_home_locks_the_user() {
    let f = federation(Variant::default());
    for n in 0..3 {
        let mut c = Caller::connect(&f, &format!("xover-wrong-{n}@test"));
        let (r, _) = call(&f, &mut c, b"not-bobs-password");
        assert_eq!(r.status(), Some(403), "{r:?}");
        assert!(header(&r, "Proxy-Authentication-Info").is_none());
    }
    // Locked at the home (3 failures): the right password fails too, at once.
    let mut c = Caller::connect(&f, "xover-locked@test");
    let (mut x, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        b"bob-secret",
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    let r = first_round(&mut c, token);
    assert_eq!(r.status(), Some(403), "{r:?}");
    let _ = &mut x;
    assert_eq!(f.home_outcome("bad_credentials"), 3);
    assert_eq!(f.home_outcome("locked"), 1);
}

/// Someone guessing bob's password through org.example's gateway, from another address,
/// locks bob out at his home only for that address: the home counts the caller org.example
/// reports (`client`), not org.example's gateway, which every caller it relays shares.
#[test]
fn a_guesser_through_the_foreign_gateway_does_not_lock_the_user_out_everywhere() {
    let f = federation(Variant::default());
    let guesser = |n: u32| Caller {
        client: SipClient::tls_from(
            f.org.addr(Transport::Tls),
            f.pki.ca_der.clone(),
            "127.0.0.2".parse().unwrap(),
        ),
        call_id: format!("xover-guess-{n}@test"),
        from_tag: "g1".into(),
        cseq: 0,
    };
    for n in 0..3 {
        let (r, _) = call(&f, &mut guesser(n), b"guess");
        assert_eq!(r.status(), Some(403), "{r:?}");
    }
    // The guesser is locked out at the home: even its first round is refused now.
    let mut c = guesser(3);
    let (_, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        b"guess",
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    assert_eq!(first_round(&mut c, token).status(), Some(403));
    assert_eq!(f.home_outcome("locked"), 1);
    // bob, from his own address, is not.
    let mut c = Caller::connect(&f, "xover-bob-after-guesses@test");
    let (r, mut x) = call(&f, &mut c, b"bob-secret");
    assert_eq!(r.status(), Some(200), "{r:?}");
    let info = SaslParams::parse(&header(&r, "Proxy-Authentication-Info").unwrap()).unwrap();
    x.finish(&info.s2c.unwrap()).expect("home-final verifies");
}

/// The first round only: what the foreign gateway answers to bob's client-first.
fn first_answer(f: &Federation, call_id: &str) -> Message {
    let mut c = Caller::connect(f, call_id);
    let (_, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        b"bob-secret",
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    first_round(&mut c, token)
}

#[test]
fn a_home_that_does_not_let_this_domain_ask_refuses() {
    let f = federation(Variant {
        foreign_domains: "[\"other.example\"]",
        ..Variant::default()
    });
    assert_eq!(first_answer(&f, "xover-domain@test").status(), Some(403));
    assert_eq!(f.home_outcome("domain_not_allowed"), 1);
    assert_eq!(f.outcome("foreign", "refused"), 1);
}

#[test]
fn a_foreign_gateway_whose_certificate_names_another_domain_gets_nothing() {
    let f = federation(Variant {
        foreign_cert: &["evil.example"],
        foreign_domains: "[\"any\"]",
        ..Variant::default()
    });
    assert_eq!(first_answer(&f, "xover-evil@test").status(), Some(403));
    // The home let it ask (any verified domain) but bob sealed org.example, not evil.example.
    assert_eq!(f.home_outcome("foreign_domain"), 1);
}

/// An impostor: a crossover service whose certificate, from the same trusted CA, names
/// impostor.example, at 127.0.0.1:`port` (where poisoned DNS or a wrong pin sends the foreign
/// gateway looking for partner.example's home).
fn impostor(f: &Federation, dir: &Path, port: u16) -> Gateway {
    f.pki.issue(dir, "imp", &["impostor.example"]);
    std::fs::write(dir.join("ca.pem"), &f.pki.ca_pem).unwrap();
    std::fs::write(
        dir.join("imp-home.key"),
        format!("{}\n", b64().encode(HOME_SK)),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        "[sip]\ndomains = [\"impostor.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{d}/imp.pem\"\nprivate_key = \"{d}/imp.key\"\n\
[crossover]\ntrusted_cas = \"{d}/ca.pem\"\n\
[crossover.home]\nlisten = \"127.0.0.1:{port}\"\nkey_file = \"{d}/imp-home.key\"\nforeign_domains = [\"any\"]\n",
        d = dir.display()
    ));
    crate::harness::wait_tcp_listening(port);
    gw
}

#[test]
fn an_impostor_home_whose_certificate_does_not_name_the_realm_is_not_asked() {
    let port = free_port();
    let f = federation(Variant {
        home_at: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..Variant::default()
    });
    let dir = TempDir::new("impostor");
    let _impostor = impostor(&f, dir.path(), port);
    assert_eq!(first_answer(&f, "xover-impostor@test").status(), Some(403));
    // Refused at the TLS check (the certificate verifies but names impostor.example), so
    // nothing was ever sent to it.
    assert_eq!(f.outcome("foreign", "certificate"), 1);
}

#[test]
fn a_silent_home_costs_its_own_calls_only_and_ends_them_by_the_deadline() {
    // A listener that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let f = federation(Variant {
        home_at: Some(silent.local_addr().unwrap()),
        deadline_ms: 1000,
        ..Variant::default()
    });
    let mut c = Caller::connect(&f, "xover-silent@test");
    let (_, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        b"bob-secret",
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    let r = c.invite(None);
    assert_eq!(r.status(), Some(407));
    let started = Instant::now();
    let round = c.invite_text(Some(&SaslParams {
        realm: Some("org.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(token),
        ..SaslParams::default()
    }));
    c.client.send(&round);
    // While that round waits for the silent home, another caller is served at once.
    let mut probe = Caller::connect(&f, "xover-other@test");
    let other = probe.invite(None);
    assert_eq!(other.status(), Some(407), "another call waits for nothing");
    let r = c.client.recv_final_or_challenge();
    assert_eq!(r.status(), Some(403));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "ended after {took:?}");
    assert_eq!(f.outcome("foreign", "deadline"), 1);
    drop(silent);
}

#[test]
fn a_relayed_exchange_replayed_under_another_call_or_channel_fails() {
    let f = federation(Variant::default());
    // bob's real first round, seen by someone on the path (or the foreign gateway itself).
    let mut c = Caller::connect(&f, "xover-replay@test");
    let (_, token) = XoverClient::start(
        &f.home_public,
        "bob@partner.example",
        b"bob-secret",
        c.facts(),
        rand_ikm(),
        None,
    )
    .unwrap();
    let r = first_round(&mut c, token.clone());
    assert_eq!(r.status(), Some(407));
    // Replayed under another Call-ID (same channel), then on another TLS channel (same Call-ID).
    let mut other_call = Caller {
        call_id: "xover-replay-2@test".into(),
        ..Caller::connect(&f, "unused")
    };
    assert_eq!(
        first_round(&mut other_call, token.clone()).status(),
        Some(403)
    );
    let mut other_channel = Caller::connect(&f, "xover-replay@test");
    assert_eq!(first_round(&mut other_channel, token).status(), Some(403));
    // Both refused by the home, for facts that differ from the sealed ones.
    assert_eq!(f.home_outcome("facts"), 2);
}

#[test]
fn crossover_is_offered_on_tls_only_and_never_for_an_unknown_realm() {
    let f = federation(Variant::default());
    // Over UDP the 407 does not offer it.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    let msg = format!(
        "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKudp1;rport\r\nMax-Forwards: 70\r\n\
From: <sip:bob@partner.example>;tag=u1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: xover-udp@test\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        l = udp.local_addr().unwrap()
    );
    udp.send_to(msg.as_bytes(), f.org.addr(Transport::Udp))
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let n = udp.recv(&mut buf).unwrap();
    let r = Message::parse(Bytes::copy_from_slice(&buf[..n]), &Limits::default()).unwrap();
    assert_eq!(r.status(), Some(407));
    assert!(!challenge(&r).mech.unwrap().contains(MECHANISM));
    // A realm nobody serves: refused (no home), never relayed anywhere.
    let mut c = Caller::connect(&f, "xover-nowhere@test");
    let (_, token) = XoverClient::start(
        &f.home_public,
        "eve@nowhere.example",
        b"x",
        Facts {
            from_aor: "sip:eve@nowhere.example".into(),
            ..c.facts()
        },
        rand_ikm(),
        None,
    )
    .unwrap();
    assert_eq!(first_round(&mut c, token).status(), Some(403));
    // No home found (no such name), or DNS silent until the deadline: refused either way.
    let refused = ["not_found", "deadline", "unreachable"]
        .iter()
        .map(|o| f.outcome("foreign", o))
        .sum::<u64>();
    assert_eq!(refused, 1);
}

impl Caller {
    /// The text of the next INVITE round (not sent).
    fn invite_text(&mut self, auth: Option<&SaslParams>) -> String {
        self.cseq += 1;
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        let body = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey={OFFER_KEY};prefix={OFFER_PREFIX};pskmth=xover\r\n"
        );
        format!(
            "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch=z9hG4bKx{c}{s};rport\r\nMax-Forwards: 70\r\n\
From: <sip:bob@partner.example>;tag={t}\r\nTo: <sip:vpn@org.example>\r\nCall-ID: {c}\r\nCSeq: {s} INVITE\r\n\
Contact: <sip:bob@{l};transport=tls>\r\n{auth}Content-Type: application/sdp\r\nContent-Length: {n}\r\n\r\n{body}",
            l = self.client.local,
            c = self.call_id,
            s = self.cseq,
            t = self.from_tag,
            n = body.len(),
        )
    }
}

/// dnsmasq on a loopback port answering `_sxover._tcp.partner.example` with `target:port`.
fn dns_server(dir: &Path, target_port: u16) -> (crate::harness::Proc, SocketAddr) {
    dnsmasq(
        dir,
        &[
            format!(
                "--srv-host=_sxover._tcp.partner.example,xover.partner.example,{target_port},10,0"
            ),
            "--host-record=xover.partner.example,127.0.0.1".to_owned(),
        ],
    )
}

/// dnsmasq on a loopback port, authoritative for partner.example with these `records`
/// (dnsmasq options).
pub fn dnsmasq(dir: &Path, records: &[String]) -> (crate::harness::Proc, SocketAddr) {
    let port = free_port();
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        "--listen-address=127.0.0.1".to_owned(),
        format!("--port={port}"),
        "--pid-file=".to_owned(),
        "--log-queries".to_owned(),
        "--log-facility=-".to_owned(),
        "--local=/partner.example/".to_owned(),
    ];
    args.extend(records.iter().cloned());
    let mut dnsmasq = crate::harness::Proc::spawn(
        "dnsmasq",
        std::process::Command::new("dnsmasq").args(args),
        dir,
    );
    crate::harness::wait_udp_bound(&mut dnsmasq, port);
    (dnsmasq, format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn the_home_is_found_by_dns_srv_and_an_impostor_there_is_refused() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    let dir = TempDir::new("xover-dns");
    // The real home, found through SRV: bob's call goes through.
    let home_port = free_port();
    let (dns, dns_addr) = dns_server(dir.path(), home_port);
    let f = federation(Variant {
        dns: Some(dns_addr),
        home_port: Some(home_port),
        ..Variant::default()
    });
    let mut c = Caller::connect(&f, "xover-dns@test");
    let (r, mut x) = call(&f, &mut c, b"bob-secret");
    assert_eq!(r.status(), Some(200), "{r:?}\ndnsmasq:\n{}", dns.log_text());
    let info = SaslParams::parse(&header(&r, "Proxy-Authentication-Info").unwrap()).unwrap();
    assert!(x.finish(&info.s2c.unwrap()).is_ok());
    assert!(dns.log_text().contains("_sxover._tcp.partner.example"));
    drop(f);
    drop(dns);

    // DNS poisoned: SRV names a server with a valid certificate for another domain.
    let port = free_port();
    let (_dns, dns_addr) = dns_server(dir.path(), port);
    let f = federation(Variant {
        dns: Some(dns_addr),
        ..Variant::default()
    });
    let imp_dir = TempDir::new("impostor-dns");
    let _impostor = impostor(&f, imp_dir.path(), port);
    assert_eq!(first_answer(&f, "xover-poisoned@test").status(), Some(403));
    assert_eq!(f.outcome("foreign", "certificate"), 1);
}

/// A measurement, not a check (run by hand, figures in docs/PERFORMANCE.md):
/// `cargo test --test system crossover::measure_crossover_set_ups -- --ignored --nocapture`.
/// 200 sequential crossover set-ups on one TLS connection (the caller's PBKDF2 is in each),
/// against a local SCRAM set-up of alice for comparison; set-up time from the first INVITE to
/// the verified 200, and this process's CPU (both gateways and the caller run in it).
/// `gatehouse-load` in crossover mode: complete set-ups by a caller org.example does not know,
/// over one TLS connection, each verified (the home's statement names bob and org.example).
#[test]
fn gatehouse_load_runs_crossover_set_ups() {
    let f = federation(Variant {
        home_rate: 100_000,
        // One source sends every round: the per-source rate limit would drop them.
        org_extra: "[rate_limit]\nenabled = false\n",
        // gatehouse-load offers a /128 of its own per set-up in 2001:db8:456:1::/64.
        partner_prefixes: "2001:db8:456::/48",
        ..Variant::default()
    });
    let report = wgsip::load::run(&wgsip::load::LoadOptions {
        gateway: f.org.addr(Transport::Tls),
        local: "127.0.0.1:0".parse().unwrap(),
        target: "sip:vpn@org.example".into(),
        username: "bob".into(),
        password: "bob-secret".into(),
        from: "sip:bob@partner.example".into(),
        rate: 50,
        count: 20,
        concurrency: 10,
        timeout: WAIT,
        progress: false,
        hold: false,
        tls: Some(wgsip::load::TlsTarget {
            ca: f.ca_file(),
            server_name: Some("org.example".into()),
        }),
        crossover: Some(wgsip::load::CrossoverCaller {
            home_key: f.home_public,
            identity: "bob@partner.example".into(),
        }),
    })
    .unwrap();
    assert_eq!(
        (report.succeeded, report.failed),
        (20, 0),
        "{}",
        report.summary()
    );
    assert_eq!(f.home_outcome("released"), 20);
}

#[test]
#[ignore]
fn measure_crossover_set_ups() {
    fn cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }
    let f = federation(Variant {
        home_rate: 100_000,
        // One source sends every round: the per-source rate limit would drop them.
        org_extra: "[rate_limit]\nenabled = false\n",
        ..Variant::default()
    });
    let n = 200;
    let mut times = Vec::new();
    let cpu0 = cpu();
    // One TLS connection for all (new connections from one source are rate-limited, issue 18).
    let mut c = Caller::connect(&f, "measure@test");
    for i in 0..n {
        let t = Instant::now();
        c.call_id = format!("measure-{i}@test");
        c.cseq = 0;
        let (r, mut x) = call(&f, &mut c, b"bob-secret");
        assert_eq!(r.status(), Some(200));
        let info = SaslParams::parse(&header(&r, "Proxy-Authentication-Info").unwrap()).unwrap();
        x.finish(&info.s2c.unwrap()).unwrap();
        times.push(t.elapsed());
    }
    let spent = cpu() - cpu0;
    times.sort();
    eprintln!(
        "crossover set-ups: {n}, p50 {:?}, p99 {:?}, process CPU per set-up {:?}",
        times[n / 2],
        times[n * 99 / 100],
        spent / n as u32
    );
    // The same through a local SCRAM-SHA-256-PLUS exchange of alice (org.example's own user; a
    // plain call), on one TLS connection, the client's PBKDF2 in each as above.
    let mut client = SipClient::tls(f.org.addr(Transport::Tls), f.pki.ca_der.clone());
    let mut local = Vec::new();
    let cpu0 = cpu();
    for i in 0..n {
        let t = Instant::now();
        let mut scram =
            gatehouse_auth::scram::ScramClient::new("alice", b"alice-secret", client.exporter());
        let mut call = crate::sasl::Call::new(&format!("local-{i}"));
        let r = crate::sasl::authenticated_invite(&mut client, &mut scram, &mut call);
        assert_eq!(r.status(), Some(200));
        local.push(t.elapsed());
    }
    let spent = cpu() - cpu0;
    local.sort();
    eprintln!(
        "local SCRAM-PLUS set-ups: {n}, p50 {:?}, p99 {:?}, process CPU per set-up {:?}",
        local[n / 2],
        local[n * 99 / 100],
        spent / n as u32
    );
}
