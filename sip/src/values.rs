//! Typed views of the header values the proxy interprets, borrowed from unfolded text.

use super::uri::{find_byte, param_lookup, split_byte, split_hostport, Uri};

/// Splits a list header value at commas that are outside quotes and angle brackets.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let bytes = value.as_bytes();
    let mut start = 0;
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut in_quote = false;
        let mut in_angle = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_quote => i += 1,
                b'"' => in_quote = !in_quote,
                b'<' if !in_quote => in_angle = true,
                b'>' if !in_quote => in_angle = false,
                b',' if !in_quote && !in_angle => {
                    let item = &value[start..i];
                    i += 1;
                    start = i;
                    return Some(item.trim());
                }
                _ => {}
            }
            i += 1;
        }
        done = true;
        Some(value[start.min(value.len())..].trim())
    })
    .filter(|s| !s.is_empty())
}

/// True when a list header value has no empty elements (`a,,b` and `a,` are malformed).
pub fn list_is_well_formed(value: &str) -> bool {
    let mut depth_quote = false;
    let mut in_angle = false;
    let mut item_has_content = false;
    let mut escaped = false;
    for c in value.bytes() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            b'\\' if depth_quote => escaped = true,
            b'"' => depth_quote = !depth_quote,
            b'<' if !depth_quote => in_angle = true,
            b'>' if !depth_quote => in_angle = false,
            b',' if !depth_quote && !in_angle => {
                if !item_has_content {
                    return false;
                }
                item_has_content = false;
                continue;
            }
            _ => {}
        }
        if !c.is_ascii_whitespace() {
            item_has_content = true;
        }
    }
    item_has_content && !depth_quote
}

/// Parameters are `;`-separated `name[=value]` with a non-empty token name.
fn params_well_formed(params: &str) -> bool {
    params.is_empty()
        || split_byte(params, b';').all(|p| {
            let name = split_byte(p, b'=').next().unwrap_or("").trim();
            !name.is_empty() && name.bytes().all(super::header::is_token_char)
        })
}

/// One Via value: `SIP/2.0/UDP host:port;branch=...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via<'a> {
    /// Transport token as written (`UDP`, `tcp`, `TLS`, ...).
    pub transport: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    /// Parameters without the leading `;`.
    pub params: &'a str,
}

/// Marker of RFC 3261 branch identifiers.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

impl<'a> Via<'a> {
    pub fn parse(v: &'a str) -> Option<Self> {
        // sent-protocol: name SLASH version SLASH transport, LWS allowed around slashes
        let mut rest = v.trim();
        let mut parts = [""; 3];
        for (idx, part) in parts.iter_mut().enumerate() {
            rest = rest.trim_start();
            let end = rest
                .find(|c: char| c == '/' || c.is_whitespace())
                .unwrap_or(rest.len());
            *part = &rest[..end];
            rest = rest[end..].trim_start();
            if idx < 2 {
                rest = rest.strip_prefix('/')?;
            }
        }
        if !parts[0].eq_ignore_ascii_case("SIP") || parts[1] != "2.0" || parts[2].is_empty() {
            return None;
        }
        let (sent_by, params) = match find_byte(rest, b';') {
            Some(sc) => (rest[..sc].trim(), rest[sc + 1..].trim()),
            None => (rest.trim(), ""),
        };
        let (host, port) = split_hostport(sent_by)?;
        if !params_well_formed(params) {
            return None;
        }
        Some(Via {
            transport: parts[2],
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<&'a str> {
        param_lookup(self.params, name)
    }

    pub fn branch(&self) -> Option<&'a str> {
        self.param("branch").filter(|b| !b.is_empty())
    }

    /// `host[:port]` as a transaction-matching key component.
    pub fn sent_by(&self) -> (&'a str, Option<u16>) {
        (self.host, self.port)
    }
}

/// `name-addr` or `addr-spec` followed by header parameters (From, To, Contact, Route...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The URI text (inside `<...>` when present).
    pub uri: &'a str,
    /// Header parameters after the URI, without the leading `;`.
    pub params: &'a str,
}

impl<'a> NameAddr<'a> {
    pub fn parse(v: &'a str) -> Option<Self> {
        let v = v.trim();
        let bytes = v.as_bytes();
        let mut i = 0;
        let mut in_quote = false;
        let mut lt = None;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_quote => i += 1,
                b'"' => in_quote = !in_quote,
                b'<' if !in_quote => {
                    lt = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        if in_quote {
            return None;
        }
        let (uri, params) = match lt {
            Some(lt) => {
                let gt = find_byte(&v[lt..], b'>')? + lt;
                let after = v[gt + 1..].trim_start();
                let params = match after.strip_prefix(';') {
                    Some(p) => p,
                    None if after.is_empty() => "",
                    None => return None,
                };
                (v[lt + 1..gt].trim(), params)
            }
            None => {
                // addr-spec: URI parameters would be ambiguous, so `;` starts header params.
                match find_byte(v, b';') {
                    Some(sc) => (v[..sc].trim(), &v[sc + 1..]),
                    None => (v, ""),
                }
            }
        };
        if uri.is_empty() || uri.contains(char::is_whitespace) && lt.is_none() {
            return None;
        }
        Some(NameAddr { uri, params })
    }

    pub fn param(&self, name: &str) -> Option<&'a str> {
        param_lookup(self.params, name)
    }

    pub fn tag(&self) -> Option<&'a str> {
        self.param("tag").filter(|t| !t.is_empty())
    }

    pub fn parsed_uri(&self) -> Option<Uri<'a>> {
        Uri::parse(self.uri).ok()
    }
}

/// `CSeq: 4711 INVITE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CSeq<'a> {
    pub seq: u32,
    pub method: &'a str,
}

impl<'a> CSeq<'a> {
    pub fn parse(v: &'a str) -> Option<Self> {
        let mut it = v.split_whitespace();
        let num = it.next()?;
        let method = it.next()?;
        if it.next().is_some() || num.len() > 10 || !num.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let seq: u64 = num.parse().ok()?;
        if seq >= 1 << 31 {
            return None;
        }
        Some(CSeq {
            seq: seq as u32,
            method,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_forms() {
        let v = Via::parse("SIP / 2.0 / UDP [2001:db8::9]:5060 ;branch=z9hG4bK1;rport").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, "[2001:db8::9]");
        assert_eq!(v.port, Some(5060));
        assert_eq!(v.branch(), Some("z9hG4bK1"));
        assert_eq!(v.param("rport"), Some(""));
        let v = Via::parse("SIP/2.0/TCP host.example;received=2001:db8::9").unwrap();
        assert_eq!(v.param("received"), Some("2001:db8::9"));
        assert!(Via::parse("SIP/2.0 UDP host").is_none());
        assert!(Via::parse("SIP/3.0/UDP host").is_none());
    }

    #[test]
    fn list_split_respects_quotes_and_brackets() {
        let items: Vec<_> = split_list(r#""a, b" <sip:x@y;p=1,2>;q=1, <sip:z@w>"#).collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1], "<sip:z@w>");
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(r#""Bob \"B\" <x>" <sip:bob@[2001:db8::2]>;tag=a6c85cf"#).unwrap();
        assert_eq!(n.uri, "sip:bob@[2001:db8::2]");
        assert_eq!(n.tag(), Some("a6c85cf"));
        let n = NameAddr::parse("sip:alice@atlanta.com;tag=88sja8x").unwrap();
        assert_eq!(n.uri, "sip:alice@atlanta.com");
        assert_eq!(n.tag(), Some("88sja8x"));
        assert!(NameAddr::parse(r#""unterminated <sip:a@b>"#).is_none());
    }

    #[test]
    fn cseq() {
        assert_eq!(
            CSeq::parse("4711 INVITE"),
            Some(CSeq {
                seq: 4711,
                method: "INVITE"
            })
        );
        assert!(CSeq::parse("4294967296 INVITE").is_none());
        assert!(CSeq::parse("1").is_none());
    }
}
