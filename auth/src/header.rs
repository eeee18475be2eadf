//! The `SASL` authentication scheme's header value, shared by SIP (Proxy-Authenticate,
//! Proxy-Authorization, WWW-Authenticate, Authorization, *-Authentication-Info) and HTTP.
//!
//! Grammar (RFC 3261 25.1 `other-challenge` / `other-response`): `SASL` LWS
//! `auth-param *(COMMA auth-param)`; parameters `realm`, `mech`, `c2s`, `s2c`, `s2s`,
//! each at most once; values token or quoted-string on input, always quoted on output.
//! Unknown parameters are ignored.

use std::fmt::Write;

/// Why a SASL header value is malformed. Each maps to a 400 reason phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not the SASL scheme")]
    NotSasl,
    #[error("duplicate {0} parameter")]
    Duplicate(&'static str),
    #[error("malformed parameter list")]
    Syntax,
    #[error("malformed {0} value")]
    Value(&'static str),
}

impl HeaderError {
    /// Reason phrase for the 400 response.
    pub fn reason_phrase(&self) -> &'static str {
        match self {
            HeaderError::NotSasl => "Bad Request (credentials not of the SASL scheme)",
            HeaderError::Duplicate("realm") => "Bad Request (duplicate SASL realm)",
            HeaderError::Duplicate("mech") => "Bad Request (duplicate SASL mech)",
            HeaderError::Duplicate("c2s") => "Bad Request (duplicate SASL c2s)",
            HeaderError::Duplicate("s2s") => "Bad Request (duplicate SASL s2s)",
            HeaderError::Duplicate(_) => "Bad Request (duplicate SASL parameter)",
            HeaderError::Syntax => "Bad Request (malformed SASL parameters)",
            HeaderError::Value("mech") => "Bad Request (malformed SASL mech)",
            HeaderError::Value("c2s") => "Bad Request (SASL c2s is not base64)",
            HeaderError::Value("s2s") => "Bad Request (malformed SASL s2s)",
            HeaderError::Value(_) => "Bad Request (malformed SASL value)",
        }
    }
}

/// The parameters of one SASL header value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaslParams {
    pub realm: Option<String>,
    /// One mechanism (client, first round) or a space-separated list (server).
    pub mech: Option<String>,
    /// Client token, decoded. `Some(empty)` for `c2s=""`.
    pub c2s: Option<Vec<u8>>,
    /// Server token, decoded.
    pub s2c: Option<Vec<u8>>,
    /// Opaque server handle.
    pub s2s: Option<String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl SaslParams {
    /// Parses a header value (`SASL realm="...", ...`).
    pub fn parse(value: &str) -> Result<SaslParams, HeaderError> {
        use base64::Engine;
        let value = value.trim();
        let (scheme, rest) = match value.find(|c: char| c.is_whitespace()) {
            Some(i) => (&value[..i], value[i..].trim_start()),
            None => (value, ""),
        };
        if !scheme.eq_ignore_ascii_case("SASL") {
            return Err(HeaderError::NotSasl);
        }
        let mut out = SaslParams::default();
        let mut seen: [bool; 5] = [false; 5];
        for (name, val) in split_params(rest)? {
            let slot = match name.to_ascii_lowercase().as_str() {
                "realm" => 0,
                "mech" => 1,
                "c2s" => 2,
                "s2c" => 3,
                "s2s" => 4,
                _ => continue,
            };
            const NAMES: [&str; 5] = ["realm", "mech", "c2s", "s2c", "s2s"];
            if seen[slot] {
                return Err(HeaderError::Duplicate(NAMES[slot]));
            }
            seen[slot] = true;
            match slot {
                0 => out.realm = Some(val),
                1 => {
                    let ok = !val.is_empty()
                        && val.split(' ').all(|m| {
                            (1..=20).contains(&m.len())
                                && m.bytes().all(|c| {
                                    c.is_ascii_uppercase()
                                        || c.is_ascii_digit()
                                        || c == b'-'
                                        || c == b'_'
                                })
                        });
                    if !ok {
                        return Err(HeaderError::Value("mech"));
                    }
                    out.mech = Some(val);
                }
                2 => {
                    out.c2s = Some(
                        b64()
                            .decode(val.as_bytes())
                            .map_err(|_| HeaderError::Value("c2s"))?,
                    )
                }
                3 => {
                    out.s2c = Some(
                        b64()
                            .decode(val.as_bytes())
                            .map_err(|_| HeaderError::Value("s2c"))?,
                    )
                }
                _ => {
                    if val.is_empty()
                        || val.len() > 128
                        || !val.bytes().all(|c| c.is_ascii_graphic() && c != b'"')
                    {
                        return Err(HeaderError::Value("s2s"));
                    }
                    out.s2s = Some(val);
                }
            }
        }
        Ok(out)
    }

    /// Writes the header value with every parameter quoted.
    pub fn emit(&self) -> String {
        use base64::Engine;
        let mut s = String::from("SASL");
        let mut first = true;
        let mut put = |name: &str, v: &str| {
            let _ = write!(s, "{}{name}=\"{v}\"", if first { " " } else { ", " });
            first = false;
        };
        if let Some(r) = &self.realm {
            put("realm", &escape(r));
        }
        if let Some(m) = &self.mech {
            put("mech", m);
        }
        if let Some(t) = &self.c2s {
            put("c2s", &b64().encode(t));
        }
        if let Some(h) = &self.s2s {
            put("s2s", &escape(h));
        }
        if let Some(t) = &self.s2c {
            put("s2c", &b64().encode(t));
        }
        s
    }

    /// The parameters as HTTP's `Authentication-Info` carries them (RFC 7615: a list of
    /// auth-params, no scheme; http-sasl.md): `s2c="...", s2s="..."`.
    pub fn emit_auth_params(&self) -> String {
        let v = self.emit();
        v.strip_prefix("SASL ").unwrap_or("").to_owned()
    }

    /// An `Authentication-Info` value in RFC 7615's form (auth-params) or with a leading
    /// `SASL` scheme (older Gatehouse, and the SIP profile's form); `None` when malformed.
    pub fn parse_info(value: &str) -> Option<SaslParams> {
        let v = value.trim();
        // `get`, not indexing: the value is a peer's text, and byte 5 may fall inside a
        // character.
        if v.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("SASL ")) {
            SaslParams::parse(v).ok()
        } else {
            SaslParams::parse(&format!("SASL {v}")).ok()
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Splits `a="x", b=y` into (name, unquoted value) pairs.
fn split_params(s: &str) -> Result<Vec<(String, String)>, HeaderError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if i == b.len() {
        return Ok(out);
    }
    loop {
        skip_ws(&mut i);
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b[i])) {
            i += 1;
        }
        if start == i {
            return Err(HeaderError::Syntax);
        }
        let name = s[start..i].to_owned();
        skip_ws(&mut i);
        if i >= b.len() || b[i] != b'=' {
            return Err(HeaderError::Syntax);
        }
        i += 1;
        skip_ws(&mut i);
        let value = if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut v = String::new();
            loop {
                match b.get(i) {
                    None => return Err(HeaderError::Syntax),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        // quoted-pair (RFC 3261 25.1): a backslash and one ASCII character
                        // other than CR and LF. Anything else is a syntax error (a UTF-8
                        // continuation here once panicked: fuzz finding, docs/SECURITY.md).
                        let c = *b.get(i + 1).ok_or(HeaderError::Syntax)?;
                        if !c.is_ascii() || c == b'\r' || c == b'\n' {
                            return Err(HeaderError::Syntax);
                        }
                        v.push(c as char);
                        i += 2;
                    }
                    Some(_) => {
                        let ch = s[i..].chars().next().ok_or(HeaderError::Syntax)?;
                        v.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            v
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            s[vs..i].to_owned()
        };
        out.push((name, value));
        skip_ws(&mut i);
        if i == b.len() {
            return Ok(out);
        }
        if b[i] != b',' {
            return Err(HeaderError::Syntax);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finding (sasl_header, 2026-11-29): a backslash before a multi-byte UTF-8
    /// character split the character and panicked on the next slice; an unauthenticated
    /// remote crash before panics were contained. The input is kept in
    /// fuzz/regressions/sasl_header/.
    #[test]
    fn a_quoted_pair_must_escape_one_ascii_character() {
        let found = include_bytes!("../../fuzz/regressions/sasl_header/quoted-pair-before-utf8");
        let text = std::str::from_utf8(found).unwrap();
        assert_eq!(SaslParams::parse(text), Err(HeaderError::Syntax));
        assert_eq!(
            SaslParams::parse("SASL realm=\"a\\\u{c4}b\""),
            Err(HeaderError::Syntax)
        );
        assert_eq!(
            SaslParams::parse("SASL realm=\"a\\\"b\"")
                .unwrap()
                .realm
                .as_deref(),
            Some("a\"b")
        );
    }

    /// Fuzz finding (sasl_header, 2026-11-29): an unquoted `s2s` holding backslashes was
    /// emitted quoted but unescaped, so the echo parsed to another handle.
    #[test]
    fn an_s2s_with_backslashes_round_trips() {
        let found =
            include_bytes!("../../fuzz/regressions/sasl_header/unquoted-s2s-with-backslashes");
        let p = SaslParams::parse(std::str::from_utf8(found).unwrap()).unwrap();
        assert_eq!(SaslParams::parse(&p.emit()).unwrap(), p);
    }

    #[test]
    fn round_trip_and_quoting() {
        let p = SaslParams {
            realm: Some("org.example".into()),
            mech: Some("SCRAM-SHA-256-PLUS SCRAM-SHA-256".into()),
            c2s: None,
            s2c: Some(b"r=abc,s=xyz==,i=4096".to_vec()),
            s2s: Some("h4nd1e".into()),
        };
        let text = p.emit();
        assert_eq!(
            text,
            "SASL realm=\"org.example\", mech=\"SCRAM-SHA-256-PLUS SCRAM-SHA-256\", s2s=\"h4nd1e\", s2c=\"cj1hYmMscz14eXo9PSxpPTQwOTY=\""
        );
        assert_eq!(SaslParams::parse(&text).unwrap(), p);
    }

    #[test]
    fn tokens_empty_values_and_unknown_parameters() {
        let p =
            SaslParams::parse("sasl realm=org.example,mech=PLAIN , c2s=\"\", text=\"hi\", c2c=x")
                .unwrap();
        assert_eq!(p.realm.as_deref(), Some("org.example"));
        assert_eq!(p.mech.as_deref(), Some("PLAIN"));
        assert_eq!(p.c2s, Some(vec![]));
    }

    #[test]
    fn malformed_values_are_typed_errors() {
        assert_eq!(
            SaslParams::parse("Digest realm=\"x\""),
            Err(HeaderError::NotSasl)
        );
        assert_eq!(
            SaslParams::parse("SASL realm=\"a\", realm=\"b\""),
            Err(HeaderError::Duplicate("realm"))
        );
        assert_eq!(
            SaslParams::parse("SASL c2s=\"not base64!\""),
            Err(HeaderError::Value("c2s"))
        );
        assert_eq!(
            SaslParams::parse("SASL mech=\"scram-sha-256\""),
            Err(HeaderError::Value("mech"))
        );
        assert_eq!(
            SaslParams::parse("SASL realm=\"unterminated"),
            Err(HeaderError::Syntax)
        );
        assert_eq!(SaslParams::parse("SASL realm"), Err(HeaderError::Syntax));
        assert_eq!(
            SaslParams::parse("SASL s2s=\"\""),
            Err(HeaderError::Value("s2s"))
        );
    }
}
