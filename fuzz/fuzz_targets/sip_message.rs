//! The SIP parser and serialiser: no panic on any input, and a parsed message survives
//! serialisation, edits and a second parse (round-trip invariant).
#![no_main]

use bytes::Bytes;
use gatehouse_sip::{HeaderName, Limits, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(mut msg) = Message::parse(Bytes::copy_from_slice(data), &limits) else {
        return;
    };
    // Serialising writes a Content-Length if the message had none, and the proxy's edits add
    // its Via and Record-Route: a message it sends may exceed the input limits by exactly
    // those fields (findings 2026-11-29, fuzz/regressions/sip_message/).
    let own_fields = Limits {
        max_headers: limits.max_headers + 3,
        max_message_bytes: limits.max_message_bytes + 256,
    };
    let once = msg.serialize();
    let again = Message::parse(once.clone(), &own_fields).expect("a serialised message parses");
    assert_eq!(again.is_request(), msg.is_request());
    assert_eq!(again.method(), msg.method());
    assert_eq!(again.status(), msg.status());
    assert_eq!(again.body(), msg.body());
    assert_eq!(again.serialize(), once, "serialisation is idempotent");
    // The edits the proxy makes on every forwarded request.
    if msg.is_request() {
        msg.set_request_uri("sip:vpn@[2001:db8::20]:5060");
    }
    msg.insert(0, HeaderName::Via, "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKfuzz".into());
    msg.insert(1, HeaderName::RecordRoute, "<sip:192.0.2.1;lr>".into());
    if let Some(idx) = msg.position_of(HeaderName::MaxForwards) {
        msg.replace_value(idx, "69".into());
    }
    msg.set_body(Bytes::from_static(b"v=0\r\n"));
    let edited = msg.serialize();
    let reparsed = Message::parse(edited, &own_fields).expect("an edited message parses");
    assert_eq!(reparsed.body(), b"v=0\r\n");
});
