//! The SASL header codec: parse never panics, and what parses emits a value that parses to
//! the same parameters.
#![no_main]

use gatehouse_auth::SaslParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(params) = SaslParams::parse(text) else {
        return;
    };
    let emitted = params.emit();
    let again = SaslParams::parse(&emitted).expect("an emitted header parses");
    assert_eq!(again, params);
});
