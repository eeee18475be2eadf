//! The policy file parser: any text is either a policy or an error with a line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = gatehouse_policy::Policy::parse(text, "fuzz") {
        assert!(e.line <= text.lines().count() + 1);
    }
});
