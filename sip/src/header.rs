//! Header names: the few the proxy interprets, compact forms (RFC 3261 section 7.3.3),
//! case-insensitive matching. Every other header is `Other` and is forwarded byte for byte.

/// A header name the proxy knows how to interpret. Matching is case-insensitive and
/// accepts the compact forms; the original spelling stays in the message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    Route,
    RecordRoute,
    Contact,
    ContentLength,
    ContentType,
    ContentEncoding,
    Require,
    ProxyRequire,
    Supported,
    Unsupported,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    Expires,
    /// Any header the proxy does not interpret.
    Other,
}

impl HeaderName {
    /// Classifies a header name as it appears on the wire (already trimmed).
    pub fn from_wire(name: &[u8]) -> Self {
        use HeaderName::*;
        if name.len() == 1 {
            return match name[0].to_ascii_lowercase() {
                b'v' => Via,
                b'f' => From,
                b't' => To,
                b'i' => CallId,
                b'm' => Contact,
                b'l' => ContentLength,
                b'c' => ContentType,
                b'e' => ContentEncoding,
                b'k' => Supported,
                _ => Other,
            };
        }
        const TABLE: &[(&[u8], HeaderName)] = &[
            (b"via", Via),
            (b"from", From),
            (b"to", To),
            (b"call-id", CallId),
            (b"cseq", CSeq),
            (b"max-forwards", MaxForwards),
            (b"route", Route),
            (b"record-route", RecordRoute),
            (b"contact", Contact),
            (b"content-length", ContentLength),
            (b"content-type", ContentType),
            (b"content-encoding", ContentEncoding),
            (b"require", Require),
            (b"proxy-require", ProxyRequire),
            (b"supported", Supported),
            (b"unsupported", Unsupported),
            (b"authorization", Authorization),
            (b"proxy-authorization", ProxyAuthorization),
            (b"www-authenticate", WwwAuthenticate),
            (b"proxy-authenticate", ProxyAuthenticate),
            (b"expires", Expires),
        ];
        TABLE
            .iter()
            .find(|(n, _)| n.len() == name.len() && n.eq_ignore_ascii_case(name))
            .map_or(Other, |&(_, h)| h)
    }

    /// The canonical spelling used when the proxy writes a header of its own.
    pub fn canonical(self) -> &'static str {
        use HeaderName::*;
        match self {
            Via => "Via",
            From => "From",
            To => "To",
            CallId => "Call-ID",
            CSeq => "CSeq",
            MaxForwards => "Max-Forwards",
            Route => "Route",
            RecordRoute => "Record-Route",
            Contact => "Contact",
            ContentLength => "Content-Length",
            ContentType => "Content-Type",
            ContentEncoding => "Content-Encoding",
            Require => "Require",
            ProxyRequire => "Proxy-Require",
            Supported => "Supported",
            Unsupported => "Unsupported",
            Authorization => "Authorization",
            ProxyAuthorization => "Proxy-Authorization",
            WwwAuthenticate => "WWW-Authenticate",
            ProxyAuthenticate => "Proxy-Authenticate",
            Expires => "Expires",
            Other => "",
        }
    }

    /// Headers whose value is a comma-separated list that may be split across lines
    /// (RFC 3261 section 7.3.1). Auth headers are not: their commas separate parameters.
    pub fn is_list(self) -> bool {
        use HeaderName::*;
        matches!(
            self,
            Via | Route | RecordRoute | Contact | Require | ProxyRequire | Supported | Unsupported
        )
    }
}

/// True for RFC 3261 `token` characters.
pub fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_case_insensitive() {
        assert_eq!(HeaderName::from_wire(b"v"), HeaderName::Via);
        assert_eq!(HeaderName::from_wire(b"V"), HeaderName::Via);
        assert_eq!(HeaderName::from_wire(b"cAlL-iD"), HeaderName::CallId);
        assert_eq!(HeaderName::from_wire(b"l"), HeaderName::ContentLength);
        assert_eq!(HeaderName::from_wire(b"X-Custom"), HeaderName::Other);
        assert_eq!(HeaderName::from_wire(b"s"), HeaderName::Other);
    }
}
