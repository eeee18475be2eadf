//! The configuration loader: any text is either a configuration or an error naming a line
//! and key. Inputs with routes are skipped: route targets with names are resolved at load
//! time, and the fuzzer must not query DNS.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("route") {
        return;
    }
    if let Err(e) = gatehouse::config::Config::parse(text, "fuzz") {
        assert!(e.line <= text.lines().count() + 1);
    }
});
