//! Federation between two organisations on one machine (docs/realm-crossover.md,
//! "Federation"): alice, an internal caller of org.example, opens a tunnel to
//! `sip:vpn@partner.example`. Her own gateway authenticates her (SCRAM-SHA-256-PLUS), lets her
//! reach that domain by policy, finds partner.example through DNS and checks its certificate;
//! partner.example's gateway challenges with SXOVER-PLUS and relays her sealed rounds to her
//! home — org.example's gateway again, as a crossover service — which recognises the call it
//! sent out and the channel alice has with it. The caller is the test itself (a TLS SIP client),
//! so every step can be checked; `wireguard::tunnel_by_federation` runs the real `wgsip`.

use base64::Engine;
use gatehouse::store::Store;
use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::xover::{derive_key, Facts, HomeKey, XoverClient, MECHANISM};
use gatehouse_auth::SaslParams;
use gatehouse_sip::flow::Transport;
use gatehouse_sip::Message;

use crate::client::{header, SipClient};
use crate::crossover::{b64, counter, dnsmasq, rand_ikm, Pki, WgUas};
use crate::harness::{free_port, Gateway, Proc, TempDir};

const OFFER_KEY: &str = "YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=";
/// alice's site: one of org.example's own prefixes (org_prefixes guards inbound offers only).
const OFFER_PREFIX: &str = "2001:db8:789:a::/64";
const ORG_HOME_SK: [u8; 32] = [0x24; 32];

/// The two organisations, the partner's tunnel endpoint and the DNS server that names them.
pub struct Outward {
    _dir: TempDir,
    pub pki: Pki,
    _dns: Proc,
    /// partner.example's gateway: crossover on (foreign side), vpn@partner.example behind it.
    pub partner: Gateway,
    /// org.example's gateway: alice's, and her home's crossover service.
    pub org: Gateway,
    pub uas: WgUas,
    pub org_home_public: [u8; 32],
}

/// `policy_callers`: who org.example lets open tunnels to partner.example.
/// `partner_cert`: the names in the certificate partner.example's SIP listener presents.
fn outward(policy_callers: &str, partner_cert: &[&str]) -> Outward {
    outward_with(policy_callers, partner_cert, true)
}

/// `peer_certificates`: partner.example asks SIP peers for client certificates (`[tls]
/// client_ca`), so it knows org.example's gateway when it sees it.
fn outward_with(policy_callers: &str, partner_cert: &[&str], peer_certificates: bool) -> Outward {
    let dir = TempDir::new("federation");
    let d = dir.path();
    let pki = Pki::new();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    pki.issue(d, "partner", partner_cert);
    pki.issue(d, "partner-client", &["partner.example"]);
    pki.issue(d, "org", &["org.example", "localhost"]);
    std::fs::write(
        d.join("org-home.key"),
        format!("{}\n", b64().encode(ORG_HOME_SK)),
    )
    .unwrap();
    let org_home_public = *HomeKey::from_private(&ORG_HOME_SK).unwrap().public();
    let org_home_port = free_port();

    // partner.example: the foreign side for alice; its vpn endpoint is the tunnel UAS.
    let partner_store = d.join("partner.sqlite");
    crate::sasl::seed(&partner_store);
    std::fs::write(
        d.join("partner-policy.toml"),
        "[[rule]]\nname = \"org-staff-by-crossover\"\nkind = \"tunnel\"\ncallers = [\"*@org.example\"]\n\
crossover = [\"org.example\"]\ntargets = [\"sip:vpn@partner.example\"]\npskmth = [\"xover\"]\nrequire_psk = true\n\
prefixes = [\"2001:db8:789::/48\"]\n",
    )
    .unwrap();
    let uas = WgUas::start();
    let partner = Gateway::start(&format!(
        "[sip]\ndomains = [\"partner.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:0\"\n\
[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{d}/partner.pem\"\nprivate_key = \"{d}/partner.key\"\n{client_ca}\
[auth]\nstore = \"{s}\"\nfailures_before_lockout = 3\n\
[tunnels]\npolicy = \"{d}/partner-policy.toml\"\ninternal_networks = [\"127.0.0.0/8\"]\n\
[crossover]\nenabled = true\ncertificate = \"{d}/partner-client.pem\"\nprivate_key = \"{d}/partner-client.key\"\n\
trusted_cas = \"{d}/ca.pem\"\nallow_private = true\ndeadline_ms = 3000\n\
[crossover.homes]\n\"org.example\" = \"127.0.0.1:{org_home_port}\"\n\
[[route]]\naor = \"sip:vpn@partner.example\"\ntarget = \"sip:vpn@{uas}\"\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n",
        d = d.display(),
        s = partner_store.display(),
        uas = uas.addr,
        client_ca = if peer_certificates {
            format!("client_ca = \"{}/ca.pem\"\n", d.display())
        } else {
            String::new()
        },
    ));
    let partner_port = partner.addr(Transport::Tls).port();
    let (dns, dns_addr) = dnsmasq(d, &["--host-record=partner.example,127.0.0.1".to_owned()]);

    // org.example: alice's gateway and home. partner.example is located through DNS and must
    // present a certificate for that domain.
    let org_store = d.join("org.sqlite");
    let mut users = Store::open(&org_store).unwrap();
    for user in ["alice", "carol"] {
        users
            .add_user(
                user,
                format!("{user}-secret").as_bytes(),
                &[format!("sip:{user}@org.example")],
                None,
                4096,
            )
            .unwrap();
    }
    drop(users);
    std::fs::write(
        d.join("org-policy.toml"),
        format!(
            "org_prefixes = [\"2001:db8:789::/48\"]\n\
[[rule]]\nname = \"staff-to-partners\"\nkind = \"tunnel\"\ncallers = {policy_callers}\n\
targets = [\"*@partner.example\"]\npskmth = [\"xover\"]\nrequire_psk = true\nprefixes = [\"2001:db8:789::/48\"]\n"
        ),
    )
    .unwrap();
    let org = Gateway::start(&format!(
        "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:0\"\n\
[tls]\ncertificate = \"{d}/org.pem\"\nprivate_key = \"{d}/org.key\"\nca = \"{d}/ca.pem\"\n\
[auth]\nstore = \"{s}\"\nfailures_before_lockout = 3\n\
[tunnels]\npolicy = \"{d}/org-policy.toml\"\n\
[crossover]\ntrusted_cas = \"{d}/ca.pem\"\n\
[crossover.home]\nlisten = \"127.0.0.1:{org_home_port}\"\nkey_file = \"{d}/org-home.key\"\nforeign_domains = [\"partner.example\"]\n\
[dns]\nservers = [\"{dns_addr}\"]\ntimeout_ms = 1000\n\
[[route]]\ndomain = \"partner.example\"\ntarget = \"sip:partner.example:{partner_port};transport=tls\"\n\
[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n",
        d = d.display(),
        s = org_store.display(),
    ));
    crate::harness::wait_tcp_listening(org_home_port);
    Outward {
        _dir: dir,
        pki,
        _dns: dns,
        partner,
        org,
        uas,
        org_home_public,
    }
}

/// alice: a TLS connection to her own gateway and one call's identifiers.
struct Alice {
    /// The caller's username (its AOR is `sip:USER@org.example`).
    user: String,
    client: SipClient,
    call_id: String,
    cseq: u32,
}

impl Alice {
    fn connect(o: &Outward, call_id: &str) -> Alice {
        Alice::as_user(o, "alice", call_id)
    }

    fn as_user(o: &Outward, user: &str, call_id: &str) -> Alice {
        Alice {
            user: user.to_owned(),
            client: SipClient::tls(o.org.addr(Transport::Tls), o.pki.ca_der.clone()),
            call_id: call_id.to_owned(),
            cseq: 0,
        }
    }

    /// What alice seals for her home: the partner's domain, and her channel with *her*
    /// gateway (the only TLS connection she has).
    fn facts(&self) -> Facts {
        Facts {
            foreign_domain: "partner.example".into(),
            call_id: self.call_id.clone(),
            from_tag: "alice1".into(),
            from_aor: format!("sip:{}@org.example", self.user),
            channel_binding: self.client.exporter().unwrap(),
            offer_pubkey: b64().decode(OFFER_KEY).unwrap(),
            offer_prefix: OFFER_PREFIX.into(),
        }
    }

    fn invite(&mut self, auth: Option<&SaslParams>) -> Message {
        self.cseq += 1;
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        let body = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey={OFFER_KEY};prefix={OFFER_PREFIX};pskmth=xover\r\n"
        );
        let msg = format!(
            "INVITE sip:vpn@partner.example SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch=z9hG4bKa{c}{s};rport\r\nMax-Forwards: 70\r\n\
From: <sip:{u}@org.example>;tag=alice1\r\nTo: <sip:vpn@partner.example>\r\nCall-ID: {c}\r\nCSeq: {s} INVITE\r\n\
Contact: <sip:{u}@{l};transport=tls>\r\n{auth}Content-Type: application/sdp\r\nContent-Length: {n}\r\n\r\n{body}",
            l = self.client.local,
            u = self.user,
            c = self.call_id,
            s = self.cseq,
            n = body.len(),
        );
        self.client.send(&msg);
        self.client.recv_final_or_challenge()
    }

    /// An in-dialog request of the call `ok` (its 2xx) set up, along its route set; its final
    /// response (none for ACK).
    fn in_dialog(&mut self, ok: &Message, method: &str, cseq: Option<u32>) -> Option<Message> {
        let route: Vec<String> = ok
            .list_values(gatehouse_sip::HeaderName::RecordRoute)
            .into_iter()
            .rev()
            .collect();
        let contact = header(ok, "Contact").unwrap();
        let target = contact
            .trim()
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
        let to = header(ok, "To").unwrap();
        let n = cseq.unwrap_or(self.cseq);
        let msg = format!(
            "{method} {target} SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch=z9hG4bKd{method}{n};rport\r\nMax-Forwards: 70\r\n\
Route: {route}\r\nFrom: <sip:alice@org.example>;tag=alice1\r\nTo: {to}\r\nCall-ID: {c}\r\nCSeq: {n} {method}\r\n\
Content-Length: 0\r\n\r\n",
            l = self.client.local,
            c = self.call_id,
            route = route.join(", "),
        );
        self.client.send(&msg);
        (method != "ACK").then(|| self.client.recv_final_or_challenge())
    }

    /// SCRAM-SHA-256-PLUS with her own gateway: the response to the third round (the partner's
    /// answer, relayed) and the verified transcript.
    fn authenticate_here(&mut self, password: &[u8]) -> Message {
        let mut scram = ScramClient::new(&self.user, password, self.client.exporter());
        let r = self.invite(None);
        assert_eq!(r.status(), Some(407), "{r:?}");
        assert_eq!(challenge(&r).realm.as_deref(), Some("org.example"));
        let r = self.invite(Some(&SaslParams {
            realm: Some("org.example".into()),
            mech: Some(scram.mechanism().to_owned()),
            c2s: Some(scram.client_first()),
            ..SaslParams::default()
        }));
        let c = challenge(&r);
        let client_final = scram.client_final(&c.s2c.unwrap()).unwrap();
        let r = self.invite(Some(&SaslParams {
            realm: Some("org.example".into()),
            s2s: c.s2s,
            c2s: Some(client_final),
            ..SaslParams::default()
        }));
        if let Some(info) = header(&r, "Proxy-Authentication-Info") {
            // Mutual: her own gateway proved itself on whatever came back.
            scram
                .verify_server_final(&SaslParams::parse(&info).unwrap().s2c.unwrap())
                .expect("org.example's server-final verifies");
        }
        r
    }
}

fn challenge(m: &Message) -> SaslParams {
    SaslParams::parse(&header(m, "Proxy-Authenticate").expect("Proxy-Authenticate")).unwrap()
}

/// The partner's rounds: SXOVER-PLUS sealed to alice's home, relayed by both gateways.
fn crossover_with_home(
    o: &Outward,
    a: &mut Alice,
    partner_407: &Message,
) -> (Message, XoverClient) {
    let password = format!("{}-secret", a.user);
    crossover_with_password(o, a, partner_407, password.as_bytes())
}

/// [`crossover_with_home`] with `password` sealed to the home (the caller's SCRAM with its
/// own gateway already done).
fn crossover_with_password(
    o: &Outward,
    a: &mut Alice,
    partner_407: &Message,
    password: &[u8],
) -> (Message, XoverClient) {
    let offered = challenge(partner_407);
    assert_eq!(offered.realm.as_deref(), Some("partner.example"));
    assert!(
        offered
            .mech
            .unwrap_or_default()
            .split(' ')
            .any(|m| m == MECHANISM),
        "the partner offers crossover over TLS"
    );
    let (facts, user) = (a.facts(), a.user.clone());
    let (r, mut x) = sealed_first_round(o, &user, a, password, facts);
    assert_eq!(r.status(), Some(407), "{r:?}");
    let ch = challenge(&r);
    let next = x.step(&ch.s2c.unwrap()).expect("her home's token opens");
    let r = a.invite(Some(&SaslParams {
        realm: Some("partner.example".into()),
        s2s: ch.s2s,
        c2s: Some(next),
        ..SaslParams::default()
    }));
    (r, x)
}

/// `gatehouse_crossover_total{side, outcome}` as it is now (for a count that must stay 0:
/// the home service counts as it answers, before the SIP side's response).
fn counter_now(metrics: std::net::SocketAddr, side: &str, outcome: &str) -> u64 {
    let (_, text) = crate::operations::http_get(metrics, "/metrics");
    let needle = format!("gatehouse_crossover_total{{outcome=\"{outcome}\",side=\"{side}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `user`'s first sealed round for the partner (`facts` as sealed, `password` at the home),
/// sent on `via` (the user's connection, or another one): the response and the client.
fn sealed_first_round(
    o: &Outward,
    user: &str,
    via: &mut Alice,
    password: &[u8],
    facts: Facts,
) -> (Message, XoverClient) {
    let (x, token) = XoverClient::start(
        &o.org_home_public,
        &format!("{user}@org.example"),
        password,
        facts,
        rand_ikm(),
        None,
    )
    .unwrap();
    let r = via.invite(Some(&SaslParams {
        realm: Some("partner.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(token),
        ..SaslParams::default()
    }));
    (r, x)
}

fn home_released(o: &Outward) -> u64 {
    counter(o.org.metrics.unwrap(), "home", "released")
}

#[test]
fn an_internal_caller_opens_a_tunnel_to_a_partner_authenticated_by_its_own_home() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    let o = outward("[\"sip:alice@org.example\"]", &["partner.example"]);
    let mut a = Alice::connect(&o, "federation-ok@test");
    let r = a.authenticate_here(b"alice-secret");
    assert_eq!(r.status(), Some(407), "the partner's challenge: {r:?}");
    let (r, mut x) = crossover_with_home(&o, &mut a, &r);
    assert_eq!(r.status(), Some(200), "{r:?}");
    // Mutual with her home: its statement names her and the domain it released the key to.
    let info = SaslParams::parse(&header(&r, "Proxy-Authentication-Info").unwrap()).unwrap();
    let ok = x.finish(&info.s2c.unwrap()).expect("home-final verifies");
    assert_eq!(ok.identity, "alice@org.example");
    assert_eq!(ok.released_to, "partner.example");
    // The partner's internal endpoint holds exactly the key alice derives; none travelled
    // back to her, and her own gateway added none on the way out.
    let key = derive_key(&ok.transcript, &a.facts());
    assert_eq!(o.uas.inward_psk(), Some(b64().encode(key.expose())));
    let body = String::from_utf8_lossy(r.body()).into_owned();
    assert!(
        body.contains("pskmth=xover") && !body.contains("psk="),
        "{body}"
    );
    assert_eq!(home_released(&o), 1);
    assert_eq!(counter(o.partner.metrics.unwrap(), "foreign", "success"), 1);
    // The dialog runs through both gateways: ACK, then BYE along the route set, answered by
    // the partner's endpoint.
    assert!(a.in_dialog(&r, "ACK", None).is_none());
    let bye = a
        .in_dialog(&r, "BYE", Some(a.cseq + 1))
        .expect("BYE answered");
    assert_eq!(bye.status(), Some(200), "{bye:?}");
}

#[test]
fn an_internal_caller_the_policy_does_not_let_out_gets_403_and_nothing_leaves() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    let o = outward("[\"sip:bob@org.example\"]", &["partner.example"]);
    let mut a = Alice::connect(&o, "federation-denied@test");
    let r = a.authenticate_here(b"alice-secret");
    assert_eq!(r.status(), Some(403), "{r:?}");
    assert!(
        header(&r, "Warning").is_some_and(|w| w.contains("policy")),
        "{r:?}"
    );
    // The partner never saw the call (its endpoint got nothing either).
    assert!(o.uas.requests.try_recv().is_err());
    assert_eq!(
        counter_now(o.partner.metrics.unwrap(), "foreign", "relayed"),
        0
    );
}

#[test]
fn a_partner_whose_certificate_does_not_name_its_domain_is_never_reached() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    // DNS sends partner.example to a server whose certificate names another domain.
    let o = outward("[\"sip:alice@org.example\"]", &["impostor.example"]);
    let mut a = Alice::connect(&o, "federation-impostor@test");
    let r = a.authenticate_here(b"alice-secret");
    assert_eq!(
        r.status(),
        Some(503),
        "TLS to partner.example refused: {r:?}"
    );
}

#[test]
fn an_outward_exchange_replayed_on_another_channel_is_refused_by_the_home() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    let o = outward("[\"sip:alice@org.example\"]", &["partner.example"]);
    let mut a = Alice::connect(&o, "federation-replay@test");
    let partner_407 = a.authenticate_here(b"alice-secret");
    assert_eq!(partner_407.status(), Some(407));
    // alice's rounds resume on her connection only: the same call's next request from
    // another TLS connection (same Call-ID, From tag, Request-URI) gets org.example's 407.
    let mut other = Alice::connect(&o, "federation-replay@test");
    other.cseq = a.cseq;
    let (r, _) = sealed_first_round(&o, "alice", &mut other, b"alice-secret", a.facts());
    assert_eq!(r.status(), Some(407), "{r:?}");
    assert_eq!(challenge(&r).realm.as_deref(), Some("org.example"));
    // An exchange sealed with another channel than alice's with her gateway: the home
    // refuses it (the partner relays it faithfully; the binding is what fails).
    let mut forged = a.facts();
    forged.channel_binding = vec![0x55; 32];
    let (r, _) = sealed_first_round(&o, "alice", &mut a, b"alice-secret", forged);
    assert_eq!(r.status(), Some(403), "{r:?}");
    // The home's refusal: the facts it saw (her channel with us) are not the sealed ones.
    assert_eq!(counter(o.org.metrics.unwrap(), "home", "facts"), 1);
    assert_eq!(counter_now(o.org.metrics.unwrap(), "home", "released"), 0);
}

/// One federated user's wrong passwords (sealed to our home) must not lock every caller of
/// org.example out at partner.example, whose gateway sees them all come from one source, ours:
/// partner.example asks SIP peers for certificates (`[tls] client_ca`), recognises org.example's
/// gateway by the one it presents outbound, and leaves the lockout of org.example's users to
/// their home. Without the certificates, the same mistakes lock the realm out at that source.
#[test]
fn one_users_mistakes_do_not_lock_the_whole_organisation_out_at_a_partner() {
    if !crate::harness::tool("dnsmasq") {
        return;
    }
    for peer_certificates in [true, false] {
        let o = outward_with(
            "[\"*@org.example\"]",
            &["partner.example"],
            peer_certificates,
        );
        // carol authenticates here, then seals a wrong password for her home: three times.
        for n in 0..3 {
            let mut carol = Alice::as_user(&o, "carol", &format!("federation-carol-{n}@test"));
            let partner_407 = carol.authenticate_here(b"carol-secret");
            assert_eq!(partner_407.status(), Some(407), "{partner_407:?}");
            let (r, _) = crossover_with_password(&o, &mut carol, &partner_407, b"not-carols");
            assert_eq!(r.status(), Some(403), "{r:?}");
        }
        // alice, right afterwards, from the same gateway.
        let mut a = Alice::connect(&o, "federation-alice-after-carol@test");
        let partner_407 = a.authenticate_here(b"alice-secret");
        assert_eq!(partner_407.status(), Some(407), "{partner_407:?}");
        let facts = a.facts();
        let (first, _) = sealed_first_round(&o, "alice", &mut a, b"alice-secret", facts);
        if peer_certificates {
            assert_eq!(first.status(), Some(407), "relayed to her home: {first:?}");
        } else {
            assert_eq!(
                first.status(),
                Some(403),
                "the realm is locked at our source"
            );
        }
    }
}
