//! Property tests of the SIP message layer (proptest): any message the generator writes —
//! IPv4, IPv6 and named hosts, compact and long header names in any case, folded values,
//! unknown methods and headers, any body — parses; serialising and parsing again gives the
//! same message; the proxy's edits are what a second parse sees, with a correct
//! Content-Length; and the parser never panics on mutated input.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use gatehouse_sip::{HeaderName, Limits, Message};
use proptest::prelude::*;

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]{0,11}"
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,2}",
        any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string()),
        any::<[u16; 8]>().prop_map(|s| format!("[{}]", std::net::Ipv6Addr::from(s))),
    ]
}

fn uri() -> impl Strategy<Value = String> {
    (
        prop::option::of("[a-z0-9]{1,8}"),
        host(),
        prop::option::of(1u16..),
    )
        .prop_map(|(user, host, port)| {
            let user = user.map(|u| format!("{u}@")).unwrap_or_default();
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("sip:{user}{host}{port}")
        })
}

/// A header name as a sender may write it: long or compact, any case.
fn name(long: &'static str, compact: &'static str) -> impl Strategy<Value = String> {
    (any::<bool>(), any::<bool>()).prop_map(move |(short, upper)| {
        let n = if short { compact } else { long };
        if upper {
            n.to_ascii_uppercase()
        } else {
            n.to_owned()
        }
    })
}

/// A value, possibly folded over two lines.
fn value() -> impl Strategy<Value = String> {
    ("[ -~&&[^\\r\\n]]{1,30}", any::<bool>()).prop_map(|(v, fold)| {
        let v = v.trim().to_owned();
        let v = if v.is_empty() { "x".to_owned() } else { v };
        if fold {
            format!("{v}\r\n  more")
        } else {
            v
        }
    })
}

#[derive(Debug, Clone)]
struct Req {
    text: String,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            Just("INVITE".to_owned()),
            Just("REGISTER".to_owned()),
            Just("OPTIONS".to_owned()),
            "[A-Z]{3,9}",
        ],
        uri(),
        host(),
        token(),
        name("Via", "v"),
        name("From", "f"),
        name("To", "t"),
        name("Call-ID", "i"),
        prop::collection::vec(("X-[A-Za-z]{1,8}", value()), 0..6),
        prop::collection::vec(any::<u8>(), 0..200),
        1u32..100_000,
    )
        .prop_map(
            |(method, ruri, via_host, tag, via, from, to, cid, extra, body, cseq)| {
                let method = if method == "ACK" || method == "CANCEL" {
                    "INVITE".to_owned()
                } else {
                    method
                };
                let mut text = format!(
                    "{method} {ruri} SIP/2.0\r\n{via}: SIP/2.0/UDP {via_host}:5060;branch=z9hG4bK{tag}\r\n\
{from}: <sip:a@example.com>;tag={tag}\r\n{to}: <{ruri}>\r\n{cid}: {tag}@example.com\r\n\
CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
                );
                for (n, v) in extra {
                    text.push_str(&format!("{n}: {v}\r\n"));
                }
                text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                Req { text, body }
            },
        )
}

fn bytes_of(r: &Req) -> Bytes {
    let mut b = r.text.clone().into_bytes();
    b.extend_from_slice(&r.body);
    Bytes::from(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_messages_parse_and_round_trip(r in request()) {
        let limits = Limits::default();
        let m = Message::parse(bytes_of(&r), &limits).unwrap();
        prop_assert_eq!(m.body(), &r.body[..]);
        let once = m.serialize();
        let again = Message::parse(once.clone(), &limits).unwrap();
        prop_assert_eq!(again.method_text(), m.method_text());
        prop_assert_eq!(again.request_uri(), m.request_uri());
        prop_assert_eq!(again.call_id(), m.call_id());
        prop_assert_eq!(again.body(), m.body());
        prop_assert_eq!(again.serialize(), once);
    }

    #[test]
    fn edits_are_what_a_second_parse_sees(r in request(), new_uri in uri(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let limits = Limits::default();
        let mut m = Message::parse(bytes_of(&r), &limits).unwrap();
        m.set_request_uri(&new_uri);
        m.insert(0, HeaderName::Via, "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKedit".into());
        if let Some(idx) = m.position_of(HeaderName::MaxForwards) {
            m.replace_value(idx, "69".into());
        }
        m.set_body(Bytes::from(body.clone()));
        let e = Message::parse(m.serialize(), &limits).unwrap();
        prop_assert_eq!(e.request_uri().unwrap(), new_uri.as_str());
        prop_assert_eq!(e.top_via_value().unwrap(), "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKedit");
        prop_assert_eq!(e.max_forwards(), Some(69));
        prop_assert_eq!(e.body(), &body[..]);
        prop_assert_eq!(e.call_id(), m.call_id());
    }

    #[test]
    fn mutated_messages_never_panic(r in request(), at in any::<prop::sample::Index>(), with in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut b = bytes_of(&r).to_vec();
        let i = at.index(b.len());
        b[i] = with;
        b.truncate(cut.index(b.len() + 1).max(1));
        let _ = Message::parse(Bytes::from(b), &Limits::default());
    }
}
