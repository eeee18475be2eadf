//! The SASL server against the crate's independent SCRAM client.

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
    assert_eq!(auth.mechanism(), Mechanism::ScramSha256Plus);
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

#[test]
fn pending_exchanges_are_capped_per_source_and_globally() {
    let now = Instant::now();
    let mut server = SaslServer::new(settings());
    let client = ScramClient::new("alice", b"correct horse", None);
    round1(&mut server, &client, &ex("p1", None), now);
    round1(&mut server, &client, &ex("p2", None), now);
    assert_eq!(
        server
            .step(&first(&client), &ex("p3", None), &creds(), now)
            .unwrap_err(),
        AuthError::Overloaded
    );
    let mut other = ex("p4", None);
    other.source = "192.0.2.10".parse().unwrap();
    round1(&mut server, &client, &other, now);
    other.call_id = "p5";
    round1(&mut server, &client, &other, now);
    let mut third = ex("p6", None);
    third.source = "192.0.2.11".parse().unwrap();
    assert_eq!(
        server
            .step(&first(&client), &third, &creds(), now)
            .unwrap_err(),
        AuthError::Overloaded
    );
    // Expired exchanges free their places.
    server.expire(now + Duration::from_secs(31));
    assert_eq!(server.pending(), 0);
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
