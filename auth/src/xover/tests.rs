//! The document's test vectors (docs/realm-crossover.md), and the exchange between an
//! [`XoverClient`] and an [`XoverHome`] with every refusal the document lists.

// A test chooses where its manual clock starts.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;

use super::*;
use crate::scram::{hmac, Verifier};
use crate::server::{Credential, Mechanism, SaslServer, ServerSettings};
use crate::SaslParams;

const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 50));
const HOME_SK: [u8; 32] = [1; 32];
const IKM: [u8; 32] = [2; 32];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn facts() -> Facts {
    Facts {
        foreign_domain: "org.example".into(),
        call_id: "a84b4c76e66710@pc33.partner.example".into(),
        from_tag: "1928301774".into(),
        from_aor: "sip:bob@partner.example".into(),
        channel_binding: vec![3; 32],
        offer_pubkey: unb64("YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M="),
        offer_prefix: "2001:db8:b0b::/64".into(),
    }
}

fn home_keys() -> HomeKeys {
    HomeKeys {
        realm: "partner.example".into(),
        keys: vec![HomeKey::from_private(&HOME_SK).unwrap()],
    }
}

fn public() -> [u8; 32] {
    *HomeKey::from_private(&HOME_SK).unwrap().public()
}

/// The document's listing: every token of the RFC 7677-style exchange with fixed inputs.
#[test]
fn vectors() {
    let salt = unb64("W22ZaJ0SNY7soEsUEjb6gQ==");
    let (mut client, c1) = XoverClient::start(
        &public(),
        "bob@partner.example",
        b"pencil",
        facts(),
        IKM,
        Some("rOprNGfwEbeRWgbNEkqO"),
    )
    .unwrap();
    // The home opens it and sees the SCRAM client-first and the facts.
    let mut opened = home_keys().open_first(&c1).unwrap();
    assert_eq!(opened.facts, facts());
    assert_eq!(
        opened.scram_client_first,
        b"n,,n=bob,r=rOprNGfwEbeRWgbNEkqO"
    );
    let server_first =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    let h1 = opened.channel.seal_home_next(server_first).unwrap();
    let c2 = client.step(&h1).unwrap();
    let client_final = opened.channel.open_client_next(&c2).unwrap();
    // The server-final, as the home's SCRAM server computes it.
    let verifier = Verifier::derive(b"pencil", salt, 4096);
    let text = std::str::from_utf8(&client_final).unwrap();
    let without_proof = text.rsplit_once(",p=").unwrap().0;
    let auth_message = format!(
        "n=bob,r=rOprNGfwEbeRWgbNEkqO,{},{without_proof}",
        std::str::from_utf8(server_first).unwrap()
    );
    let v = hmac(&verifier.server_key, &[auth_message.as_bytes()]);
    let server_final = format!("v={}", b64(&v));
    let h2 = opened
        .channel
        .seal_home_final(
            server_final.as_bytes(),
            "bob@partner.example",
            "org.example",
        )
        .unwrap();
    let ok = client.finish(&h2).unwrap();
    assert_eq!(ok.identity, "bob@partner.example");
    assert_eq!(ok.released_to, "org.example");
    let key = derive_key(&ok.transcript, &facts());
    let listing = format!(
        "home public key  {}\nkid              {}\nc2s#1  {}\ns2c#1  {}\nc2s#2  {}\ns2c#2  {}\nclient-final {}\nserver-final {}\nClientKey {}\nbind   {}\nkey    {}\n       (base64 {})\n",
        b64(&public()),
        hex(&kid(&public())),
        b64(&c1),
        b64(&h1),
        b64(&c2),
        b64(&h2),
        text,
        server_final,
        hex(ok.transcript.client_key.expose()),
        hex(&key_binding(&facts())),
        hex(key.expose()),
        b64(key.expose()),
    );
    println!("{listing}");
    let doc = include_str!("../../../docs/realm-crossover.md");
    assert!(
        doc.contains(&listing),
        "docs/realm-crossover.md does not hold this listing:\n{listing}"
    );
}

fn server(realm: &str) -> SaslServer {
    SaslServer::new(ServerSettings {
        realm: realm.into(),
        mechanisms: vec![Mechanism::ScramSha256],
        ttl: Duration::from_secs(30),
        max_pending: 64,
        max_pending_per_source: 16,
        iterations: 4096,
        secret: Secret::new([9; 32]),
        seed: Secret::new([4; 32]),
    })
}

fn creds() -> HashMap<String, Credential> {
    let mut m = HashMap::new();
    m.insert(
        "bob".into(),
        Credential {
            username: "bob".into(),
            verifier: Verifier::derive(b"pencil", b"0123456789abcdef".to_vec(), 4096),
            aors: vec!["sip:bob@partner.example".into()],
            mechanisms: None,
            enabled: true,
        },
    );
    m
}

fn home() -> XoverHome {
    XoverHome::new(
        home_keys(),
        server("partner.example"),
        8,
        Duration::from_secs(30),
    )
}

fn first(token: &[u8]) -> SaslParams {
    SaslParams {
        realm: Some("partner.example".into()),
        mech: Some(MECHANISM.into()),
        c2s: Some(token.to_vec()),
        ..SaslParams::default()
    }
}

fn next(handle: &str, token: &[u8]) -> SaslParams {
    SaslParams {
        realm: Some("partner.example".into()),
        s2s: Some(handle.into()),
        c2s: Some(token.to_vec()),
        ..SaslParams::default()
    }
}

fn domains() -> Vec<String> {
    vec!["org.example".into()]
}

fn unlocked(_: &str) -> bool {
    false
}

fn start(password: &[u8], f: Facts) -> (XoverClient, Vec<u8>) {
    XoverClient::start(
        &public(),
        "bob@partner.example",
        password,
        f,
        rand::random(),
        None,
    )
    .unwrap()
}

/// Runs both rounds; returns the home's outcome of round 2 and the client.
fn exchange(
    h: &mut XoverHome,
    password: &[u8],
    relayed: &Facts,
    doms: &[String],
) -> (Result<HomeOutcome, HomeFailure>, XoverClient) {
    let now = Instant::now();
    let (mut client, c1) = start(password, facts());
    let rel = Relayed {
        facts: relayed,
        domains: doms,
        source: SRC,
    };
    let (handle, h1) = match h.step(&first(&c1), &rel, &creds(), &unlocked, now) {
        Ok(HomeOutcome::Challenge { handle, token }) => (handle, token),
        other => return (other, client),
    };
    let c2 = client.step(&h1).unwrap();
    (
        h.step(&next(&handle, &c2), &rel, &creds(), &unlocked, now),
        client,
    )
}

#[test]
fn a_relayed_exchange_gives_both_ends_the_same_key() {
    let mut h = home();
    let (outcome, mut client) = exchange(&mut h, b"pencil", &facts(), &domains());
    let HomeOutcome::Success {
        identity,
        released_to,
        key,
        token,
        call_id,
    } = outcome.unwrap()
    else {
        panic!("round 2 must finish");
    };
    assert_eq!(identity, "bob@partner.example");
    assert_eq!(released_to, "org.example");
    assert_eq!(call_id, facts().call_id);
    let ok = client.finish(&token).unwrap();
    assert_eq!(
        derive_key(&ok.transcript, client.facts()).expose(),
        key.expose()
    );
    assert_eq!(h.pending(), 0);
}

fn reason(r: Result<HomeOutcome, HomeFailure>) -> HomeReason {
    match r {
        Err(f) => f.reason,
        Ok(o) => panic!("expected a refusal, got {o:?}"),
    }
}

#[test]
fn a_wrong_password_fails_at_the_proof() {
    let mut h = home();
    let (outcome, _) = exchange(&mut h, b"pencil!", &facts(), &domains());
    assert_eq!(
        reason(outcome),
        HomeReason::Auth(crate::server::Failure::BadCredentials)
    );
}

#[test]
fn another_relaying_domain_or_call_or_channel_is_refused() {
    // A gateway whose certificate names another domain.
    let mut h = home();
    let (outcome, _) = exchange(&mut h, b"pencil", &facts(), &["evil.example".into()]);
    assert_eq!(reason(outcome), HomeReason::Domain);
    // Another Call-ID, From tag, channel, offer.
    for (name, change) in [
        (
            "call-id",
            Box::new(|f: &mut Facts| f.call_id.push('x')) as Box<dyn Fn(&mut Facts)>,
        ),
        ("from-tag", Box::new(|f: &mut Facts| f.from_tag.push('x'))),
        (
            "channel-binding",
            Box::new(|f: &mut Facts| f.channel_binding[0] ^= 1),
        ),
        ("pubkey", Box::new(|f: &mut Facts| f.offer_pubkey[0] ^= 1)),
        (
            "prefix",
            Box::new(|f: &mut Facts| f.offer_prefix = "2001:db8::/32".into()),
        ),
    ] {
        let mut relayed = facts();
        change(&mut relayed);
        let (outcome, _) = exchange(&mut h, b"pencil", &relayed, &domains());
        assert_eq!(reason(outcome), HomeReason::Xover(XoverError::Facts(name)));
    }
}

#[test]
fn a_replayed_exchange_does_not_verify() {
    let mut h = home();
    let now = Instant::now();
    let f = facts();
    let doms = domains();
    let rel = Relayed {
        facts: &f,
        domains: &doms,
        source: SRC,
    };
    let (mut client, c1) = start(b"pencil", facts());
    let HomeOutcome::Challenge { handle, token } =
        h.step(&first(&c1), &rel, &creds(), &unlocked, now).unwrap()
    else {
        panic!()
    };
    let c2 = client.step(&token).unwrap();
    assert!(matches!(
        h.step(&next(&handle, &c2), &rel, &creds(), &unlocked, now),
        Ok(HomeOutcome::Success { .. })
    ));
    // The relay replays both tokens: a fresh server nonce, and the old proof fails.
    let HomeOutcome::Challenge { handle, .. } =
        h.step(&first(&c1), &rel, &creds(), &unlocked, now).unwrap()
    else {
        panic!()
    };
    assert!(h
        .step(&next(&handle, &c2), &rel, &creds(), &unlocked, now)
        .is_err());
    // The same handle twice: single use.
    assert_eq!(
        reason(h.step(&next(&handle, &c2), &rel, &creds(), &unlocked, now)),
        HomeReason::Auth(crate::server::Failure::UnknownHandle)
    );
}

#[test]
fn tokens_for_another_realm_or_key_or_tampered_do_not_open() {
    let (_, c1) = start(b"pencil", facts());
    let mut other = home_keys();
    other.realm = "other.example".into();
    assert_eq!(other.open_first(&c1).unwrap_err(), XoverError::WrongRealm);
    let rotated = HomeKeys {
        realm: "partner.example".into(),
        keys: vec![HomeKey::from_private(&[7; 32]).unwrap()],
    };
    assert_eq!(rotated.open_first(&c1).unwrap_err(), XoverError::UnknownKey);
    // The previous key still opens during a rotation.
    let both = HomeKeys {
        realm: "partner.example".into(),
        keys: vec![
            HomeKey::from_private(&[7; 32]).unwrap(),
            HomeKey::from_private(&HOME_SK).unwrap(),
        ],
    };
    assert!(both.open_first(&c1).is_ok());
    // Every byte of the header is associated data, every byte after it is sealed.
    for i in 4..c1.len() {
        let mut t = c1.clone();
        t[i] ^= 0x20;
        assert!(
            home_keys().open_first(&t).is_err(),
            "byte {i} changed unnoticed"
        );
    }
}

#[test]
fn the_caller_checks_the_homes_statement() {
    let mut h = home();
    let now = Instant::now();
    let f = facts();
    let doms = domains();
    let rel = Relayed {
        facts: &f,
        domains: &doms,
        source: SRC,
    };
    let (mut client, c1) = start(b"pencil", facts());
    let HomeOutcome::Challenge { token, .. } =
        h.step(&first(&c1), &rel, &creds(), &unlocked, now).unwrap()
    else {
        panic!()
    };
    // A home-final before the second round, or a home-next replayed as the final: refused.
    let mut early = XoverClient::start(
        &public(),
        "bob@partner.example",
        b"pencil",
        facts(),
        IKM,
        None,
    )
    .unwrap()
    .0;
    assert_eq!(early.finish(&token).unwrap_err(), XoverError::Sequence);
    let _c2 = client.step(&token).unwrap();
    assert!(client.finish(&token).is_err());
}

#[test]
fn framing_refuses_what_it_does_not_know() {
    assert!(Token::parse(b"").is_err());
    assert!(Token::parse(b"SX\x02\x01").is_err());
    assert!(Token::parse(b"SX\x01\x09aaaaaaaaaaaaaaaaaaaaaaaa").is_err());
    assert!(Token::parse(&[b'S', b'X', 1, 1, 200]).is_err());
    let mut upper = b"SX\x01\x01\x03ABC".to_vec();
    upper.extend_from_slice(&[0; 8 + 32 + 16]);
    assert_eq!(
        Token::parse(&upper).unwrap_err(),
        XoverError::Malformed("realm")
    );
    assert!(Token::parse(&vec![0u8; TOKEN_MAX + 1]).is_err());
    assert!(valid_realm("partner.example"));
    for bad in ["", ".a", "a.", "a..b", "A.example", "a b"] {
        assert!(!valid_realm(bad), "{bad}");
    }
}

#[test]
fn a_locked_user_is_refused_before_scram_runs() {
    let mut h = home();
    let (_, c1) = start(b"pencil", facts());
    let f = facts();
    let doms = domains();
    let rel = Relayed {
        facts: &f,
        domains: &doms,
        source: SRC,
    };
    let r = h.step(&first(&c1), &rel, &creds(), &|u| u == "bob", Instant::now());
    let failure = r.unwrap_err();
    assert_eq!(failure.reason, HomeReason::Locked);
    assert_eq!(failure.user.as_deref(), Some("bob"));
}

#[test]
fn a_home_vouches_only_for_its_own_realm_and_releases_to_us() {
    let ours = vec!["org.example".to_owned()];
    let ok = accept_release(
        "partner.example",
        &ours,
        facts(),
        "bob@partner.example",
        "org.example",
        [5; 32],
    )
    .unwrap();
    assert_eq!(ok.identity(), "bob@partner.example");
    assert_eq!(ok.mechanism(), MECHANISM);
    assert_eq!(ok.aors(), ["sip:bob@partner.example".to_owned()]);
    assert_eq!(ok.crossover().unwrap().key.expose(), &[5; 32]);
    // Another realm's user, an AOR of another domain, a key released to someone else.
    for (identity, released, aor) in [
        ("ceo@org.example", "org.example", "sip:bob@partner.example"),
        (
            "bob@evil.partner.example",
            "org.example",
            "sip:bob@partner.example",
        ),
        ("@partner.example", "org.example", "sip:bob@partner.example"),
        ("bob@partner.example", "org.example", "sip:ceo@org.example"),
        (
            "bob@partner.example",
            "other.example",
            "sip:bob@partner.example",
        ),
    ] {
        let mut f = facts();
        f.from_aor = aor.into();
        assert!(
            accept_release("partner.example", &ours, f, identity, released, [5; 32]).is_err(),
            "{identity} {released} {aor}"
        );
    }
}

#[test]
fn aors_compare_as_the_gateway_compares_them() {
    assert_eq!(
        home::aor_key_for_tests("<sips:bob@Partner.Example:5061;transport=tls>"),
        "sip:bob@partner.example"
    );
    assert_eq!(
        home::aor_key_for_tests("sip:bob@partner.example"),
        "sip:bob@partner.example"
    );
    assert_ne!(
        home::aor_key_for_tests("sip:Bob@partner.example"),
        "sip:bob@partner.example"
    );
}
