//! The SIP message: the original bytes, an index of header lines, and a list of edits.
//!
//! Parsing is one pass that finds the start line, each header line (folding and LF-only
//! line ends accepted) and the body; it classifies header names but interprets values only
//! for the headers a proxy needs, and only to validate them. Edits (replace the
//! Request-URI, add/remove/replace a header, replace the body) are recorded in the index and
//! applied once by [`Message::serialize`], which copies every untouched line byte for byte
//! and writes a correct Content-Length.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::error::ParseError;
use super::header::{is_token_char, HeaderName};
use super::uri::{Scheme, Uri};
use super::values::{list_is_well_formed, split_list, CSeq, NameAddr, Via};

/// Size limits enforced before and during parsing.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65_535,
            max_headers: 128,
        }
    }
}

/// Request methods of RFC 3261 and its extensions; any other token is `Other`, and a proxy
/// forwards it like any non-INVITE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 3261 section 7.1).
    pub fn from_wire(m: &[u8]) -> Self {
        match m {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"INFO" => Method::Info,
            b"UPDATE" => Method::Update,
            b"PRACK" => Method::Prack,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"REFER" => Method::Refer,
            b"MESSAGE" => Method::Message,
            b"PUBLISH" => Method::Publish,
            _ => Method::Other,
        }
    }
}

type Span = (u32, u32);

#[derive(Clone, Debug)]
enum Text {
    Orig(Span),
    Owned(Box<str>),
}

/// One header line of the message (or one the proxy added).
#[derive(Clone, Debug)]
pub struct HeaderField {
    pub name: HeaderName,
    name_text: Text,
    value: Text,
    /// The whole original line (name through value, folding included) while untouched.
    line: Option<Span>,
    removed: bool,
}

#[derive(Clone, Debug)]
enum StartLine {
    Request {
        method: Method,
        method_span: Span,
        uri: Text,
    },
    Response {
        code: u16,
        reason: Span,
    },
}

/// A parsed SIP request or response.
#[derive(Clone, Debug)]
pub struct Message {
    buf: Bytes,
    /// The start line and header section (`buf` up to the body, the same bytes) when they are
    /// UTF-8, as they almost always are: checked once, then every span is a `str` slice.
    head: Option<ByteString>,
    start: StartLine,
    start_line: Span,
    start_edited: bool,
    headers: Vec<HeaderField>,
    body: Span,
    new_body: Option<Bytes>,
}

fn span(s: usize, e: usize) -> Span {
    (s as u32, e as u32)
}

fn trim_span(buf: &[u8], mut s: usize, mut e: usize) -> (usize, usize) {
    while s < e && matches!(buf[s], b' ' | b'\t' | b'\r' | b'\n') {
        s += 1;
    }
    while e > s && matches!(buf[e - 1], b' ' | b'\t' | b'\r' | b'\n') {
        e -= 1;
    }
    (s, e)
}

impl Message {
    /// Parses one complete message (a datagram, or a frame from [`super::framer::StreamFramer`]).
    ///
    /// Validates what RFC 3261 sections 8.2 and 16.3 require before a proxy acts: a
    /// well-formed start line, exactly one From/To/Call-ID/CSeq, a parsable top Via, a CSeq
    /// method equal to the request method, numeric Max-Forwards and Content-Length.
    pub fn parse(buf: Bytes, limits: &Limits) -> Result<Message, ParseError> {
        if buf.len() > limits.max_message_bytes {
            return Err(ParseError::TooLarge {
                limit: limits.max_message_bytes,
            });
        }
        let b = &buf[..];
        // RFC 3261 7.5: ignore CRLFs that precede the start line.
        let mut pos = 0;
        while pos < b.len() && matches!(b[pos], b'\r' | b'\n') {
            pos += 1;
        }
        if pos == b.len() {
            return Err(ParseError::Empty);
        }
        let line_end = memchr(b'\n', &b[pos..])
            .map(|i| pos + i)
            .ok_or(ParseError::Unterminated)?;
        let sl_end = if line_end > pos && b[line_end - 1] == b'\r' {
            line_end - 1
        } else {
            line_end
        };
        let start = parse_start_line(b, pos, sl_end)?;
        let start_line = span(pos, sl_end);
        pos = line_end + 1;

        let mut headers: Vec<HeaderField> = Vec::with_capacity(16);
        // Folded header values (rare): unfolded once below, so reading any other value never
        // looks for line breaks.
        let mut folded: Vec<usize> = Vec::new();
        let body_start;
        loop {
            if pos >= b.len() {
                return Err(ParseError::Unterminated);
            }
            let le = memchr(b'\n', &b[pos..])
                .map(|i| pos + i)
                .ok_or(ParseError::Unterminated)?;
            let content_end = if le > pos && b[le - 1] == b'\r' {
                le - 1
            } else {
                le
            };
            if content_end == pos {
                body_start = le + 1;
                break;
            }
            if matches!(b[pos], b' ' | b'\t') {
                // Folded continuation of the previous header line.
                let last = headers.last_mut().ok_or(ParseError::HeaderLine)?;
                if let (Text::Orig((vs, _)), Some((ls, _))) = (&last.value, last.line) {
                    let vs = *vs;
                    last.value = Text::Orig((vs, content_end as u32));
                    last.line = Some((ls, content_end as u32));
                }
                if folded.last() != Some(&(headers.len() - 1)) {
                    folded.push(headers.len() - 1);
                }
                pos = le + 1;
                continue;
            }
            if headers.len() >= limits.max_headers {
                return Err(ParseError::TooManyHeaders {
                    limit: limits.max_headers,
                });
            }
            let colon = memchr(b':', &b[pos..content_end])
                .map(|i| pos + i)
                .ok_or(ParseError::HeaderLine)?;
            let (ns, ne) = trim_span(b, pos, colon);
            if ns != pos || ns == ne || !b[ns..ne].iter().all(|&c| is_token_char(c)) {
                return Err(ParseError::HeaderLine);
            }
            let name = HeaderName::from_wire(&b[ns..ne]);
            let mut vs = colon + 1;
            while vs < content_end && matches!(b[vs], b' ' | b'\t') {
                vs += 1;
            }
            headers.push(HeaderField {
                name,
                name_text: Text::Orig(span(ns, ne)),
                value: Text::Orig(span(vs, content_end)),
                line: Some(span(pos, content_end)),
                removed: false,
            });
            pos = le + 1;
        }
        for i in folded {
            // The original line stays (`line`): serialising an untouched header copies it.
            if let Text::Orig((s, e)) = headers[i].value {
                let raw = &b[s as usize..e as usize];
                let text = match std::str::from_utf8(raw) {
                    Ok(text) => Cow::Borrowed(text),
                    // A header the proxy interprets must be UTF-8 (as `validate` checks for
                    // the others); one it only carries is kept as well as it can be.
                    Err(_) if headers[i].name == HeaderName::Other => String::from_utf8_lossy(raw),
                    Err(_) => return Err(ParseError::Encoding),
                };
                headers[i].value = Text::Owned(unfold(&text).into());
            }
        }
        let head = ByteString::try_from(buf.slice(..body_start)).ok();
        let mut msg = Message {
            body: span(body_start, b.len()),
            head,
            buf,
            start,
            start_line,
            start_edited: false,
            headers,
            new_body: None,
        };
        msg.validate()?;
        Ok(msg)
    }

    fn validate(&mut self) -> Result<(), ParseError> {
        // One pass: encoding of every interpreted value, and how many of each header the
        // rules below count.
        const COUNTED: [HeaderName; 7] = [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
            HeaderName::MaxForwards,
            HeaderName::ContentLength,
            HeaderName::Via,
        ];
        let mut counts = [0usize; COUNTED.len()];
        for h in &self.headers {
            if h.name == HeaderName::Other {
                continue;
            }
            if let (Text::Orig(sp), None) = (&h.value, &self.head) {
                self.orig_str(*sp).ok_or(ParseError::Encoding)?;
            }
            if let Some(i) = COUNTED.iter().position(|&n| n == h.name) {
                counts[i] += 1;
            }
        }
        for (i, &name) in COUNTED.iter().enumerate() {
            match (counts[i], i) {
                // From, To, Call-ID, CSeq: exactly one.
                (0, 0..=3) => return Err(ParseError::Missing(name)),
                (2.., 0..=3) => return Err(ParseError::Duplicate(name)),
                // Max-Forwards, Content-Length: at most one.
                (2.., 4..=5) => return Err(ParseError::Duplicate(name)),
                // Via: at least one.
                (0, 6) => return Err(ParseError::Missing(name)),
                _ => {}
            }
        }
        for (idx, _) in self.fields(HeaderName::Via) {
            let v = self.value(idx);
            if !list_is_well_formed(&v) || !split_list(&v).all(|item| Via::parse(item).is_some()) {
                return Err(ParseError::Malformed(HeaderName::Via));
            }
        }
        for name in [HeaderName::From, HeaderName::To] {
            let v = self.value_of(name).unwrap_or_default();
            let na = NameAddr::parse(&v).ok_or(ParseError::Malformed(name))?;
            Uri::parse(na.uri).map_err(|_| ParseError::Malformed(name))?;
        }
        if self
            .value_of(HeaderName::CallId)
            .is_none_or(|c| c.trim().is_empty() || c.contains(char::is_whitespace))
        {
            return Err(ParseError::Malformed(HeaderName::CallId));
        }
        let cseq = self.value_of(HeaderName::CSeq).unwrap_or_default();
        let cseq = CSeq::parse(&cseq).ok_or(ParseError::Malformed(HeaderName::CSeq))?;
        if let StartLine::Request { method_span, .. } = &self.start {
            let m = &self.buf[method_span.0 as usize..method_span.1 as usize];
            if cseq.method.as_bytes() != m {
                return Err(ParseError::CSeqMethod);
            }
        }
        if let Some(mf) = self.value_of(HeaderName::MaxForwards) {
            parse_small_number(&mf, 255).ok_or(ParseError::Malformed(HeaderName::MaxForwards))?;
        }
        if let Some(cl) = self.content_length()? {
            let available = (self.body.1 - self.body.0) as usize;
            if cl > available {
                return Err(ParseError::BodyTruncated);
            }
            // RFC 3261 18.3: bytes beyond Content-Length are discarded.
            self.body.1 = self.body.0 + cl as u32;
        }
        Ok(())
    }

    // ----- reading -----

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, `None` for a response.
    pub fn method(&self) -> Option<Method> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The method token as written (requests), or the CSeq method (responses).
    pub fn method_text(&self) -> Cow<'_, str> {
        match &self.start {
            StartLine::Request { method_span, .. } => self.span_str(*method_span),
            StartLine::Response { .. } => Cow::Owned(self.cseq().method.to_owned()),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn reason(&self) -> Option<Cow<'_, str>> {
        match self.start {
            StartLine::Response { reason, .. } => Some(self.span_str(reason)),
            StartLine::Request { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<Cow<'_, str>> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(self.text(uri)),
            StartLine::Response { .. } => None,
        }
    }

    /// The original bytes the message was parsed from.
    pub fn raw(&self) -> &Bytes {
        &self.buf
    }

    pub fn body(&self) -> &[u8] {
        match &self.new_body {
            Some(b) => b,
            None => &self.buf[self.body.0 as usize..self.body.1 as usize],
        }
    }

    /// The original text of a span when it is UTF-8 (interpreted headers were checked at
    /// parse time; with a UTF-8 head, every span is a slice of it).
    fn orig_str(&self, (s, e): Span) -> Option<&str> {
        match &self.head {
            Some(head) => head.get(s as usize..e as usize),
            None => std::str::from_utf8(&self.buf[s as usize..e as usize]).ok(),
        }
    }

    fn span_str(&self, sp: Span) -> Cow<'_, str> {
        match self.orig_str(sp) {
            Some(text) => Cow::Borrowed(text),
            None => String::from_utf8_lossy(&self.buf[sp.0 as usize..sp.1 as usize]),
        }
    }

    /// An original value never spans lines: folded ones were unfolded at parse time.
    fn text<'s>(&'s self, t: &'s Text) -> Cow<'s, str> {
        match t {
            Text::Owned(s) => Cow::Borrowed(s),
            Text::Orig(sp) => self.span_str(*sp),
        }
    }

    /// All present header fields, in order.
    pub fn headers(&self) -> impl Iterator<Item = (usize, &HeaderField)> {
        self.headers.iter().enumerate().filter(|(_, h)| !h.removed)
    }

    /// Present header fields with the given name.
    pub fn fields(&self, name: HeaderName) -> impl Iterator<Item = (usize, &HeaderField)> {
        self.headers().filter(move |(_, h)| h.name == name)
    }

    /// The (unfolded) value of the header field at `idx`.
    pub fn value(&self, idx: usize) -> Cow<'_, str> {
        self.text(&self.headers[idx].value)
    }

    /// The name of the header field at `idx` as written.
    pub fn name_text(&self, idx: usize) -> Cow<'_, str> {
        self.text(&self.headers[idx].name_text)
    }

    /// Value of the first header with this name.
    pub fn value_of(&self, name: HeaderName) -> Option<Cow<'_, str>> {
        self.fields(name).next().map(|(i, _)| self.value(i))
    }

    /// Every list element of every header with this name, in order (`Via: a, b` + `Via: c`).
    pub fn list_values(&self, name: HeaderName) -> Vec<String> {
        self.fields(name)
            .flat_map(|(i, _)| {
                split_list(&self.value(i))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The topmost Via value (first element of the first Via header).
    pub fn top_via_value(&self) -> Option<Cow<'_, str>> {
        let (idx, _) = self.fields(HeaderName::Via).next()?;
        match self.value(idx) {
            Cow::Borrowed(b) => split_list(b).next().map(Cow::Borrowed),
            Cow::Owned(o) => split_list(&o).next().map(|s| Cow::Owned(s.to_owned())),
        }
    }

    pub fn call_id(&self) -> Cow<'_, str> {
        self.value_of(HeaderName::CallId).unwrap_or_default()
    }

    /// CSeq, validated at parse time.
    pub fn cseq(&self) -> CSeq<'_> {
        let idx = self.fields(HeaderName::CSeq).next().map(|(i, _)| i);
        idx.and_then(|i| match &self.headers[i].value {
            Text::Orig(sp) => self.orig_str(*sp).and_then(CSeq::parse),
            Text::Owned(o) => CSeq::parse(o),
        })
        .unwrap_or(CSeq { seq: 0, method: "" })
    }

    /// Tag parameter of From or To.
    pub fn tag(&self, name: HeaderName) -> Option<String> {
        let v = self.value_of(name)?;
        NameAddr::parse(&v)?.tag().map(str::to_owned)
    }

    /// Max-Forwards, validated at parse time; `None` when absent.
    pub fn max_forwards(&self) -> Option<u32> {
        self.value_of(HeaderName::MaxForwards)
            .and_then(|v| parse_small_number(&v, 255))
    }

    /// Content-Length when present.
    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        match self.value_of(HeaderName::ContentLength) {
            None => Ok(None),
            Some(v) => parse_small_number(&v, u32::MAX)
                .map(|n| Some(n as usize))
                .ok_or(ParseError::Malformed(HeaderName::ContentLength)),
        }
    }

    // ----- editing -----

    /// Replaces the Request-URI (requests only).
    pub fn set_request_uri(&mut self, uri: &str) {
        if let StartLine::Request { uri: u, .. } = &mut self.start {
            *u = Text::Owned(uri.into());
            self.start_edited = true;
        }
    }

    /// Marks a header field as removed.
    pub fn remove(&mut self, idx: usize) {
        self.headers[idx].removed = true;
    }

    /// Replaces the value of a header field, keeping its name as written.
    pub fn replace_value(&mut self, idx: usize, value: String) {
        let h = &mut self.headers[idx];
        h.value = Text::Owned(value.into());
        h.line = None;
    }

    /// Inserts a new header field before position `idx` (`0` = first header).
    pub fn insert(&mut self, idx: usize, name: HeaderName, value: String) {
        self.insert_named(idx, name, name.canonical(), value);
    }

    /// Inserts a header with an explicit name (for headers the proxy does not interpret).
    pub fn insert_named(&mut self, idx: usize, name: HeaderName, text: &str, value: String) {
        let idx = idx.min(self.headers.len());
        self.headers.insert(
            idx,
            HeaderField {
                name,
                name_text: Text::Owned(text.into()),
                value: Text::Owned(value.into()),
                line: None,
                removed: false,
            },
        );
    }

    /// Appends a header at the end of the header section.
    pub fn push(&mut self, name: HeaderName, value: String) {
        let n = self.headers.len();
        self.insert(n, name, value);
    }

    /// Replaces the body; Content-Length is recomputed at serialisation.
    pub fn set_body(&mut self, body: Bytes) {
        self.new_body = Some(body);
    }

    /// Position of the first header with this name, or of the first header when absent.
    pub fn position_of(&self, name: HeaderName) -> Option<usize> {
        self.fields(name).next().map(|(i, _)| i)
    }

    /// Writes the message with all edits applied and a correct Content-Length.
    pub fn serialize(&self) -> Bytes {
        let body = self.body();
        let mut out = BytesMut::with_capacity(self.buf.len() + 256);
        let b = &self.buf[..];
        match (&self.start, self.start_edited) {
            (
                StartLine::Request {
                    method_span, uri, ..
                },
                true,
            ) => {
                out.put_slice(&b[method_span.0 as usize..method_span.1 as usize]);
                out.put_u8(b' ');
                out.put_slice(self.text(uri).as_bytes());
                out.put_slice(b" SIP/2.0");
            }
            _ => out.put_slice(&b[self.start_line.0 as usize..self.start_line.1 as usize]),
        }
        out.put_slice(b"\r\n");
        let mut wrote_length = false;
        for (_, h) in self.headers() {
            if h.name == HeaderName::ContentLength {
                if wrote_length {
                    continue;
                }
                wrote_length = true;
                let current = parse_small_number(&self.text(&h.value), u32::MAX);
                if current != Some(body.len() as u32) || h.line.is_none() {
                    write_content_length(&mut out, body.len());
                    continue;
                }
            }
            match h.line {
                Some((s, e)) => out.put_slice(&b[s as usize..e as usize]),
                None => {
                    out.put_slice(self.text(&h.name_text).as_bytes());
                    out.put_slice(b": ");
                    out.put_slice(self.text(&h.value).as_bytes());
                }
            }
            out.put_slice(b"\r\n");
        }
        if !wrote_length {
            write_content_length(&mut out, body.len());
        }
        out.put_slice(b"\r\n");
        out.put_slice(body);
        out.freeze()
    }
}

fn write_content_length(out: &mut BytesMut, n: usize) {
    out.put_slice(b"Content-Length: ");
    out.put_slice(n.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

fn parse_start_line(b: &[u8], s: usize, e: usize) -> Result<StartLine, ParseError> {
    let line = &b[s..e];
    if line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"SIP/2.0 ") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let rest = &line[8..];
        if rest.len() < 3 || !rest[..3].iter().all(u8::is_ascii_digit) {
            return Err(ParseError::StatusCode);
        }
        let code =
            (rest[0] - b'0') as u16 * 100 + (rest[1] - b'0') as u16 * 10 + (rest[2] - b'0') as u16;
        if !(100..=699).contains(&code) || (rest.len() > 3 && rest[3] != b' ') {
            return Err(ParseError::StatusCode);
        }
        let rs = (s + 8 + 4).min(e);
        return Ok(StartLine::Response {
            code,
            reason: span(rs, e),
        });
    }
    if line.starts_with(b"SIP/") {
        return Err(ParseError::Version);
    }
    // Request-Line = Method SP Request-URI SP SIP-Version
    let sp1 = memchr(b' ', line).ok_or(ParseError::StartLine)?;
    let sp2 = line
        .iter()
        .rposition(|&c| c == b' ')
        .ok_or(ParseError::StartLine)?;
    if sp1 == 0 || !line[..sp1].iter().all(|&c| is_token_char(c)) {
        return Err(ParseError::Method);
    }
    if sp2 <= sp1 + 1 {
        return Err(ParseError::StartLine);
    }
    let version = &line[sp2 + 1..];
    if !version.eq_ignore_ascii_case(b"SIP/2.0") {
        if version.len() > 4 && version[..4].eq_ignore_ascii_case(b"SIP/") {
            return Err(ParseError::Version);
        }
        return Err(ParseError::StartLine);
    }
    let uri = &line[sp1 + 1..sp2];
    let uri_str = std::str::from_utf8(uri).map_err(|_| ParseError::RequestUri)?;
    let parsed = Uri::parse(uri_str).map_err(|_| ParseError::RequestUri)?;
    // RFC 3261 19.1.1 Table 1: headers are not allowed in a Request-URI.
    let sip_like = matches!(parsed.scheme, Scheme::Sip | Scheme::Sips);
    if uri_str.contains(char::is_whitespace)
        || uri_str.contains(['<', '>'])
        || (sip_like && !parsed.headers.is_empty())
    {
        return Err(ParseError::RequestUri);
    }
    Ok(StartLine::Request {
        method: Method::from_wire(&line[..sp1]),
        method_span: span(s, s + sp1),
        uri: Text::Orig(span(s + sp1 + 1, s + sp2)),
    })
}

/// Replaces each line fold (CRLF followed by white space) by one space (RFC 3261 7.3.1).
fn unfold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut lines = s.split('\n');
    if let Some(first) = lines.next() {
        out.push_str(first.trim_end_matches('\r').trim_end());
    }
    for l in lines {
        out.push(' ');
        out.push_str(l.trim_end_matches('\r').trim());
    }
    out
}

/// Parses a decimal number with at most 10 digits and no sign, bounded by `max`.
pub fn parse_small_number(s: &str, max: u32) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = s.parse().ok()?;
    (n <= max as u64).then_some(n as u32)
}

pub(crate) fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&c| c == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@[2001:db8::2] SIP/2.0\r\n\
Via: SIP/2.0/UDP [2001:db8::9]:5060;branch=z9hG4bK776asdhds;received=2001:db8::9\r\n\
v: SIP/2.0/TCP h2.example;branch=z9hG4bKx, SIP/2.0/UDP h3.example\r\n\
Max-Forwards: 70\r\n\
f: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
t: <sip:bob@[2001:db8::2]>\r\n\
i: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
X-Unknown:   keep   me  exactly \r\n\
Subject: folded\r\n  across lines\r\n\
l: 4\r\n\
\r\n\
body";

    fn parse(s: &str) -> Result<Message, ParseError> {
        Message::parse(Bytes::copy_from_slice(s.as_bytes()), &Limits::default())
    }

    #[test]
    fn parses_ipv6_compact_and_folding() {
        let m = parse(INVITE).unwrap();
        assert_eq!(m.method(), Some(Method::Invite));
        assert_eq!(m.request_uri().unwrap(), "sip:bob@[2001:db8::2]");
        assert_eq!(m.list_values(HeaderName::Via).len(), 3);
        assert_eq!(m.call_id(), "a84b4c76e66710@pc33.atlanta.com");
        assert_eq!(m.tag(HeaderName::From).as_deref(), Some("1928301774"));
        assert_eq!(m.body(), b"body");
        let subj = m
            .headers()
            .find(|(i, _)| m.name_text(*i) == "Subject")
            .unwrap()
            .0;
        assert_eq!(m.value(subj), "folded across lines");
    }

    #[test]
    fn untouched_message_round_trips_byte_for_byte() {
        let m = parse(INVITE).unwrap();
        assert_eq!(&m.serialize()[..], INVITE.as_bytes());
    }

    #[test]
    fn edits_apply_once_and_content_length_follows_body() {
        let mut m = parse(INVITE).unwrap();
        m.set_request_uri("sip:bob@192.0.2.4:5070");
        m.insert(
            0,
            HeaderName::Via,
            "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKp".into(),
        );
        let mf = m.position_of(HeaderName::MaxForwards).unwrap();
        m.replace_value(mf, "69".into());
        m.set_body(Bytes::from_static(b"longer body"));
        let out = m.serialize();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("INVITE sip:bob@192.0.2.4:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKp\r\nVia: SIP/2.0/UDP [2001:db8::9]"));
        assert!(text.contains("Max-Forwards: 69\r\n"));
        assert!(text.contains("X-Unknown:   keep   me  exactly \r\n"));
        assert!(text.contains("Content-Length: 11\r\n\r\nlonger body"));
        assert!(!text.contains("l: 4"));
        let again = parse(text).unwrap();
        assert_eq!(again.body(), b"longer body");
    }

    #[test]
    fn response_keeps_reason_phrase() {
        let r = "SIP/2.0 407 Proxy Authentication Required, please\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let m = parse(r).unwrap();
        assert_eq!(m.status(), Some(407));
        assert_eq!(m.reason().unwrap(), "Proxy Authentication Required, please");
        assert_eq!(&m.serialize()[..], r.as_bytes());
    }

    /// Folded values are unfolded once at parse time; a folded header the proxy interprets
    /// must still be UTF-8, one it only carries keeps its bytes on the wire.
    #[test]
    fn folded_values_and_their_encoding() {
        let folded_to = INVITE.replace(
            "t: <sip:bob@[2001:db8::2]>\r\n",
            "t: <sip:bob@[2001:db8::2]>\r\n ;x=1\r\n",
        );
        let m = parse(&folded_to).unwrap();
        assert_eq!(
            m.value_of(HeaderName::To).unwrap(),
            "<sip:bob@[2001:db8::2]> ;x=1"
        );
        let mut bad = folded_to.into_bytes();
        let at = bad.windows(3).position(|w| w == b"x=1").unwrap();
        bad[at + 2] = 0xff;
        assert_eq!(
            Message::parse(Bytes::from(bad), &Limits::default()).unwrap_err(),
            ParseError::Encoding
        );
        let mut other = INVITE.as_bytes().to_vec();
        let at = other.windows(5).position(|w| w == b"lines").unwrap();
        other[at] = 0xff;
        let m = Message::parse(Bytes::from(other.clone()), &Limits::default()).unwrap();
        let subject = m
            .headers()
            .find(|(i, _)| m.name_text(*i) == "Subject")
            .map(|(i, _)| m.value(i).into_owned());
        assert_eq!(subject.as_deref(), Some("folded across \u{fffd}ines"));
        assert_eq!(&m.serialize()[..], &other[..], "carried as it came");
        // Unfolded, the same: a header section that is not all UTF-8 is read span by span.
        let mut raw = INVITE.as_bytes().to_vec();
        let at = raw.windows(4).position(|w| w == b"keep").unwrap();
        raw[at] = 0xff;
        let m = Message::parse(Bytes::from(raw.clone()), &Limits::default()).unwrap();
        assert_eq!(m.cseq().seq, 314159);
        assert_eq!(m.call_id(), "a84b4c76e66710@pc33.atlanta.com");
        assert_eq!(&m.serialize()[..], &raw[..]);
        let at = raw.windows(5).position(|w| w == b"Alice").unwrap();
        raw[at] = 0xff;
        assert_eq!(
            Message::parse(Bytes::from(raw), &Limits::default()).unwrap_err(),
            ParseError::Encoding
        );
    }

    #[test]
    fn limits_and_errors() {
        let limits = Limits {
            max_message_bytes: 10,
            max_headers: 2,
        };
        assert!(matches!(
            Message::parse(Bytes::copy_from_slice(INVITE.as_bytes()), &limits),
            Err(ParseError::TooLarge { .. })
        ));
        let limits = Limits {
            max_message_bytes: 65535,
            max_headers: 2,
        };
        assert!(matches!(
            Message::parse(Bytes::copy_from_slice(INVITE.as_bytes()), &limits),
            Err(ParseError::TooManyHeaders { .. })
        ));
        assert_eq!(
            parse(&INVITE.replace("CSeq: 314159 INVITE", "CSeq: 314159 BYE")).unwrap_err(),
            ParseError::CSeqMethod
        );
        assert_eq!(
            parse(&INVITE.replace("l: 4", "l: 40")).unwrap_err(),
            ParseError::BodyTruncated
        );
        assert_eq!(
            parse(&INVITE.replace("i: a84b4c76e66710@pc33.atlanta.com\r\n", "")).unwrap_err(),
            ParseError::Missing(HeaderName::CallId)
        );
        assert_eq!(
            parse(&INVITE.replace("SIP/2.0\r\n", "SIP/7.0\r\n")).unwrap_err(),
            ParseError::Version
        );
    }

    #[test]
    fn unknown_method_is_accepted() {
        let m = parse(&INVITE.replace("INVITE", "FOOBAR")).unwrap();
        assert_eq!(m.method(), Some(Method::Other));
        assert_eq!(m.method_text(), "FOOBAR");
    }

    #[test]
    fn lf_only_line_ends() {
        let m = parse(&INVITE.replace("\r\n", "\n")).unwrap();
        assert_eq!(m.body(), b"body");
        assert_eq!(m.cseq().seq, 314159);
    }
}
