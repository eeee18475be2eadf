//! Parse errors. Each variant knows the reason phrase of the 400 it becomes, so that a
//! sender of a malformed request learns precisely what was wrong.

use super::header::HeaderName;

/// Why a message could not be parsed or interpreted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    #[error("empty message")]
    Empty,
    #[error("malformed start line")]
    StartLine,
    #[error("unsupported SIP version")]
    Version,
    #[error("malformed status code")]
    StatusCode,
    #[error("malformed method")]
    Method,
    #[error("malformed Request-URI")]
    RequestUri,
    #[error("malformed header line")]
    HeaderLine,
    #[error("header section not terminated")]
    Unterminated,
    #[error("missing {0:?} header")]
    Missing(HeaderName),
    #[error("malformed {0:?} header")]
    Malformed(HeaderName),
    #[error("more than one {0:?} header")]
    Duplicate(HeaderName),
    #[error("Content-Length larger than the message body")]
    BodyTruncated,
    #[error("CSeq method does not match the request method")]
    CSeqMethod,
    #[error("header is not valid UTF-8")]
    Encoding,
}

impl ParseError {
    /// Reason phrase for the 400 response (RFC 3261 section 21.4.1 lets the phrase carry the detail).
    pub fn reason_phrase(&self) -> &'static str {
        use HeaderName::*;
        match self {
            ParseError::TooLarge { .. } => "Bad Request (message too large)",
            ParseError::TooManyHeaders { .. } => "Bad Request (too many headers)",
            ParseError::Empty => "Bad Request (empty message)",
            ParseError::StartLine => "Bad Request (malformed request line)",
            ParseError::Version => "Bad Request (unsupported SIP version)",
            ParseError::StatusCode => "Bad Request (malformed status code)",
            ParseError::Method => "Bad Request (malformed method)",
            ParseError::RequestUri => "Bad Request (malformed Request-URI)",
            ParseError::HeaderLine => "Bad Request (malformed header line)",
            ParseError::Unterminated => "Bad Request (header section not terminated)",
            ParseError::BodyTruncated => "Bad Request (Content-Length exceeds body)",
            ParseError::CSeqMethod => "Bad Request (CSeq method mismatch)",
            ParseError::Encoding => "Bad Request (header not UTF-8)",
            ParseError::Missing(h) => match h {
                Via => "Bad Request (missing Via)",
                From => "Bad Request (missing From)",
                To => "Bad Request (missing To)",
                CallId => "Bad Request (missing Call-ID)",
                CSeq => "Bad Request (missing CSeq)",
                _ => "Bad Request (missing header)",
            },
            ParseError::Malformed(h) => match h {
                Via => "Bad Request (malformed Via)",
                From => "Bad Request (malformed From)",
                To => "Bad Request (malformed To)",
                CallId => "Bad Request (malformed Call-ID)",
                CSeq => "Bad Request (malformed CSeq)",
                MaxForwards => "Bad Request (malformed Max-Forwards)",
                Route => "Bad Request (malformed Route)",
                RecordRoute => "Bad Request (malformed Record-Route)",
                Contact => "Bad Request (malformed Contact)",
                ContentLength => "Bad Request (malformed Content-Length)",
                ProxyRequire => "Bad Request (malformed Proxy-Require)",
                ProxyAuthorization => "Bad Request (malformed Proxy-Authorization)",
                Authorization => "Bad Request (malformed Authorization)",
                _ => "Bad Request (malformed header)",
            },
            ParseError::Duplicate(h) => match h {
                From => "Bad Request (duplicate From)",
                To => "Bad Request (duplicate To)",
                CallId => "Bad Request (duplicate Call-ID)",
                CSeq => "Bad Request (duplicate CSeq)",
                MaxForwards => "Bad Request (duplicate Max-Forwards)",
                ContentLength => "Bad Request (duplicate Content-Length)",
                _ => "Bad Request (duplicate header)",
            },
        }
    }
}
