//! The WireGuard SDP validator and rewriter: no panic; a valid offer survives the gateway's
//! edits and parses again; `strip_psk` leaves no psk and is idempotent.
#![no_main]

use gatehouse_sip::wireguard::{strip_psk, WgSdp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(clean) = strip_psk(data) {
        assert_eq!(strip_psk(&clean), None, "stripping is complete in one pass");
    }
    let Ok(Some(mut sdp)) = WgSdp::parse(data) else {
        return;
    };
    sdp.set_param("pskmth", Some("gateway"));
    sdp.set_param("psk", Some("YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M="));
    sdp.set_endpoint("[2001:db8::10]:51820".parse().expect("addr"));
    let out = sdp.to_bytes();
    let again = WgSdp::parse(&out).expect("the edited offer parses");
    assert!(again.is_some());
    let stripped = strip_psk(&out).expect("the psk is found");
    let clean = WgSdp::parse(&stripped)
        .expect("a stripped offer parses")
        .expect("and is still an offer");
    assert_eq!(clean.param("psk"), None, "no psk parameter survives");
});
