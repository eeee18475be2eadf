//! The JSON of the crossover relay (docs/realm-crossover.md): the facts a foreign gateway
//! reports and the home's statement. Parsing never panics, stays within its bounds, and what
//! parses writes back to the same facts.
#![no_main]

use gatehouse::crossover::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((facts, client)) = wire::parse_facts(data) {
        assert!(facts.check().is_ok());
        let again =
            wire::parse_facts(wire::facts_json(&facts, client).as_bytes()).expect("round trip");
        assert_eq!(again, (facts, client));
    }
    if let Ok(st) = wire::parse_statement(data) {
        assert!(st.identity.len() <= 512 && st.released_to.len() <= 253);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gatehouse::crossover::relay::parse_info(text);
    }
});
