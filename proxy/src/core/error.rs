//! The one mapping from "why a request is refused" to the SIP response that says so.
//! Every refusal in the pipeline is a [`Reject`]; nothing else builds error responses.

use gatehouse_auth::HeaderError;

use super::auth::Challenger;
use crate::sip::ParseError;

/// Who is at fault, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The sender of the request (4xx).
    Caller,
    /// The next hop or the network (5xx, 408).
    NextHop,
    /// This gateway (overload, shutting down, internal error).
    Gateway,
}

/// Why a body is refused with 415.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MediaFault {
    /// Content-Encoding other than identity, or a multipart part with a transfer encoding.
    #[error("encoded body")]
    Encoding,
    /// A body that mentions vnd.wireguard under another Content-Type.
    #[error("WireGuard offer not labelled application/sdp")]
    WireGuardNotSdp,
    /// multipart/* without a policy rule that allows it.
    #[error("multipart body")]
    Multipart,
}

/// A refusal of a request, mapped to exactly one response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("malformed request: {0}")]
    Malformed(ParseError),
    #[error("Max-Forwards reached zero")]
    TooManyHops,
    #[error("request loops through this gateway")]
    Loop,
    #[error("unsupported Request-URI scheme")]
    UnsupportedScheme,
    #[error("unsupported Proxy-Require option tags: {0}")]
    BadExtension(String),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("no route to the Request-URI")]
    NotFound,
    #[error("in-dialog request for no dialog of this gateway")]
    NoDialog,
    #[error("request cancelled before any branch")]
    Terminated,
    #[error("request from a balancer whose client Via names no address")]
    NoClientVia,
    #[error("method not supported by the gateway itself")]
    NotImplemented,
    #[error("transaction table full")]
    Overloaded,
    #[error("gateway shutting down")]
    ShuttingDown,
    #[error("next hop did not answer")]
    Timeout,
    #[error("next hop unreachable")]
    Unreachable,
    #[error("next hop not found in DNS")]
    Unresolvable,
    #[error("authentication required (challenge)")]
    Challenge {
        challenger: Challenger,
        value: String,
    },
    #[error("malformed SASL credentials: {0}")]
    AuthMalformed(HeaderError),
    #[error("authentication failed")]
    AuthFailed,
    #[error("the authenticated identity may not use this address")]
    IdentityNotAllowed,
    #[error("no binding for the AOR")]
    TemporarilyUnavailable,
    #[error("registration interval too brief")]
    IntervalTooBrief(u32),
    #[error("unacceptable WireGuard offer: {0}")]
    BadOffer(crate::tunnel::sdp::SdpError),
    #[error("denied by policy: {0}")]
    PolicyDenied(gatehouse_policy::Denied),
    #[error("the inward hop is neither TLS nor an internal network")]
    InsecureInternalHop,
    #[error("unsupported body: {0}")]
    UnsupportedMedia(MediaFault),
    /// A bug caught at a boundary (a panic while handling the request): 500, counted.
    #[error("internal error")]
    Internal,
}

impl Reject {
    /// Status code, reason phrase and extra headers of the response.
    pub fn response(&self) -> (u16, &'static str, Vec<(&'static str, String)>) {
        match self {
            Reject::Malformed(ParseError::Version) => (505, "Version Not Supported", vec![]),
            Reject::Malformed(e) => (400, e.reason_phrase(), vec![]),
            Reject::TooManyHops => (483, "Too Many Hops", vec![]),
            Reject::Loop => (482, "Loop Detected", vec![]),
            Reject::UnsupportedScheme => (416, "Unsupported URI Scheme", vec![]),
            Reject::BadExtension(tags) => {
                (420, "Bad Extension", vec![("Unsupported", tags.clone())])
            }
            Reject::Forbidden(why) => (403, why, vec![]),
            Reject::NotFound => (404, "Not Found", vec![]),
            Reject::NoDialog => (481, "Call/Transaction Does Not Exist", vec![]),
            Reject::NoClientVia => (400, "Missing Client Via From Balancer", vec![]),
            Reject::Terminated => (487, "Request Terminated", vec![]),
            Reject::NotImplemented => (501, "Not Implemented", vec![]),
            Reject::Overloaded => (
                503,
                "Service Unavailable (overloaded)",
                vec![("Retry-After", "5".into())],
            ),
            Reject::ShuttingDown => (
                503,
                "Service Unavailable (shutting down)",
                vec![("Retry-After", "10".into())],
            ),
            Reject::Timeout => (408, "Request Timeout", vec![]),
            Reject::Unreachable => (503, "Service Unavailable (next hop unreachable)", vec![]),
            Reject::Unresolvable => (
                503,
                "Service Unavailable (next hop not found in DNS)",
                vec![],
            ),
            Reject::Challenge { challenger, value } => {
                let reason = match challenger {
                    Challenger::Proxy => "Proxy Authentication Required",
                    Challenger::Registrar => "Unauthorized",
                };
                (
                    challenger.status(),
                    reason,
                    vec![(challenger.challenge_header(), value.clone())],
                )
            }
            Reject::AuthMalformed(e) => (400, e.reason_phrase(), vec![]),
            Reject::AuthFailed => (403, "Forbidden", vec![]),
            Reject::IdentityNotAllowed => {
                (403, "Forbidden (identity may not use this address)", vec![])
            }
            Reject::TemporarilyUnavailable => (480, "Temporarily Unavailable", vec![]),
            Reject::IntervalTooBrief(min) => (
                423,
                "Interval Too Brief",
                vec![("Min-Expires", min.to_string())],
            ),
            Reject::BadOffer(e) => (
                488,
                "Not Acceptable Here",
                vec![("Warning", format!("399 gatehouse \"{e}\""))],
            ),
            Reject::PolicyDenied(d) => (
                403,
                "Forbidden",
                vec![("Warning", format!("399 gatehouse \"policy: {d}\""))],
            ),
            Reject::UnsupportedMedia(MediaFault::Encoding) => (
                415,
                "Unsupported Media Type (encoded body)",
                vec![("Accept-Encoding", "identity".into())],
            ),
            Reject::UnsupportedMedia(MediaFault::WireGuardNotSdp) => (
                415,
                "Unsupported Media Type (WireGuard offer must be application/sdp)",
                vec![("Accept", "application/sdp".into())],
            ),
            Reject::UnsupportedMedia(MediaFault::Multipart) => (
                415,
                "Unsupported Media Type (multipart body not allowed)",
                vec![("Accept", "application/sdp".into())],
            ),
            Reject::InsecureInternalHop | Reject::Internal => {
                (500, "Server Internal Error", vec![])
            }
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Reject::Timeout | Reject::Unreachable | Reject::Unresolvable => Fault::NextHop,
            Reject::Overloaded
            | Reject::ShuttingDown
            | Reject::InsecureInternalHop
            | Reject::Internal => Fault::Gateway,
            _ => Fault::Caller,
        }
    }
}
