//! SIP URIs (RFC 3261 section 19.1), borrowed from the message bytes. IPv6 references
//! (`sip:bob@[2001:db8::2]:5060`) are first-class: the host keeps its brackets on the wire,
//! and [`Uri::ip`] gives the address.

use std::net::IpAddr;

/// URI scheme. Anything but `sip`/`sips` is `Other`, which a SIP proxy answers with 416.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
    Other,
}

/// A parsed SIP or SIPS URI, borrowing its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uri<'a> {
    pub scheme: Scheme,
    /// User part including any user parameters, escapes kept (`alice`, `+1234;phone-context=x`).
    pub user: Option<&'a str>,
    /// Host as written, IPv6 references with brackets.
    pub host: &'a str,
    pub port: Option<u16>,
    /// URI parameters without the leading `;` (`transport=tcp;lr`).
    pub params: &'a str,
    /// Headers part without the leading `?`.
    pub headers: &'a str,
}

/// Position of the ASCII byte `b` in `s` (a char boundary, so `s[..i]` and `s[i + 1..]` are
/// slices). `str::find(char)` costs several times more on the short strings of a header
/// value: it encodes the char and sets up a vectorised search.
#[inline]
pub(crate) fn find_byte(s: &str, b: u8) -> Option<usize> {
    debug_assert!(b.is_ascii());
    s.bytes().position(|c| c == b)
}

/// The last position of the ASCII byte `b` in `s`.
#[inline]
pub(crate) fn rfind_byte(s: &str, b: u8) -> Option<usize> {
    debug_assert!(b.is_ascii());
    s.bytes().rposition(|c| c == b)
}

/// `s.split(sep)` for an ASCII separator, without a char searcher.
pub(crate) fn split_byte(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let r = rest?;
        match find_byte(r, sep) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Error for a URI that is not a well-formed SIP URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriError;

impl<'a> Uri<'a> {
    /// Parses an absolute URI. Non-SIP schemes parse with only `scheme` meaningful.
    pub fn parse(s: &'a str) -> Result<Self, UriError> {
        let s = s.trim();
        let colon = find_byte(s, b':').ok_or(UriError)?;
        let scheme_text = &s[..colon];
        if scheme_text.is_empty()
            || !scheme_text
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
        {
            return Err(UriError);
        }
        let scheme = if scheme_text.eq_ignore_ascii_case("sip") {
            Scheme::Sip
        } else if scheme_text.eq_ignore_ascii_case("sips") {
            Scheme::Sips
        } else if scheme_text.eq_ignore_ascii_case("tel") {
            Scheme::Tel
        } else {
            Scheme::Other
        };
        let rest = &s[colon + 1..];
        if !matches!(scheme, Scheme::Sip | Scheme::Sips) {
            if rest.is_empty() {
                return Err(UriError);
            }
            return Ok(Uri {
                scheme,
                user: None,
                host: "",
                port: None,
                params: "",
                headers: "",
            });
        }
        if rest
            .bytes()
            .any(|c| c <= b' ' || c == b'<' || c == b'>' || c == b'"')
        {
            return Err(UriError);
        }
        let (before_headers, headers) = match find_byte(rest, b'?') {
            Some(q) => (&rest[..q], &rest[q + 1..]),
            None => (rest, ""),
        };
        let (user, hostpart) = match find_byte(before_headers, b'@') {
            Some(at) => {
                let u = &before_headers[..at];
                if u.is_empty() {
                    return Err(UriError);
                }
                (Some(u), &before_headers[at + 1..])
            }
            None => (None, before_headers),
        };
        let (hostport, params) = match find_byte(hostpart, b';') {
            Some(sc) => (&hostpart[..sc], &hostpart[sc + 1..]),
            None => (hostpart, ""),
        };
        let (host, port) = split_hostport(hostport).ok_or(UriError)?;
        Ok(Uri {
            scheme,
            user,
            host,
            port,
            params,
            headers,
        })
    }

    /// Value of a URI parameter (`Some("")` for a flag such as `lr`), case-insensitive name.
    pub fn param(&self, name: &str) -> Option<&'a str> {
        param_lookup(self.params, name)
    }

    /// The host as an IP address when it is a literal (brackets removed for IPv6).
    pub fn ip(&self) -> Option<IpAddr> {
        host_ip(self.host)
    }

    /// The `transport` parameter, lower-cased comparison left to the caller.
    pub fn transport(&self) -> Option<&'a str> {
        self.param("transport")
    }
}

/// Parses `host[:port]`, where host is a name, an IPv4 address or a bracketed IPv6 reference.
pub fn split_hostport(s: &str) -> Option<(&str, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    let (host, port_text) = if s.starts_with('[') {
        let close = find_byte(s, b']')?;
        let host = &s[..=close];
        host[1..close].parse::<std::net::Ipv6Addr>().ok()?;
        let rest = &s[close + 1..];
        match rest.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if rest.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match rfind_byte(s, b':') {
            Some(c) => (&s[..c], Some(&s[c + 1..])),
            None => (s, None),
        }
    };
    if !host.starts_with('[')
        && (host.is_empty()
            || !host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.'))
    {
        return None;
    }
    let port = match port_text {
        Some(p) => Some(parse_port(p)?),
        None => None,
    };
    Some((host, port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// The IP address of a host literal, with IPv6 brackets removed.
pub fn host_ip(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse().ok(),
        None => host.parse().ok(),
    }
}

/// Looks up `name` in a `;`-separated parameter list (`a=1;lr;b=2`), case-insensitively.
pub fn param_lookup<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    split_byte(params, b';').find_map(|p| {
        let p = p.trim();
        let (n, v) = match find_byte(p, b'=') {
            Some(eq) => (p[..eq].trim(), p[eq + 1..].trim()),
            None => (p, ""),
        };
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// The AOR key of a URI: `sip:user@host` (or `sips:`), host lower-cased, user parameters and
/// URI parameters dropped; `None` without a user part.
pub fn aor_key(uri: &str) -> Option<String> {
    let u = Uri::parse(uri).ok()?;
    let user = split_byte(u.user?, b';').next()?;
    let scheme = match u.scheme {
        Scheme::Sips => "sips",
        _ => "sip",
    };
    Some(format!("{scheme}:{user}@{}", u.host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_reference() {
        let u = Uri::parse("sip:bob@[2001:db8::2]:5070;transport=tcp;lr").unwrap();
        assert_eq!(u.user, Some("bob"));
        assert_eq!(u.host, "[2001:db8::2]");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.ip(), Some("2001:db8::2".parse().unwrap()));
        assert_eq!(u.transport(), Some("tcp"));
        assert_eq!(u.param("lr"), Some(""));
    }

    #[test]
    fn user_params_and_escapes() {
        let u = Uri::parse("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user, Some("user;par=u%40example.net"));
        assert_eq!(u.host, "example.com");
        let u = Uri::parse("sips:alice:secret@atlanta.com?subject=x").unwrap();
        assert_eq!(u.scheme, Scheme::Sips);
        assert_eq!(u.headers, "subject=x");
    }

    proptest::proptest! {
        /// The byte helpers answer as `str::find`, `rfind` and `split` do, whatever the text
        /// (multi-byte characters included).
        #[test]
        fn byte_helpers_agree_with_str_methods(s in "[a-c;=:é€ ]{0,24}", sep in proptest::sample::select(vec![b';', b'=', b':', b'a'])) {
            let c = sep as char;
            proptest::prop_assert_eq!(find_byte(&s, sep), s.find(c));
            proptest::prop_assert_eq!(rfind_byte(&s, sep), s.rfind(c));
            proptest::prop_assert_eq!(split_byte(&s, sep).collect::<Vec<_>>(), s.split(c).collect::<Vec<_>>());
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Uri::parse("sip:").is_err());
        assert!(Uri::parse("sip:[2001:db8::2").is_err());
        assert!(Uri::parse("sip:host:99999").is_err());
        assert!(Uri::parse("sip:a b@host").is_err());
        assert_eq!(Uri::parse("mailto:a@b").unwrap().scheme, Scheme::Other);
    }
}
