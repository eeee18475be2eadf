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
    let mut w = ResponseWriter::new(code, reason, to_tag);
    for (idx, h) in req.headers() {
        if ResponseWriter::copies(h.name) {
            w.copy(h.name, req.value(idx).as_bytes());
        }
    }
    w.finish(extra)
}

/// The one writer of the gateway's own responses (RFC 3261 section 8.2.6.2): the status line,
/// the request's Via, From, To, Call-ID and CSeq lines fed to [`ResponseWriter::copy`] in their
/// order (To given `to_tag` when it has none and the status is above 100), extra headers, and
/// `Server` with an empty body. [`build_response`] feeds it a parsed request; a request that
/// could not be parsed feeds it its raw lines (the core's 400s).
#[derive(Debug)]
pub struct ResponseWriter<'t> {
    out: BytesMut,
    code: u16,
    to_tag: Option<&'t str>,
    has_via: bool,
}

impl<'t> ResponseWriter<'t> {
    /// Starts a response with its status line.
    pub fn new(code: u16, reason: &str, to_tag: Option<&'t str>) -> Self {
        let mut out = BytesMut::with_capacity(512);
        out.put_slice(b"SIP/2.0 ");
        out.put_slice(code.to_string().as_bytes());
        out.put_u8(b' ');
        out.put_slice(reason.as_bytes());
        out.put_slice(b"\r\n");
        ResponseWriter {
            out,
            code,
            to_tag,
            has_via: false,
        }
    }

    /// Whether a request header is copied into responses (Via, From, To, Call-ID, CSeq).
    pub fn copies(name: HeaderName) -> bool {
        matches!(
            name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
        )
    }

    /// Copies one header line of the request (ignored unless [`ResponseWriter::copies`] it).
    pub fn copy(&mut self, name: HeaderName, value: &[u8]) {
        if !Self::copies(name) {
            return;
        }
        self.has_via |= name == HeaderName::Via;
        self.out.put_slice(name.canonical().as_bytes());
        self.out.put_slice(b": ");
        self.out.put_slice(value);
        if name == HeaderName::To && self.code > 100 {
            if let Some(tag) = self.to_tag {
                if !has_tag(value) {
                    self.out.put_slice(b";tag=");
                    self.out.put_slice(tag.as_bytes());
                }
            }
        }
        self.out.put_slice(b"\r\n");
    }

    /// Whether a Via was copied: a response without one has nowhere to go.
    pub fn has_via(&self) -> bool {
        self.has_via
    }

    /// Appends `extra` headers, `Server` and an empty body.
    pub fn finish(mut self, extra: &[(&str, &str)]) -> Bytes {
        for (name, value) in extra {
            self.out.put_slice(name.as_bytes());
            self.out.put_slice(b": ");
            self.out.put_slice(value.as_bytes());
            self.out.put_slice(b"\r\n");
        }
        self.out
            .put_slice(b"Server: Gatehouse\r\nContent-Length: 0\r\n\r\n");
        self.out.freeze()
    }
}

/// Whether a To value carries a tag: its name-addr's `tag` parameter when it parses, else (the
/// raw lines of a request that did not parse) any `;tag=` in it.
fn has_tag(value: &[u8]) -> bool {
    match std::str::from_utf8(value).ok().and_then(NameAddr::parse) {
        Some(n) => n.tag().is_some(),
        None => value.windows(5).any(|w| w.eq_ignore_ascii_case(b";tag=")),
    }
}

#[cfg(test)]
mod response_tests {
    use super::*;

    const REQ: &str = "INVITE sip:vpn@org.example SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
        v: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:alice@partner.example>;tag=a\r\n\
        To: <sip:vpn@org.example>\r\n\
        Call-ID: c1\r\n\
        CSeq: 1 INVITE\r\n\
        Content-Length: 0\r\n\r\n";

    /// The raw lines of REQ as the core feeds them for a request that did not parse.
    fn raw(text: &str, code: u16, tag: &str) -> Option<Bytes> {
        let mut w = ResponseWriter::new(code, "Bad Request", Some(tag));
        for line in text.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').expect("a header line");
            w.copy(
                HeaderName::from_wire(name.trim().as_bytes()),
                value.trim().as_bytes(),
            );
        }
        w.has_via().then(|| w.finish(&[]))
    }

    /// One writer, two feeds: a parsed request and its raw lines give the same response.
    #[test]
    fn parsed_and_raw_requests_get_the_same_response() {
        let msg =
            Message::parse(Bytes::from_static(REQ.as_bytes()), &Limits::default()).expect("parses");
        let parsed = build_response(&msg, 400, "Bad Request", Some("gh1"), &[]);
        let raw = raw(REQ, 400, "gh1").expect("has a Via");
        assert_eq!(parsed, raw);
        let text = std::str::from_utf8(&parsed).expect("utf-8");
        assert_eq!(
            text,
            "SIP/2.0 400 Bad Request\r\n\
             Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
             Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2\r\n\
             From: <sip:alice@partner.example>;tag=a\r\n\
             To: <sip:vpn@org.example>;tag=gh1\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 INVITE\r\n\
             Server: Gatehouse\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn a_tag_is_added_only_to_a_final_response_without_one() {
        let tagged = REQ.replace(
            "To: <sip:vpn@org.example>",
            "To: <sip:vpn@org.example>;tag=b",
        );
        let out = raw(&tagged, 481, "gh1").expect("has a Via");
        assert!(std::str::from_utf8(&out)
            .expect("utf-8")
            .contains("\r\nTo: <sip:vpn@org.example>;tag=b\r\n"));
        let msg =
            Message::parse(Bytes::from_static(REQ.as_bytes()), &Limits::default()).expect("parses");
        let trying = build_response(&msg, 100, "Trying", Some("gh1"), &[]);
        assert!(std::str::from_utf8(&trying)
            .expect("utf-8")
            .contains("\r\nTo: <sip:vpn@org.example>\r\n"));
        // A tag inside the URI is not the To tag.
        let in_uri = REQ.replace(
            "To: <sip:vpn@org.example>",
            "To: <sip:vpn@org.example;tag=u>",
        );
        let out = raw(&in_uri, 400, "gh1").expect("has a Via");
        assert!(std::str::from_utf8(&out)
            .expect("utf-8")
            .contains("\r\nTo: <sip:vpn@org.example;tag=u>;tag=gh1\r\n"));
    }

    #[test]
    fn a_request_without_via_gets_no_response() {
        let no_via: String = REQ
            .split_inclusive("\r\n")
            .filter(|l| !l.starts_with("Via:") && !l.starts_with("v:"))
            .collect();
        assert!(raw(&no_via, 400, "gh1").is_none());
    }
}
