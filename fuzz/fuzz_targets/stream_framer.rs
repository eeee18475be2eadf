//! The TCP/TLS stream framer: any byte stream, cut at any points, gives frames no longer
//! than the limit, and never panics.
#![no_main]

use gatehouse_sip::framer::{Frame, StreamFramer};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, cuts) = input;
    let mut framer = StreamFramer::new(MAX);
    let mut at = 0;
    let mut cuts = cuts.into_iter().map(|c| 1 + c as usize);
    while at < data.len() {
        let n = cuts.next().unwrap_or(data.len()).min(data.len() - at);
        framer.buffer().extend_from_slice(&data[at..at + n]);
        at += n;
        loop {
            match framer.next_frame() {
                Ok(Some(Frame::Message(m))) => assert!(m.len() <= MAX),
                Ok(Some(Frame::Ping)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(framer.pending() <= MAX + n.max(1) + 4096);
    }
});
