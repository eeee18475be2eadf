//! Whole datagrams through the sans-IO proxy core with SASL on, from outside and inside
//! sources, with time passing: no panic (caught or not), bounded tables.
//!
//! Building a core costs a store and a PBKDF2 run (about a millisecond), so one core serves
//! 1000 inputs before it is replaced: state carries over between those inputs, which finds
//! more (an input meets the tables earlier inputs left) at the price of exact replay. A
//! finding is replayed with its neighbours (`-runs` over the corpus) or alone, fresh.
#![no_main]

use std::cell::RefCell;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use gatehouse::core::Proxy;
use gatehouse_sip::flow::{Flow, Transport};
use gatehouse_fuzz::{proxy, source, start};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Datagram {
    source: u8,
    tcp: bool,
    advance_ms: u16,
    bytes: Vec<u8>,
}

thread_local! {
    static CORE: RefCell<Option<(Proxy, Instant, u32)>> = const { RefCell::new(None) };
}

fuzz_target!(|input: Vec<Datagram>| {
    CORE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(_, _, uses)| *uses >= 1000) {
            *slot = Some((proxy(), start(), 0));
        }
        let Some((proxy, now, uses)) = slot.as_mut() else {
            return;
        };
        *uses += 1;
        for d in input.into_iter().take(64) {
            *now += Duration::from_millis(d.advance_ms.into());
            proxy.handle_timeout(*now);
            let flow = Flow {
                transport: if d.tcp { Transport::Tcp } else { Transport::Udp },
                local: "192.0.2.1:5060".parse().expect("addr"),
                remote: source(d.source),
                conn: None,
            };
            proxy.handle_message(Bytes::from(d.bytes), flow, *now);
            let _ = proxy.take_writes();
            while proxy.poll_transmit().is_some() {}
            assert!(proxy.transactions() <= 2 * 64 + 16);
            assert!(proxy.pending_sasl() <= 16);
            // The authorisation invariant: every branch went where the clearance it was
            // relayed on names (a violation is refused and counted; debug builds also panic).
            assert_eq!(proxy.authorization_violations(), 0, "a branch no clearance names");
            proxy.maintain(*now);
        }
        assert_eq!(proxy.internal_errors(), 0, "a panic was caught");
    });
});
