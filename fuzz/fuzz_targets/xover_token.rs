//! Realm crossover tokens (docs/realm-crossover.md): framing never panics, a first token
//! opens only under the home's key (never with bytes an attacker chose), and what the home
//! opens has bounded facts.
#![no_main]

use gatehouse_auth::xover::{HomeKey, HomeKeys, Token, FIELD_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = Token::parse(data) else {
        return;
    };
    if let Some(realm) = token.realm() {
        assert!(gatehouse_auth::xover::valid_realm(realm));
    }
    let keys = HomeKeys {
        realm: "partner.example".into(),
        keys: vec![HomeKey::from_private(&[1; 32]).expect("a fixed key")],
    };
    if let Ok(opened) = keys.open_first(data) {
        assert!(opened.facts.call_id.len() <= FIELD_MAX);
        assert!(opened.scram_client_first.starts_with(b"n,,"));
    }
});
