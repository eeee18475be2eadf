//! Transaction matching keys (RFC 3261 sections 17.1.3 and 17.2.3).

use crate::values::MAGIC_COOKIE;
use crate::{Message, Method, Via};

/// Method component of a key: ACK matches the INVITE transaction, CANCEL has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyMethod {
    Invite,
    Cancel,
    Other,
}

impl KeyMethod {
    pub fn of(m: Method) -> Self {
        match m {
            Method::Invite | Method::Ack => KeyMethod::Invite,
            Method::Cancel => KeyMethod::Cancel,
            _ => KeyMethod::Other,
        }
    }

    fn of_text(m: &str) -> Self {
        KeyMethod::of(Method::from_wire(m.as_bytes()))
    }
}

/// Server transaction key: top Via branch and sent-by, and the method class. Requests whose
/// branch lacks the RFC 3261 magic cookie are keyed by their RFC 2543 identity instead.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerKey {
    pub branch: Box<str>,
    pub sent_by: Box<str>,
    pub method: KeyMethod,
}

impl ServerKey {
    pub fn of_request(msg: &Message) -> Option<ServerKey> {
        let method = KeyMethod::of(msg.method()?);
        let top = msg.top_via_value()?;
        let via = Via::parse(&top)?;
        let sent_by = match via.port {
            Some(p) => format!("{}:{p}", via.host.to_ascii_lowercase()),
            None => via.host.to_ascii_lowercase(),
        };
        let branch = match via.branch() {
            Some(b) if b.starts_with(MAGIC_COOKIE) => b.to_owned(),
            _ => {
                // RFC 2543 matching: Request-URI, tags, Call-ID, CSeq number, top Via.
                let to_tag = if msg.method() == Some(Method::Ack) {
                    String::new()
                } else {
                    msg.tag(crate::HeaderName::To).unwrap_or_default()
                };
                format!(
                    "2543|{}|{}|{}|{}|{}|{}",
                    msg.request_uri().unwrap_or_default(),
                    msg.tag(crate::HeaderName::From).unwrap_or_default(),
                    to_tag,
                    msg.call_id(),
                    msg.cseq().seq,
                    top
                )
            }
        };
        Some(ServerKey {
            branch: branch.into(),
            sent_by: sent_by.into(),
            method,
        })
    }
}

/// Client transaction key: the branch the proxy generated, and the CSeq method class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub branch: Box<str>,
    pub method: KeyMethod,
}

impl ClientKey {
    pub fn new(branch: &str, method: Method) -> Self {
        ClientKey {
            branch: branch.into(),
            method: KeyMethod::of(method),
        }
    }

    pub fn of_response(msg: &Message) -> Option<ClientKey> {
        let top = msg.top_via_value()?;
        let via = Via::parse(&top)?;
        Some(ClientKey {
            branch: via.branch()?.into(),
            method: KeyMethod::of_text(msg.cseq().method),
        })
    }
}
