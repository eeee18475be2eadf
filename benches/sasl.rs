//! CPU cost of one full SCRAM-SHA-256 exchange on the gateway side (both server steps and
//! the ClientKey recovery); the client's PBKDF2 work is excluded from the measurement.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use gatehouse_auth::scram::{ScramClient, Verifier};
use gatehouse_auth::{
    Credential, Exchange, Mechanism, Outcome, SaslParams, SaslServer, Secret, ServerSettings,
};

/// The credentials (alice) and the SASL server both benches run against.
fn alice_and_server() -> (HashMap<String, Credential>, SaslServer) {
    let mut creds = HashMap::new();
    creds.insert(
        "alice".to_owned(),
        Credential {
            username: "alice".into(),
            verifier: Verifier::derive(b"secret", b"saltsaltsaltsalt".to_vec(), 4096),
            aors: vec!["sip:alice@partner.example".into()],
            mechanisms: None,
            enabled: true,
        },
    );
    let server = SaslServer::new(ServerSettings {
        realm: "org.example".into(),
        mechanisms: vec![Mechanism::ScramSha256],
        ttl: Duration::from_secs(30),
        max_pending: 1 << 20,
        max_pending_per_source: 1 << 20,
        iterations: 4096,
        secret: Secret::new([1; 32]),
        seed: Secret::new([2; 32]),
    });
    (creds, server)
}

fn exchange(c: &mut Criterion) {
    let (creds, mut server) = alice_and_server();
    let source: IpAddr = "192.0.2.1".parse().unwrap();
    c.bench_function("gateway side of one SCRAM-SHA-256 exchange", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for n in 0..iters {
                let call = format!("c{n}");
                let ex = Exchange {
                    call_id: &call,
                    from_tag: "t",
                    source,
                    tls: None,
                };
                let mut client = ScramClient::new("alice", b"secret", None);
                let p1 = SaslParams {
                    mech: Some("SCRAM-SHA-256".into()),
                    c2s: Some(client.client_first()),
                    ..SaslParams::default()
                };
                let t = Instant::now();
                let Outcome::Challenge(ch) = server.step(&p1, &ex, &creds, Instant::now()).unwrap()
                else {
                    panic!()
                };
                spent += t.elapsed();
                let cf = client.client_final(ch.s2c.as_deref().unwrap()).unwrap();
                let p2 = SaslParams {
                    s2s: ch.s2s,
                    c2s: Some(cf),
                    ..SaslParams::default()
                };
                let t = Instant::now();
                let out = server.step(&p2, &ex, &creds, Instant::now()).unwrap();
                spent += t.elapsed();
                assert!(matches!(out, Outcome::Success { .. }));
            }
            spent
        })
    });
}

/// The first server step for a known and for an unknown user: the two must cost the same
/// (issue 18, item 10: 141 vs 135 µs on the wire before the fake verifier was derived for
/// both), or their timing tells which users exist.
fn known_and_unknown_users(c: &mut Criterion) {
    let (creds, mut server) = alice_and_server();
    let source: IpAddr = "192.0.2.1".parse().unwrap();
    for user in ["alice", "mallory"] {
        let first = SaslParams {
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(ScramClient::new(user, b"secret", None).client_first()),
            ..SaslParams::default()
        };
        let mut n = 0u64;
        c.bench_function(
            &format!(
                "SCRAM client-first of a {} user",
                if user == "alice" { "known" } else { "unknown" }
            ),
            |b| {
                b.iter(|| {
                    n += 1;
                    let call = format!("c{n}");
                    let ex = Exchange {
                        call_id: &call,
                        from_tag: "t",
                        source,
                        tls: None,
                    };
                    server.step(&first, &ex, &creds, Instant::now()).unwrap()
                })
            },
        );
    }
}

/// Realm crossover (docs/realm-crossover.md): the home's work for one relayed exchange (HPKE
/// open, facts compared, both SCRAM steps in its SASL server, key derived, both answers
/// sealed), and the caller's (HPKE seal, SCRAM client with a cached SaltedPassword, opening
/// and checking the home's statement, key derived) — beside the local SCRAM exchange above.
fn crossover(c: &mut Criterion) {
    use gatehouse_auth::xover::{
        derive_key, Facts, HomeKey, HomeKeys, HomeOutcome, Relayed, XoverClient, XoverHome,
        MECHANISM,
    };
    let (mut creds, server) = alice_and_server();
    let bob = creds.get("alice").cloned().unwrap();
    creds.insert(
        "bob".into(),
        Credential {
            username: "bob".into(),
            aors: vec!["sip:bob@partner.example".into()],
            ..bob
        },
    );
    let keys = || HomeKeys {
        realm: "partner.example".into(),
        keys: vec![HomeKey::from_private(&[9; 32]).unwrap()],
    };
    let public = *HomeKey::from_private(&[9; 32]).unwrap().public();
    let _ = server;
    let mut home = XoverHome::new(
        keys(),
        SaslServer::new(ServerSettings {
            realm: "partner.example".into(),
            mechanisms: vec![Mechanism::ScramSha256],
            ttl: Duration::from_secs(30),
            max_pending: 1 << 20,
            max_pending_per_source: 1 << 20,
            iterations: 4096,
            secret: Secret::new([1; 32]),
            seed: Secret::new([2; 32]),
        }),
        1 << 20,
        Duration::from_secs(30),
    );
    let source: IpAddr = "192.0.2.1".parse().unwrap();
    let domains = vec!["org.example".to_owned()];
    let facts = |n: u64| Facts {
        foreign_domain: "org.example".into(),
        call_id: format!("c{n}"),
        from_tag: "t".into(),
        from_aor: "sip:bob@partner.example".into(),
        channel_binding: vec![3; 32],
        offer_pubkey: vec![4; 32],
        offer_prefix: "2001:db8:b0b::/64".into(),
    };
    let unlocked = |_: &str| false;
    let mut spent_client = Duration::ZERO;
    let mut rounds = 0u64;
    c.bench_function("home side of one crossover exchange", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for n in 0..iters {
                let f = facts(n);
                let t = Instant::now();
                let (mut client, c1) = XoverClient::start(
                    &public,
                    "bob@partner.example",
                    b"secret",
                    f.clone(),
                    [n as u8; 32],
                    None,
                )
                .unwrap();
                spent_client += t.elapsed();
                let rel = Relayed {
                    facts: &f,
                    domains: &domains,
                    source,
                };
                let first = SaslParams {
                    realm: Some("partner.example".into()),
                    mech: Some(MECHANISM.into()),
                    c2s: Some(c1),
                    ..SaslParams::default()
                };
                let t = Instant::now();
                let Ok(HomeOutcome::Challenge { handle, token }) =
                    home.step(&first, &rel, &creds, &unlocked, Instant::now())
                else {
                    panic!()
                };
                spent += t.elapsed();
                let c2 = client.step(&token).unwrap();
                let next = SaslParams {
                    realm: Some("partner.example".into()),
                    s2s: Some(handle),
                    c2s: Some(c2),
                    ..SaslParams::default()
                };
                let t = Instant::now();
                let Ok(HomeOutcome::Success { token, .. }) =
                    home.step(&next, &rel, &creds, &unlocked, Instant::now())
                else {
                    panic!()
                };
                spent += t.elapsed();
                let t = Instant::now();
                let ok = client.finish(&token).unwrap();
                let _ = derive_key(&ok.transcript, &f);
                spent_client += t.elapsed();
                rounds += 1;
            }
            spent
        })
    });
    if rounds > 0 {
        eprintln!(
            "caller side of one crossover exchange beyond SCRAM (HPKE set-up and seal, the \
             home's statement opened and checked, key derived; the SCRAM client step with its \
             PBKDF2 not counted): {:.1} µs per exchange over {rounds}",
            spent_client.as_secs_f64() * 1e6 / rounds as f64
        );
    }
}

criterion_group!(benches, exchange, known_and_unknown_users, crossover);
criterion_main!(benches);
