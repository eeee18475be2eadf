//! Strict parsers of the SCRAM client messages (RFC 5802 section 7 grammar), run on every
//! `c2s` before rsasl sees it.
//!
//! rsasl 2.3.1 slices attributes without length checks (`ClientFinal::parse` takes
//! `next[0..2]` of every attribute), so an empty client-final or one with an attribute shorter
//! than two bytes panics inside the library (docs/SECURITY.md, "rsasl"). The gateway therefore
//! never hands rsasl a message this module has not accepted: every attribute is `ALPHA "="
//! value` in the grammar's order, names are checked, sizes are bounded, base64 is canonical,
//! the proof is exactly 32 bytes. What passes here is a message rsasl parses without
//! surprises; what does not is a protocol failure (a generic 403), never a panic.

use base64::Engine;

/// Longest client message accepted (RFC 5802 sets none; real ones are under 300 bytes).
pub const MAX_MESSAGE: usize = 2048;
/// Longest username or authzid, after `=2C`/`=3D` decoding.
pub const MAX_NAME: usize = 255;
/// Longest nonce (client nonce, or client + server nonce in the final message).
pub const MAX_NONCE: usize = 512;

/// Why a client message is not in the grammar. The peer never sees these; they are for tests,
/// logs and the fuzz targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("message too long")]
    TooLong,
    #[error("not UTF-8")]
    Utf8,
    #[error("bad GS2 channel-binding flag")]
    Gs2Flag,
    #[error("bad authzid")]
    Authzid,
    #[error("mandatory extension (m=) not supported")]
    MandatoryExtension,
    #[error("bad username")]
    Username,
    #[error("bad nonce")]
    Nonce,
    #[error("bad extension attribute")]
    Extension,
    #[error("bad channel-binding attribute")]
    ChannelBinding,
    #[error("bad proof")]
    Proof,
    #[error("attribute missing or out of order")]
    Missing,
}

/// The GS2 channel-binding flag of a client-first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gs2Binding {
    /// `n`: the client does not support channel binding.
    None,
    /// `y`: the client supports it but thinks the server does not.
    SupportedNotUsed,
    /// `p=name`: the client uses binding type `name`.
    Used(String),
}

/// A client-first message the gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    pub binding: Gs2Binding,
    pub authzid: Option<String>,
    /// The username, with `=2C` and `=3D` decoded.
    pub username: String,
    /// client-first-message-bare (for the AuthMessage).
    pub bare: String,
}

/// A client-final message the gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// Decoded `c=`: the GS2 header followed by the channel-binding data, if any.
    pub channel_binding: Vec<u8>,
    /// Client nonce followed by the server nonce.
    pub nonce: &'a str,
    /// client-final-message-without-proof (for the AuthMessage).
    pub without_proof: &'a str,
    /// The decoded ClientProof (32 bytes for SHA-256).
    pub proof: [u8; 32],
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `saslname = 1*(value-safe-char / "=2C" / "=3D")`, decoded.
pub(crate) fn decode_saslname(s: &str) -> Option<String> {
    if s.is_empty() || s.contains('\0') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (out.len() <= MAX_NAME).then_some(out)
}

/// The rest of a message after its first attribute(s): `nonce ["," extensions]`. Returns
/// the nonce.
fn nonce_and_extensions<'a>(
    mut attrs: impl Iterator<Item = &'a str>,
) -> Result<&'a str, SyntaxError> {
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(SyntaxError::Missing)?;
    if !valid_nonce(nonce) {
        return Err(SyntaxError::Nonce);
    }
    if !attrs.all(valid_extension) {
        return Err(SyntaxError::Extension);
    }
    Ok(nonce)
}

/// `printable = %x21-2B / %x2D-7E` (no comma), one or more, bounded.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_NONCE && n.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// `attr-val = ALPHA "=" value`; `value = 1*value-char` (UTF-8 except NUL and ",").
fn valid_extension(a: &str) -> bool {
    let b = a.as_bytes();
    b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b'=' && !a.contains('\0')
}

/// Canonical base64 (padding required, no whitespace), or `None`.
fn strict_b64(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(4) {
        return None;
    }
    b64().decode(s).ok()
}

fn check_size(msg: &[u8]) -> Result<&str, SyntaxError> {
    if msg.len() > MAX_MESSAGE {
        return Err(SyntaxError::TooLong);
    }
    std::str::from_utf8(msg).map_err(|_| SyntaxError::Utf8)
}

impl ClientFirst {
    /// `gs2-header client-first-message-bare`, strictly.
    pub fn parse(msg: &[u8]) -> Result<ClientFirst, SyntaxError> {
        let text = check_size(msg)?;
        let (flag, rest) = text.split_once(',').ok_or(SyntaxError::Gs2Flag)?;
        let binding = match flag {
            "n" => Gs2Binding::None,
            "y" => Gs2Binding::SupportedNotUsed,
            f => {
                let name = f.strip_prefix("p=").ok_or(SyntaxError::Gs2Flag)?;
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
                if !ok {
                    return Err(SyntaxError::Gs2Flag);
                }
                Gs2Binding::Used(name.to_owned())
            }
        };
        let (authz, bare) = rest.split_once(',').ok_or(SyntaxError::Authzid)?;
        let authzid = match authz {
            "" => None,
            a => Some(
                a.strip_prefix("a=")
                    .and_then(decode_saslname)
                    .ok_or(SyntaxError::Authzid)?,
            ),
        };
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(SyntaxError::MandatoryExtension);
        }
        let username = user
            .strip_prefix("n=")
            .and_then(decode_saslname)
            .ok_or(SyntaxError::Username)?;
        nonce_and_extensions(attrs)?;
        Ok(ClientFirst {
            binding,
            authzid,
            username,
            bare: bare.to_owned(),
        })
    }
}

impl<'a> ClientFinal<'a> {
    /// `channel-binding "," nonce ["," extensions] "," proof`, strictly.
    pub fn parse(msg: &'a [u8]) -> Result<ClientFinal<'a>, SyntaxError> {
        let text = check_size(msg)?;
        let (without_proof, proof) = text.rsplit_once(',').ok_or(SyntaxError::Missing)?;
        let proof = proof
            .strip_prefix("p=")
            .and_then(strict_b64)
            .and_then(|p| <[u8; 32]>::try_from(p).ok())
            .ok_or(SyntaxError::Proof)?;
        let mut attrs = without_proof.split(',');
        let channel_binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .filter(|c| !c.is_empty())
            .and_then(strict_b64)
            .ok_or(SyntaxError::ChannelBinding)?;
        let nonce = nonce_and_extensions(attrs)?;
        Ok(ClientFinal {
            channel_binding,
            nonce,
            without_proof,
            proof,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROOF: &str = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    #[test]
    fn client_first_accepts_the_grammar() {
        let cf = ClientFirst::parse(b"p=tls-exporter,a=bob,n=al=2Cice,r=xyz").unwrap();
        assert_eq!(cf.binding, Gs2Binding::Used("tls-exporter".into()));
        assert_eq!(cf.authzid.as_deref(), Some("bob"));
        assert_eq!(cf.username, "al,ice");
        assert_eq!(cf.bare, "n=al=2Cice,r=xyz");
        assert!(ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO,x=ext").is_ok());
    }

    #[test]
    fn client_first_refuses_what_is_not_in_the_grammar() {
        for bad in [
            &b""[..],
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=a,r=b",
            b"p=,,n=a,r=b",
            b"p=a b,,n=a,r=b",
            b"n,,n=a=2X,r=b",
            b"n,,n=,r=b",
            b"n,,n=a",
            b"n,,n=a,r=",
            b"n,,n=a,r=b,",
            b"n,,n=a,r=b,x",
            b"n,,n=a,r=b,xy",
            b"n,,m=x,n=a,r=b",
            b"n,a=,n=a,r=b",
            b"n,,r=b,n=a",
            b"n,,n=a\0,r=b",
            b"n,,n=a,r=b\x7f",
            b"n,,n=\xff,r=b",
        ] {
            assert!(
                ClientFirst::parse(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("n,,n=a,r={}", "x".repeat(MAX_MESSAGE));
        assert_eq!(
            ClientFirst::parse(long.as_bytes()),
            Err(SyntaxError::TooLong)
        );
    }

    #[test]
    fn client_final_accepts_the_grammar() {
        let msg = format!("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,{PROOF}");
        let cf = ClientFinal::parse(msg.as_bytes()).unwrap();
        assert_eq!(cf.channel_binding, b"n,,");
        assert_eq!(
            cf.without_proof,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        );
        assert_eq!(cf.proof.len(), 32);
        let ext = format!("c=biws,r=abc,x=1,{PROOF}");
        assert!(ClientFinal::parse(ext.as_bytes()).is_ok());
    }

    /// The inputs that panic inside rsasl 2.3.1 (docs/SECURITY.md), and their relatives.
    #[test]
    fn client_final_refuses_the_rsasl_panic_inputs() {
        for bad in [
            String::new(),
            "c".into(),
            "c=biws,".into(),
            format!("c=biws,r=abc,,{PROOF}"),
            "c=biws,r=abc,p".into(),
            "c=biws,r=abc,p=".into(),
            format!("c=biws,r=abc,x,{PROOF}"),
            format!("c=biws,r=abc,=,{PROOF}"),
            format!("c=,r=abc,{PROOF}"),
            format!("c=biw,r=abc,{PROOF}"),
            format!("r=abc,c=biws,{PROOF}"),
            format!("c=biws,{PROOF}"),
            "c=biws,r=abc,p=AAAA".into(),
            format!("c=biws,r=a,b,{PROOF}"),
            format!(",c=biws,r=abc,{PROOF}"),
        ] {
            assert!(
                ClientFinal::parse(bad.as_bytes()).is_err(),
                "accepted {bad:?}"
            );
        }
    }
}
