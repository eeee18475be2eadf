//! WireGuard offers and answers in SDP (wireguard-sdp.md): strict validation, and edits of
//! the fmtp parameters, `c=` and the `m=` port that leave every other line as it was.
//!
//! Structure is checked twice: a line scan (every line `<type>=<value>` of a known SDP type,
//! `v=0` first) and sdp-rs, whose output must account for every input line (sdp-rs 0.2.1
//! silently drops lines it does not expect and still returns `Ok`).

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ipnet::IpNet;

/// Why an SDP body is not an acceptable WireGuard offer or answer. The text goes into a
/// Warning header of the 488.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("SDP is not UTF-8")]
    Encoding,
    #[error("SDP line {0} malformed")]
    Line(usize),
    #[error("SDP not fully parsed")]
    Unaccounted,
    #[error("more than one vnd.wireguard media line")]
    MultipleWireGuard,
    #[error("vnd.wireguard mixed with other media")]
    MixedMedia,
    #[error("malformed vnd.wireguard media line")]
    MediaLine,
    #[error("no connection address for the vnd.wireguard media")]
    NoConnection,
    #[error("no fmtp for vnd.wireguard")]
    NoFmtp,
    #[error("pubkey is not 32 bytes of base64")]
    PubKey,
    #[error("prefix does not parse")]
    Prefix,
    #[error("unknown pskmth")]
    Pskmth,
    #[error("answer must carry exactly one pskmth")]
    AnswerPskmth,
    #[error("psk is not 32 bytes of base64")]
    Psk,
    #[error("vnd.wireguard outside a vnd.wireguard media description")]
    Stray,
    #[error("WireGuard offer outside an INVITE")]
    NotInInvite,
    #[error("WireGuard offer inside a dialog (a tunnel is offered by a new INVITE only)")]
    InDialog,
    #[error("malformed vnd.wireguard fmtp parameter")]
    FmtpParameter,
}

/// True when a body mentions `vnd.wireguard` anywhere, in any case: whatever its
/// Content-Type or structure, such a body is handled as a WireGuard offer (validated or
/// refused), never relayed as an opaque payload.
pub fn mentions_wireguard(body: &[u8]) -> bool {
    contains_ignore_case(body, b"vnd.wireguard")
}

/// True when `needle` (ASCII) occurs in `hay`, in any case.
pub fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// A parsed WireGuard SDP body (offer or answer), keeping its lines.
#[derive(Debug, Clone)]
pub struct WgSdp {
    lines: Vec<String>,
    eol: &'static str,
    m_line: usize,
    c_line: usize,
    fmtp_line: usize,
    /// fmtp parameters in order (`name`, `value`).
    params: Vec<(String, String)>,
    pub port: u16,
    pub addr: IpAddr,
    pub pubkey: [u8; 32],
    /// The `prefix` value exactly as written (input of the PSK binding).
    pub prefix_text: String,
    pub prefixes: Vec<IpNet>,
    pub pskmth: Vec<String>,
}

const TYPES: &[u8] = b"vosiuepcbtrzkam";
/// pskmth values a WireGuard SDP may carry.
pub const KNOWN_PSKMTH: [&str; 4] = ["none", "scram", "xover", "gateway"];

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl WgSdp {
    /// `Ok(None)` when the body is SDP without vnd.wireguard media (an ordinary call).
    pub fn parse(body: &[u8]) -> Result<Option<WgSdp>, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| SdpError::Encoding)?;
        let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
        // One line end throughout: a body mixing CRLF and bare LF is read differently by
        // different parsers (fuzz finding, docs/SECURITY.md), so it is not an offer.
        let pieces: Vec<&str> = text.split('\n').collect();
        for (i, piece) in pieces[..pieces.len() - 1].iter().enumerate() {
            if piece.ends_with('\r') != (eol == "\r\n") {
                return Err(SdpError::Line(i + 1));
            }
        }
        let mut lines: Vec<String> = pieces
            .iter()
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
            .collect();
        if lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        for (i, l) in lines.iter().enumerate() {
            let b = l.as_bytes();
            // RFC 4566: no NUL, CR or LF in a line; the gateway also refuses the other
            // control characters, which no valid offer needs.
            let control = b.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f);
            if b.len() < 2
                || b[1] != b'='
                || !TYPES.contains(&b[0])
                || (i == 0 && l != "v=0")
                || control
            {
                return Err(SdpError::Line(i + 1));
            }
        }
        let media: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("m="))
            .collect();
        // Any media line that names vnd.wireguard, in any case or position, is WireGuard
        // media: the strict checks below accept only the one correct form.
        let wg: Vec<usize> = media
            .iter()
            .copied()
            .filter(|&i| mentions_wireguard(lines[i].as_bytes()))
            .collect();
        match (wg.len(), media.len()) {
            (0, _) if mentions_wireguard(body) => return Err(SdpError::Stray),
            (0, _) => return Ok(None),
            (1, 1) => {}
            (1, _) => return Err(SdpError::MixedMedia),
            _ => return Err(SdpError::MultipleWireGuard),
        }
        sdp_rs_accounts_for(text, lines.len())?;
        let m_line = wg[0];
        let parts: Vec<&str> = lines[m_line][2..].split(' ').collect();
        let [kind, port, proto, fmt] = parts[..] else {
            return Err(SdpError::MediaLine);
        };
        if kind != "application" || !proto.eq_ignore_ascii_case("udp") || fmt != "vnd.wireguard" {
            return Err(SdpError::MediaLine);
        }
        let port: u16 = port.parse().map_err(|_| SdpError::MediaLine)?;
        // The connection line in force: media level, else session level.
        let c_line = (m_line + 1..lines.len())
            .find(|&i| lines[i].starts_with("c="))
            .or_else(|| (0..m_line).rev().find(|&i| lines[i].starts_with("c=")))
            .ok_or(SdpError::NoConnection)?;
        let addr = parse_connection(&lines[c_line])?;
        let fmtp_line = (m_line + 1..lines.len())
            .find(|&i| lines[i].starts_with("a=fmtp:vnd.wireguard "))
            .ok_or(SdpError::NoFmtp)?;
        let raw = &lines[fmtp_line]["a=fmtp:vnd.wireguard ".len()..];
        let params: Vec<(String, String)> = raw
            .split(';')
            .filter(|p| !p.trim().is_empty())
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (n.trim().to_owned(), v.trim().to_owned()),
                None => (p.trim().to_owned(), String::new()),
            })
            .collect();
        // Names are tokens, values visible characters; a parameter the gateway does not know
        // is kept (forward compatibility) but must be well formed, so that no parameter can
        // hide inside another's value.
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        };
        let visible = |v: &str| v.bytes().all(|c| c.is_ascii_graphic() && c != b';');
        if params.iter().any(|(n, v)| !token(n) || !visible(v)) {
            return Err(SdpError::FmtpParameter);
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let pubkey: [u8; 32] = get("pubkey")
            .and_then(|k| b64().decode(k).ok())
            .and_then(|k| k.try_into().ok())
            .ok_or(SdpError::PubKey)?;
        let prefix_text = get("prefix").ok_or(SdpError::Prefix)?.to_owned();
        let prefixes = prefix_text
            .split(',')
            .map(|p| p.trim().parse::<IpNet>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| SdpError::Prefix)?;
        if prefixes.is_empty() {
            return Err(SdpError::Prefix);
        }
        let pskmth: Vec<String> = get("pskmth")
            .unwrap_or("none")
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        if pskmth.iter().any(|m| !KNOWN_PSKMTH.contains(&m.as_str())) {
            return Err(SdpError::Pskmth);
        }
        if let Some(psk) = get("psk") {
            let ok = b64().decode(psk).is_ok_and(|k| k.len() == 32);
            if !ok {
                return Err(SdpError::Psk);
            }
        }
        Ok(Some(WgSdp {
            lines,
            eol,
            m_line,
            c_line,
            fmtp_line,
            params,
            port,
            addr,
            pubkey,
            prefix_text,
            prefixes,
            pskmth,
        }))
    }

    /// The `psk` parameter, decoded (inward offers only).
    pub fn psk(&self) -> Option<Vec<u8>> {
        self.param("psk").and_then(|p| b64().decode(p).ok())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or with `None` removes) an fmtp parameter; new ones go last.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        match (self.params.iter().position(|(n, _)| n == name), value) {
            (Some(i), Some(v)) => self.params[i].1 = v.to_owned(),
            (Some(i), None) => {
                self.params.remove(i);
            }
            (None, Some(v)) => self.params.push((name.to_owned(), v.to_owned())),
            (None, None) => {}
        }
        // The line is written in place: one buffer, no string per parameter.
        let line = &mut self.lines[self.fmtp_line];
        line.clear();
        line.push_str("a=fmtp:vnd.wireguard ");
        for (i, (n, v)) in self.params.iter().enumerate() {
            if i > 0 {
                line.push(';');
            }
            line.push_str(n);
            if !v.is_empty() {
                line.push('=');
                line.push_str(v);
            }
        }
    }

    /// Replaces the WireGuard endpoint (`c=` in force and the `m=` port).
    pub fn set_endpoint(&mut self, endpoint: SocketAddr) {
        let family = if endpoint.is_ipv4() { "IP4" } else { "IP6" };
        self.lines[self.c_line] = format!("c=IN {family} {}", endpoint.ip());
        let m = self.lines[self.m_line].clone();
        let rest: Vec<&str> = m[2..].splitn(3, ' ').collect();
        if let [kind, _port, tail] = rest[..] {
            self.lines[self.m_line] = format!("m={kind} {} {tail}", endpoint.port());
        }
        self.addr = endpoint.ip();
        self.port = endpoint.port();
    }

    /// Topology hiding: the origin (`o=`) and every connection line other than the one in
    /// force for the WireGuard media name `ip` instead (the WireGuard endpoint itself is set
    /// with [`WgSdp::set_endpoint`]).
    pub fn hide_addresses(&mut self, ip: IpAddr) {
        let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
        for (i, line) in self.lines.iter_mut().enumerate() {
            if line.starts_with("o=") {
                let mut f: Vec<&str> = line[2..].split(' ').collect();
                if f.len() == 6 {
                    let addr = ip.to_string();
                    f[4] = family;
                    f[5] = &addr;
                    *line = format!("o={}", f.join(" "));
                }
            } else if line.starts_with("c=") && i != self.c_line {
                *line = format!("c=IN {family} {ip}");
            }
        }
    }

    /// The body with the edits, line order and line ends kept.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.lines.iter().map(|l| l.len() + 2).sum());
        for l in &self.lines {
            out.push_str(l);
            out.push_str(self.eol);
        }
        out.into_bytes()
    }

    /// The endpoint the SDP announces.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

fn parse_connection(line: &str) -> Result<IpAddr, SdpError> {
    let parts: Vec<&str> = line[2..].split(' ').collect();
    match parts[..] {
        ["IN", "IP4" | "IP6", addr] => addr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or(SdpError::NoConnection),
        _ => Err(SdpError::NoConnection),
    }
}

/// sdp-rs must parse the body and keep every line (its 0.2.1 drops lines silently after the
/// first one it does not expect, and still returns `Ok`).
fn sdp_rs_accounts_for(text: &str, lines: usize) -> Result<(), SdpError> {
    let parsed = sdp_rs::SessionDescription::try_from(text).map_err(|_| SdpError::Unaccounted)?;
    if lines_held(&parsed) < lines {
        return Err(SdpError::Unaccounted);
    }
    Ok(())
}

/// The lines a parsed description holds: what its `Display` would write, one line per field
/// value (sdp-rs 0.2.1's `SessionDescription`, `Time` and `MediaDescription` writers), counted
/// without writing them (issue 20: the offer was parsed, then written out again only to be
/// counted). `structural_count_is_the_written_count` checks the two agree.
fn lines_held(sd: &sdp_rs::SessionDescription) -> usize {
    let opt = |present: bool| usize::from(present);
    let times: usize = sd
        .times
        .iter()
        .map(|t| 1 + t.repeat.len() + opt(t.zone.is_some()))
        .sum();
    let media: usize = sd
        .media_descriptions
        .iter()
        .map(|m| {
            1 + opt(m.info.is_some())
                + m.connections.len()
                + m.bandwidths.len()
                + opt(m.key.is_some())
                + m.attributes.len()
        })
        .sum();
    3 + opt(sd.session_info.is_some())
        + opt(sd.uri.is_some())
        + sd.emails.len()
        + sd.phones.len()
        + opt(sd.connection.is_some())
        + sd.bandwidths.len()
        + times
        + opt(sd.key.is_some())
        + sd.attributes.len()
        + media
}

/// Removes every `psk` fmtp parameter from a WireGuard SDP body; `None` when there was none.
/// The gateway applies it to everything it relays, so that a PSK can only ever be in the
/// inward offer the gateway itself writes.
///
/// Works line by line on the whole body, so it reaches every part of a multipart body too;
/// the fmtp line is recognised whatever its case and spacing, the parameter whatever its
/// case. A body that is not UTF-8 but mentions `psk` loses nothing here; such a body cannot
/// be a valid offer (the authorize stage refuses it before relaying).
pub fn strip_psk(body: &[u8]) -> Option<Vec<u8>> {
    if !contains_ignore_case(body, b"psk") {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut changed = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|line| {
            let Some((head, params)) = wireguard_fmtp(line) else {
                return line.to_owned();
            };
            let (content, end) = match params.strip_suffix("\r\n") {
                Some(c) => (c, "\r\n"),
                None => match params.strip_suffix('\n') {
                    Some(c) => (c, "\n"),
                    None => (params, ""),
                },
            };
            let kept: Vec<&str> = content
                .split(';')
                .filter(|p| {
                    let name = p.split('=').next().unwrap_or("").trim();
                    let drop = name.eq_ignore_ascii_case("psk");
                    changed |= drop;
                    !drop
                })
                .collect();
            format!("{head}{}{end}", kept.join(";"))
        })
        .collect();
    changed.then(|| out.into_bytes())
}

/// Splits an `a=fmtp:vnd.wireguard <params>` line (any case, any leading blank, any
/// whitespace after the format) into the head up to the parameters and the parameters.
fn wireguard_fmtp(line: &str) -> Option<(&str, &str)> {
    let start = line.len() - line.trim_start().len();
    let rest = &line[start..];
    let fmt_start = start
        + rest
            .get(..7)?
            .eq_ignore_ascii_case("a=fmtp:")
            .then_some(7)?;
    let after = &line[fmt_start..];
    let fmt_len = after
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(after.len());
    if !after[..fmt_len].eq_ignore_ascii_case("vnd.wireguard") {
        return None;
    }
    let ws = after[fmt_len..].len() - after[fmt_len..].trim_start_matches([' ', '\t']).len();
    let split = fmt_start + fmt_len + ws;
    Some((&line[..split], &line[split..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "v=0\r\no=- 4124031101 285260646 IN IP6 2001:db8:666::666\r\ns=-\r\nc=IN IP6 2001:db8:666::666\r\nt=0 0\r\n\
m=application 57660 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=none\r\n\
a=sendrecv\r\n";

    fn parse(s: &str) -> Result<Option<WgSdp>, SdpError> {
        WgSdp::parse(s.as_bytes())
    }

    #[test]
    fn the_seed_example() {
        let w = parse(SEED).unwrap().unwrap();
        assert_eq!(w.port, 57660);
        assert_eq!(w.addr, "2001:db8:666::666".parse::<IpAddr>().unwrap());
        assert_eq!(w.prefix_text, "2001:db8:456:1::/64");
        assert_eq!(w.pskmth, vec!["none".to_owned()]);
        assert_eq!(w.to_bytes(), SEED.as_bytes(), "untouched body round-trips");
    }

    #[test]
    fn ipv4_variant_and_multiple_prefixes_and_preference_lists() {
        let s = SEED
            .replace(
                "IN IP6 2001:db8:666::666\r\ns=-\r\nc=IN IP6 2001:db8:666::666",
                "IN IP4 192.0.2.66\r\ns=-\r\nc=IN IP4 192.0.2.66",
            )
            .replace(
                "prefix=2001:db8:456:1::/64;pskmth=none",
                "prefix=192.0.2.128/25,2001:db8:456:2::/64;pskmth=scram,none",
            );
        let w = parse(&s).unwrap().unwrap();
        assert_eq!(w.addr, "192.0.2.66".parse::<IpAddr>().unwrap());
        assert_eq!(w.prefixes.len(), 2);
        assert_eq!(w.pskmth, vec!["scram".to_owned(), "none".to_owned()]);
    }

    #[test]
    fn edits_keep_unrelated_lines_and_their_order() {
        let s = SEED.replace("a=sendrecv\r\n", "a=x-unknown:keep me\r\na=sendrecv\r\n");
        let mut w = parse(&s).unwrap().unwrap();
        w.set_param("pskmth", Some("gateway"));
        w.set_param("psk", Some("5c+9c1SPsTZJYcy7A7FGjvGchpDHI6mTAmNNCJw0W5Q="));
        let out = String::from_utf8(w.to_bytes()).unwrap();
        assert!(out.contains(";pskmth=gateway;psk=5c+9c1SPsTZJYcy7A7FGjvGchpDHI6mTAmNNCJw0W5Q=\r\na=x-unknown:keep me\r\na=sendrecv\r\n"), "{out}");
        assert_eq!(out.lines().count(), s.lines().count());
        let again = WgSdp::parse(out.as_bytes()).unwrap().unwrap();
        assert_eq!(again.psk().unwrap().len(), 32);
        let stripped = String::from_utf8(strip_psk(out.as_bytes()).unwrap()).unwrap();
        assert!(!stripped.contains("psk="));
        assert!(stripped.contains("pskmth=gateway"));
        assert!(strip_psk(SEED.as_bytes()).is_none());
        w.set_endpoint("[2001:db8::10]:51820".parse().unwrap());
        let out = String::from_utf8(w.to_bytes()).unwrap();
        assert!(
            out.contains("c=IN IP6 2001:db8::10\r\n")
                && out.contains("m=application 51820 udp vnd.wireguard\r\n")
        );
        assert!(
            out.contains("o=- 4124031101 285260646 IN IP6 2001:db8:666::666"),
            "origin untouched"
        );
    }

    /// Fuzz finding (wireguard_sdp, 2026-11-29): an unknown parameter whose value held NULs
    /// and `psk=...` was accepted; such a value could read as a `psk` to a laxer parser.
    #[test]
    fn control_characters_and_malformed_parameters_are_refused() {
        let found = include_bytes!("../../fuzz/regressions/wireguard_sdp/psk-inside-another-value");
        assert!(WgSdp::parse(found).is_err());
        assert_eq!(
            parse(&SEED.replace("pskmth=none", "pskmth=none;x=a b")).unwrap_err(),
            SdpError::FmtpParameter
        );
        assert_eq!(
            parse(&SEED.replace("pskmth=none", "pskmth=none;bad name=1")).unwrap_err(),
            SdpError::FmtpParameter
        );
        assert!(parse(&SEED.replace("pskmth=none", "pskmth=none;future-param=1")).is_ok());
        assert!(parse(&SEED.replace("s=-", "s=\u{1}")).is_err());
    }

    /// Fuzz finding (wireguard_sdp, 2026-11-29): CRLF and a bare LF mixed in one body were
    /// accepted, and read differently by sdp-rs and by our line scan.
    #[test]
    fn mixed_line_ends_are_refused() {
        let found = include_bytes!("../../fuzz/regressions/wireguard_sdp/mixed-line-ends");
        assert!(WgSdp::parse(found).is_err());
        assert!(parse(&SEED.replacen("s=-\r\n", "s=-\n", 1)).is_err());
        assert!(
            parse(&SEED.replace("\r\n", "\n")).unwrap().is_some(),
            "LF alone is fine"
        );
    }

    /// No spelling of WireGuard media passes as "not WireGuard" (issue 9, item 5).
    #[test]
    fn every_spelling_of_wireguard_is_wireguard() {
        for variant in [
            SEED.replace("udp vnd.wireguard", "udp VND.WireGuard"),
            SEED.replace("udp vnd.wireguard", "udp vnd.wireguard "),
            SEED.replace(
                "m=application 57660 udp vnd.wireguard",
                "m=audio 57660 RTP/AVP 0",
            ),
        ] {
            assert!(parse(&variant).is_err(), "{variant}");
        }
        assert_eq!(
            parse(&SEED.replace(
                "m=application 57660 udp vnd.wireguard",
                "m=audio 57660 RTP/AVP 0"
            ))
            .unwrap_err(),
            SdpError::Stray
        );
        assert!(mentions_wireguard(
            b"--b\r\nm=application 1 udp VND.WIREGUARD\r\n"
        ));
        assert!(!mentions_wireguard(b"v=0\r\nm=audio 1 RTP/AVP 0\r\n"));
    }

    #[test]
    fn psk_is_stripped_whatever_the_spelling_and_in_every_part() {
        let body = "--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n\
a=fmtp:vnd.wireguard pubkey=x;psk=AAAA;prefix=p\r\n\
--b\r\nContent-Type: text/plain\r\n\r\n\
 A=FMTP:VND.WireGuard\tPSK=BBBB ; prefix=q\r\n\
a=fmtp:vnd.wireguard  pubkey=y; Psk = CCCC\n--b--\r\n";
        let out = String::from_utf8(strip_psk(body.as_bytes()).unwrap()).unwrap();
        for secret in ["AAAA", "BBBB", "CCCC"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(
            out.contains("a=fmtp:vnd.wireguard pubkey=x;prefix=p\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Content-Type: text/plain\r\n"),
            "other lines untouched: {out}"
        );
        assert_eq!(
            strip_psk(b"v=0\r\na=fmtp:96 psk=1\r\n"),
            None,
            "other formats untouched"
        );
    }

    /// `lines_held` counts what sdp-rs's writer would write, for every shape of description:
    /// each session- and media-level line type, repeats and zones, several media, and bodies
    /// sdp-rs truncates (the count and the writer agree on what it kept).
    #[test]
    fn structural_count_is_the_written_count() {
        let full = "v=0\r\no=- 1 2 IN IP4 192.0.2.1\r\ns=x\r\ni=info\r\nu=http://example.com/\r\n\
e=a@example.com\r\ne=b@example.com\r\np=+1 555 0100\r\nc=IN IP4 192.0.2.1\r\nb=AS:64\r\nb=CT:128\r\n\
t=3724394400 3724398000\r\nr=604800 3600 0\r\nr=7d 1h 0 25h\r\nz=2882844526 -1h 2898848070 0\r\nt=0 0\r\n\
k=prompt\r\na=recvonly\r\na=tool:x\r\n\
m=audio 49170 RTP/AVP 0\r\ni=voice\r\nc=IN IP4 192.0.2.2\r\nc=IN IP4 192.0.2.3\r\nb=AS:32\r\nk=prompt\r\na=sendrecv\r\n\
m=application 57660 udp vnd.wireguard\r\na=fmtp:vnd.wireguard pubkey=x;prefix=y\r\na=sendrecv\r\n";
        let mut bodies: Vec<String> = vec![
            SEED.to_owned(),
            full.to_owned(),
            full.replace("\r\n", "\n"),
            // Out of order and unknown lines: sdp-rs keeps a prefix of the body.
            SEED.replace("s=-\r\n", "x=unknown\r\ns=-\r\n"),
            SEED.replace("a=sendrecv\r\n", "a=sendrecv\r\nc=IN IP4 192.0.2.9\r\n"),
            full.replace("k=prompt\r\na=recvonly", "a=recvonly\r\nk=prompt"),
        ];
        for f in ["offer.sdp", "answer.sdp"] {
            let path = format!(
                "{}/../fuzz/seeds/wireguard_sdp/{f}",
                env!("CARGO_MANIFEST_DIR")
            );
            bodies.push(std::fs::read_to_string(path).unwrap());
        }
        let mut parsed = 0;
        for body in &bodies {
            let Ok(sd) = sdp_rs::SessionDescription::try_from(body.as_str()) else {
                continue;
            };
            parsed += 1;
            let written = sd.to_string();
            let written = written.lines().filter(|l| !l.trim().is_empty()).count();
            assert_eq!(lines_held(&sd), written, "{body}");
        }
        assert!(parsed >= 6, "sdp-rs parsed {parsed} of the bodies");
        // The full body is held whole: the count is the body's line count.
        let sd = sdp_rs::SessionDescription::try_from(full).unwrap();
        assert_eq!(lines_held(&sd), full.lines().count());
    }

    #[test]
    fn faults_are_named() {
        let cases = [
            (
                SEED.replace(
                    "pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=",
                    "pubkey=c2hvcnQ=",
                ),
                SdpError::PubKey,
            ),
            (
                SEED.replace(";prefix=2001:db8:456:1::/64", ""),
                SdpError::Prefix,
            ),
            (
                SEED.replace("prefix=2001:db8:456:1::/64", "prefix=2001:db8:456:1::/129"),
                SdpError::Prefix,
            ),
            (
                SEED.replace("pskmth=none", "pskmth=magic"),
                SdpError::Pskmth,
            ),
            (
                SEED.replace("a=fmtp:vnd.wireguard", "a=fmtp:other"),
                SdpError::NoFmtp,
            ),
            (
                SEED.replace("c=IN IP6 2001:db8:666::666\r\n", ""),
                SdpError::NoConnection,
            ),
            (
                SEED.replace("a=sendrecv", "m=audio 4000 RTP/AVP 0"),
                SdpError::MixedMedia,
            ),
            (
                SEED.replace("s=-\r\n", "s=-\r\nthis is not sdp\r\n"),
                SdpError::Line(4),
            ),
            (
                SEED.replace("udp vnd.wireguard", "tcp vnd.wireguard"),
                SdpError::MediaLine,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(parse(&body).unwrap_err(), expected, "{body}");
        }
        assert!(parse("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n")
            .unwrap()
            .is_none());
    }
}
