//! `gatehouse-sip`: the sans-IO SIP layers shared by the gateway and `wgsip`.
//!
//! - the message layer: lazy byte-preserving parsing ([`Message`]), typed views of the headers
//!   a proxy interprets ([`values`], [`uri`]), edits applied at serialisation, stream framing
//!   ([`framer`]), and building the responses a SIP element generates itself;
//! - [`transaction`]: the RFC 3261 section 17 transaction machines and their timers;
//! - [`flow`]: transports, flows and destinations (where a message came from, where it goes);
//! - [`locate`]: RFC 3263 server location (which DNS questions, the order of the answers);
//! - [`wireguard`]: the WireGuard SDP codec (`m=application ... vnd.wireguard`, its fmtp).
//!
//! Nothing here does I/O: no sockets, no clock reads, no global randomness (`now` and every
//! random value are arguments). `sip/clippy.toml` enforces it.

pub mod error;
pub mod flow;
pub mod framer;
pub mod header;
pub mod locate;
pub mod message;
pub mod transaction;
pub mod uri;
pub mod values;
pub mod wireguard;

use bytes::{BufMut, Bytes, BytesMut};

pub use error::ParseError;
pub use header::HeaderName;
pub use message::{Limits, Message, Method};
pub use uri::{Scheme, Uri};
pub use values::{CSeq, NameAddr, Via};

/// Builds a response to `req` as RFC 3261 section 8.2.6.2 prescribes: Via (all values, as
/// received and annotated), From, To (with `to_tag` added when the request had none and the
/// status is above 100), Call-ID and CSeq copied; `extra` headers appended; no body.
pub fn build_response(
    req: &Message,
    code: u16,
    reason: &str,
    to_tag: Option<&str>,
    extra: &[(&str, &str)],
) -> Bytes {
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(b"SIP/2.0 ");
    out.put_slice(code.to_string().as_bytes());
    out.put_u8(b' ');
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    for (idx, h) in req.headers() {
        let name = h.name;
        if !matches!(
            name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
        ) {
            continue;
        }
        out.put_slice(name.canonical().as_bytes());
        out.put_slice(b": ");
        let value = req.value(idx);
        out.put_slice(value.as_bytes());
        if name == HeaderName::To && code > 100 {
            if let Some(tag) = to_tag {
                if NameAddr::parse(&value).and_then(|n| n.tag()).is_none() {
                    out.put_slice(b";tag=");
                    out.put_slice(tag.as_bytes());
                }
            }
        }
        out.put_slice(b"\r\n");
    }
    for (name, value) in extra {
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Server: Gatehouse\r\nContent-Length: 0\r\n\r\n");
    out.freeze()
}
