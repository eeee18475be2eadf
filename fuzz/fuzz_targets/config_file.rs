//! The configuration loader: any text is either a configuration or an error naming a line
//! and key. Loading never touches the network (route targets named by host stay names), so
//! inputs with routes are explored too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = gatehouse::config::Config::parse(text, "fuzz") {
        assert!(e.line <= text.lines().count() + 1);
    }
});
