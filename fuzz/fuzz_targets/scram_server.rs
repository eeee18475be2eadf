//! SCRAM client messages through the whole `SaslServer` (rsasl behind the gateway's own
//! grammar): no input may panic, and no internal error may be caught.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use gatehouse_auth::scram::{ScramClient, Verifier};
use gatehouse_auth::{
    Credential, Exchange, Mechanism, Outcome, SaslParams, SaslServer, Secret, ServerSettings,
    TlsInfo,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Use a genuine client-first (so round 2 is reached) or the fuzzer's.
    genuine_first: bool,
    plus: bool,
    first: Vec<u8>,
    last: Vec<u8>,
    mech: u8,
}

fuzz_target!(|input: Input| {
    let now = Instant::now();
    let mut server = SaslServer::new(ServerSettings {
        realm: "org.example".into(),
        mechanisms: Mechanism::ALL.to_vec(),
        ttl: Duration::from_secs(30),
        max_pending: 8,
        max_pending_per_source: 4,
        iterations: 4096,
        secret: Secret::new([5; 32]),
        seed: Secret::new([6; 32]),
    });
    let mut creds = HashMap::new();
    creds.insert(
        "alice".to_owned(),
        Credential {
            username: "alice".into(),
            verifier: Verifier {
                salt: vec![1; 16],
                iterations: 4096,
                stored_key: [2; 32],
                server_key: [3; 32],
            },
            aors: vec!["sip:alice@partner.example".into()],
            mechanisms: None,
            enabled: true,
        },
    );
    let tls = TlsInfo {
        exporter: vec![9; 32],
        peer_identity: Some("alice".into()),
        ..Default::default()
    };
    let ex = Exchange {
        call_id: "c",
        from_tag: "t",
        source: "192.0.2.1".parse().expect("ip"),
        tls: input.plus.then_some(&tls),
    };
    let mech = Mechanism::ALL[input.mech as usize % Mechanism::ALL.len()];
    let first = if input.genuine_first {
        let cb = (mech == Mechanism::ScramSha256Plus).then(|| vec![9; 32]);
        ScramClient::new("alice", b"pw", cb).client_first()
    } else {
        input.first.clone()
    };
    let round1 = SaslParams {
        realm: Some("org.example".into()),
        mech: Some(mech.name().into()),
        c2s: Some(first),
        ..SaslParams::default()
    };
    let Ok(Outcome::Challenge(c)) = server.step(&round1, &ex, &creds, now) else {
        return;
    };
    let round2 = SaslParams {
        realm: Some("org.example".into()),
        s2s: c.s2s,
        c2s: Some(input.last),
        ..SaslParams::default()
    };
    let _ = server.step(&round2, &ex, &creds, now);
    assert_eq!(server.stats.internal_errors, 0, "rsasl panicked on an input we let through");
});
