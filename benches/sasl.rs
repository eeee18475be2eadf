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

criterion_group!(benches, exchange, known_and_unknown_users);
criterion_main!(benches);
