//! The configuration loader: any text is either a configuration or an error naming a line
//! and key. Parsed as `check-config` does, without resolving route targets' names (the
//! fuzzer must not query DNS), so inputs with routes are explored too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) =
        gatehouse::config::Config::parse_with(text, "fuzz", None, gatehouse::config::Resolve::Never)
    {
        assert!(e.line <= text.lines().count() + 1);
    }
});
