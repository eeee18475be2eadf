//! The SASL server against the crate's independent SCRAM client.

// A test chooses where its manual clock starts.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::scram::ScramClient;

const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 9));

fn settings() -> ServerSettings {
    ServerSettings {
        realm: "org.example".into(),
        mechanisms: vec![
            Mechanism::ScramSha256Plus,
            Mechanism::ScramSha256,
            Mechanism::External,
            Mechanism::Plain,
        ],
        ttl: Duration::from_secs(30),
        max_pending: 4,
        max_pending_per_source: 2,
        iterations: 4096,
        secret: Secret::new([9; 32]),
        seed: Secret::new([3; 32]),
    }
}

fn creds() -> HashMap<String, Credential> {
    let mut m = HashMap::new();
    m.insert(
        "alice".into(),
        Credential {
            username: "alice".into(),
            verifier: Verifier::derive(b"correct horse", b"0123456789abcdef".to_vec(), 4096),
            aors: vec!["sip:alice@partner.example".into()],
            mechanisms: None,
            enabled: true,
        },
    );
    m
}

fn ex<'a>(call_id: &'a str, tls: Option<&'a TlsInfo>) -> Exchange<'a> {
    Exchange {
        call_id,
        from_tag: "ft",
        source: SRC,
        tls,
    }
}

fn first(client: &ScramClient) -> SaslParams {
    SaslParams {
        realm: Some("org.example".into()),
        mech: Some(client.mechanism().into()),
        c2s: Some(client.client_first()),
        ..SaslParams::default()
    }
}

/// Runs round 1 and returns (handle, server-first).
fn round1(
    server: &mut SaslServer,
    client: &ScramClient,
    e: &Exchange<'_>,
    now: Instant,
) -> (String, Vec<u8>) {
    match server.step(&first(client), e, &creds(), now).unwrap() {
        Outcome::Challenge(p) => (p.s2s.unwrap(), p.s2c.unwrap()),
        Outcome::Success { .. } => panic!("SCRAM cannot finish in one round"),
    }
}

fn round2(handle: &str, client_final: Vec<u8>) -> SaslParams {
    SaslParams {
        realm: Some("org.example".into()),
        s2s: Some(handle.into()),
        c2s: Some(client_final),
        ..SaslParams::default()
    }
}

#[test]
fn scram_exchange_succeeds_with_mutual_authentication() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let challenge = server
        .step(&SaslParams::default(), &ex("c1", None), &creds(), now)
        .unwrap();
    let Outcome::Challenge(c) = challenge else {
        panic!()
    };
    assert_eq!(
        c.mech.as_deref(),
        Some("SCRAM-SHA-256"),
        "only non-PLUS over a plain transport"
    );
    let mut client = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &client, &ex("c1", None), now);
    assert_eq!(server.pending(), 1);
    let cf = client.client_final(&sf).unwrap();
    let Outcome::Success { auth, info } = server
        .step(&round2(&h, cf), &ex("c1", None), &creds(), now)
        .unwrap()
    else {
        panic!("expected success")
    };
    assert_eq!(auth.identity(), "alice");
    assert_eq!(auth.aors(), ["sip:alice@partner.example".to_owned()]);
    let t = client.verify_server_final(&info.s2c.unwrap()).unwrap();
    assert_eq!(
        t.client_key.expose(),
        auth.transcript().unwrap().client_key.expose()
    );
    assert_eq!(t.auth_message, auth.transcript().unwrap().auth_message);
    assert_eq!(server.pending(), 0);
    assert_eq!(server.stats.outcomes[&("SCRAM-SHA-256", "success")], 1);
}

#[test]
fn wrong_password_fails_without_server_final() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let mut client = ScramClient::new("alice", b"wrong", None);
    let (h, sf) = round1(&mut server, &client, &ex("c1", None), now);
    let cf = client.client_final(&sf).unwrap();
    let err = server
        .step(&round2(&h, cf), &ex("c1", None), &creds(), now)
        .unwrap_err();
    assert_eq!(err, AuthError::Failed(Failure::BadCredentials));
}

#[test]
fn handles_are_single_use_bound_and_expire() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let mut client = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &client, &ex("c1", None), now);
    let cf = client.client_final(&sf).unwrap();
    // Another Call-ID presenting the handle is refused and does not consume it.
    let err = server
        .step(&round2(&h, cf.clone()), &ex("other", None), &creds(), now)
        .unwrap_err();
    assert_eq!(err, AuthError::Failed(Failure::ForeignHandle));
    let mut other_tag = ex("c1", None);
    other_tag.from_tag = "other";
    assert_eq!(
        server
            .step(&round2(&h, cf.clone()), &other_tag, &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::ForeignHandle)
    );
    assert!(matches!(
        server.step(&round2(&h, cf.clone()), &ex("c1", None), &creds(), now),
        Ok(Outcome::Success { .. })
    ));
    // Replay.
    assert_eq!(
        server
            .step(&round2(&h, cf), &ex("c1", None), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::UnknownHandle)
    );
    // Expiry.
    let mut client = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &client, &ex("c2", None), now);
    let cf = client.client_final(&sf).unwrap();
    let later = now + Duration::from_secs(31);
    assert_eq!(
        server
            .step(&round2(&h, cf), &ex("c2", None), &creds(), later)
            .unwrap_err(),
        AuthError::Failed(Failure::Expired)
    );
}

fn tls(exporter: u8) -> TlsInfo {
    TlsInfo {
        exporter: vec![exporter; 32],
        peer_identity: None,
        ..Default::default()
    }
}

#[test]
fn plus_binds_to_the_tls_exporter() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let conn = tls(1);
    let Outcome::Challenge(c) = server
        .step(
            &SaslParams::default(),
            &ex("c1", Some(&conn)),
            &creds(),
            now,
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        c.mech.as_deref(),
        Some("SCRAM-SHA-256-PLUS SCRAM-SHA-256 PLAIN")
    );
    let mut client = ScramClient::new("alice", b"correct horse", Some(vec![1; 32]));
    let (h, sf) = round1(&mut server, &client, &ex("c1", Some(&conn)), now);
    let cf = client.client_final(&sf).unwrap();
    let Outcome::Success { auth, info } = server
        .step(&round2(&h, cf), &ex("c1", Some(&conn)), &creds(), now)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(auth.mechanism(), Mechanism::ScramSha256Plus.name());
    client.verify_server_final(&info.s2c.unwrap()).unwrap();

    // Same exchange on a different TLS connection (a man in the middle): the binding differs.
    let mut client = ScramClient::new("alice", b"correct horse", Some(vec![2; 32]));
    let (h, sf) = round1(&mut server, &client, &ex("c2", Some(&conn)), now);
    let cf = client.client_final(&sf).unwrap();
    assert_eq!(
        server
            .step(&round2(&h, cf), &ex("c2", Some(&conn)), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::BadCredentials)
    );
}

#[test]
fn plus_downgrades_are_refused() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let conn = tls(1);
    // -PLUS named, but the client-first carries no binding (rsasl alone would accept it).
    let client = ScramClient::new("alice", b"correct horse", None);
    let mut p = first(&client);
    p.mech = Some("SCRAM-SHA-256-PLUS".into());
    assert_eq!(
        server
            .step(&p, &ex("c1", Some(&conn)), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::ChannelBinding)
    );
    // `y` (client thinks the server cannot bind) where -PLUS was offered.
    let mut p = first(&client);
    let text = String::from_utf8(p.c2s.take().unwrap())
        .unwrap()
        .replacen("n,,", "y,,", 1);
    p.c2s = Some(text.into_bytes());
    assert_eq!(
        server
            .step(&p, &ex("c1", Some(&conn)), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::ChannelBinding)
    );
    // -PLUS over a plain transport is not offered at all.
    let client = ScramClient::new("alice", b"correct horse", Some(vec![1; 32]));
    assert_eq!(
        server
            .step(&first(&client), &ex("c1", None), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::MechanismNotOffered)
    );
}

#[test]
fn unknown_users_look_like_known_users() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let shape = |server: &mut SaslServer, user: &str, call: &str| {
        let client = ScramClient::new(user, b"x", None);
        let (_, sf) = round1(server, &client, &ex(call, None), now);
        let sf = String::from_utf8(sf).unwrap();
        let parts: Vec<String> = sf
            .split(',')
            .map(|p| format!("{}{}", &p[..2], p.len()))
            .collect();
        let salt = sf
            .split(',')
            .find(|p| p.starts_with("s="))
            .unwrap()
            .to_owned();
        (parts, salt)
    };
    let (known, _) = shape(&mut server, "alice", "k1");
    let (unknown, salt1) = shape(&mut server, "mallory", "u1");
    // Same fields, same lengths (nonce, salt, iteration count).
    assert_eq!(known, unknown);
    // The fake salt is deterministic: asking twice cannot tell a fake from a real user.
    let (_, salt2) = shape(&mut SaslServer::new(settings()), "mallory", "u2");
    assert_eq!(salt1, salt2);
    // And the exchange fails only at the proof, like a wrong password.
    let mut server = SaslServer::new(settings());
    let mut client = ScramClient::new("mallory", b"x", None);
    let (h, sf) = round1(&mut server, &client, &ex("u3", None), now);
    let cf = client.client_final(&sf).unwrap();
    assert_eq!(
        server
            .step(&round2(&h, cf), &ex("u3", None), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::BadCredentials)
    );
}

/// Round 2 of a parked exchange: succeeds when the exchange is still parked.
fn completes(
    server: &mut SaslServer,
    client: &mut ScramClient,
    handle: &str,
    sf: &[u8],
    e: &Exchange<'_>,
    now: Instant,
) -> bool {
    let cf = client.client_final(sf).unwrap();
    matches!(
        server.step(&round2(handle, cf), e, &creds(), now),
        Ok(Outcome::Success { .. })
    )
}

#[test]
fn a_source_at_its_cap_loses_its_own_oldest_exchange() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let mut legit = ScramClient::new("alice", b"correct horse", None);
    let mut l = ex("legit", None);
    l.source = "192.0.2.10".parse().unwrap();
    let (lh, lsf) = round1(&mut server, &legit, &l, now);
    // The attacker's source fills its own quota (2) many times over.
    let attacker = ScramClient::new("alice", b"x", None);
    for n in 0..50 {
        let id = format!("a{n}");
        round1(&mut server, &attacker, &ex(&id, None), now);
    }
    assert_eq!(
        server.pending(),
        3,
        "2 for the attacker's source, 1 for the other"
    );
    assert!(server.stats.evicted >= 48);
    assert!(completes(&mut server, &mut legit, &lh, &lsf, &l, now));
}

#[test]
fn an_ipv6_source_is_counted_per_64() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let attacker = ScramClient::new("alice", b"x", None);
    for n in 0..20u16 {
        let mut e = ex("v6", None);
        e.source = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, n + 1));
        round1(&mut server, &attacker, &e, now);
    }
    assert_eq!(
        server.pending(),
        2,
        "one /64 holds at most the per-source cap"
    );
}

#[test]
fn a_full_table_drops_its_oldest_and_never_refuses() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let attacker = ScramClient::new("alice", b"x", None);
    for n in 0..40u8 {
        let mut e = ex("flood", None);
        e.source = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, n));
        round1(&mut server, &attacker, &e, now);
    }
    assert_eq!(server.pending(), 4, "bounded by max_pending");
    // A legitimate exchange started now still completes.
    let mut legit = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &legit, &ex("legit", None), now);
    assert!(completes(
        &mut server,
        &mut legit,
        &h,
        &sf,
        &ex("legit", None),
        now
    ));
}

#[test]
fn expired_exchanges_leave_before_any_cap_is_checked() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let attacker = ScramClient::new("alice", b"x", None);
    for n in 0..4u8 {
        let mut e = ex("old", None);
        e.source = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, n));
        round1(&mut server, &attacker, &e, now);
    }
    let later = now + Duration::from_secs(31);
    let mut legit = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &legit, &ex("new", None), later);
    assert_eq!(
        server.pending(),
        1,
        "the expired ones are gone, not evicted"
    );
    assert_eq!(server.stats.evicted, 0);
    assert!(completes(
        &mut server,
        &mut legit,
        &h,
        &sf,
        &ex("new", None),
        later
    ));
    server.expire(later + Duration::from_secs(31));
    assert_eq!(server.pending(), 0);
}

/// The client-finals that panic inside rsasl 2.3.1 never reach it: each is a protocol
/// failure, the server keeps working, no panic was even caught.
#[test]
fn malformed_client_finals_fail_cleanly() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    for (n, bad) in ["", "c", "c=biws,", "c=biws,r=..,,p=..", "c=biws,r=..,p"]
        .iter()
        .enumerate()
    {
        for user in ["alice", "nobody"] {
            let client = ScramClient::new(user, b"x", None);
            let id = format!("m{n}{user}");
            let (h, _) = round1(&mut server, &client, &ex(&id, None), now);
            let err = server
                .step(
                    &round2(&h, bad.as_bytes().to_vec()),
                    &ex(&id, None),
                    &creds(),
                    now,
                )
                .unwrap_err();
            assert_eq!(err, AuthError::Failed(Failure::Protocol), "{bad:?}");
        }
    }
    assert_eq!(server.stats.internal_errors, 0);
    let mut client = ScramClient::new("alice", b"correct horse", None);
    let (h, sf) = round1(&mut server, &client, &ex("after", None), now);
    assert!(completes(
        &mut server,
        &mut client,
        &h,
        &sf,
        &ex("after", None),
        now
    ));
}

#[test]
fn plain_and_external() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let conn = tls(1);
    let plain = |pw: &[u8]| SaslParams {
        mech: Some("PLAIN".into()),
        c2s: Some([b"\0alice\0".as_slice(), pw].concat()),
        ..SaslParams::default()
    };
    assert!(matches!(
        server.step(
            &plain(b"correct horse"),
            &ex("c", Some(&conn)),
            &creds(),
            now
        ),
        Ok(Outcome::Success { .. })
    ));
    assert_eq!(
        server
            .step(&plain(b"nope"), &ex("c", Some(&conn)), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::BadCredentials)
    );
    assert_eq!(
        server
            .step(&plain(b"correct horse"), &ex("c", None), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::MechanismNotOffered),
        "PLAIN never over a plain transport"
    );
    let cert = TlsInfo {
        exporter: vec![1; 32],
        peer_identity: Some("alice".into()),
        ..Default::default()
    };
    let ext = SaslParams {
        mech: Some("EXTERNAL".into()),
        c2s: Some(vec![]),
        ..SaslParams::default()
    };
    let Outcome::Success { auth, .. } = server
        .step(&ext, &ex("c", Some(&cert)), &creds(), now)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(auth.identity(), "alice");
    assert_eq!(
        server
            .step(&ext, &ex("c", Some(&conn)), &creds(), now)
            .unwrap_err(),
        AuthError::Failed(Failure::MechanismNotOffered)
    );
}
