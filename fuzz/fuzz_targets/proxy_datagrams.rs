//! Whole datagrams through the sans-IO proxy core with SASL on, from outside and inside
//! sources, with time passing: no panic (caught or not), bounded tables.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use gatehouse::flow::{Flow, Transport};
use gatehouse_fuzz::{proxy, source, start};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Datagram {
    source: u8,
    tcp: bool,
    advance_ms: u16,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Vec<Datagram>| {
    let mut proxy = proxy();
    let mut now = start();
    for d in input.into_iter().take(64) {
        now += Duration::from_millis(d.advance_ms.into());
        proxy.handle_timeout(now);
        let flow = Flow {
            transport: if d.tcp { Transport::Tcp } else { Transport::Udp },
            local: "192.0.2.1:5060".parse().expect("addr"),
            remote: source(d.source),
            conn: None,
        };
        proxy.handle_message(Bytes::from(d.bytes), flow, now);
        while proxy.poll_transmit().is_some() {}
        assert!(proxy.transactions() <= 2 * 64 + 16);
        assert!(proxy.pending_sasl() <= 16);
    }
    assert_eq!(proxy.internal_errors(), 0, "a panic was caught");
});
