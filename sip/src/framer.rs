//! Framing of SIP over a byte stream (TCP, TLS): RFC 3261 section 18.3 (Content-Length,
//! also in compact form `l:`) and the CRLF keep-alives of RFC 5626 section 3.5.1.

use bytes::{Buf, Bytes, BytesMut};

use super::message::{memchr, parse_small_number};

/// One unit read off a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message, header section and `Content-Length` bytes of body.
    Message(Bytes),
    /// A double-CRLF keep-alive ping; the peer expects a single CRLF pong.
    Ping,
}

/// Why a stream cannot be framed any further; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header section longer than {0} bytes")]
    HeaderTooLong(usize),
    #[error("missing or malformed Content-Length on a stream")]
    ContentLength,
    #[error("message longer than {0} bytes")]
    TooLarge(usize),
}

/// Accumulates stream bytes and cuts them into frames.
#[derive(Debug)]
pub struct StreamFramer {
    buf: BytesMut,
    max_message: usize,
    /// Bytes of `buf` already searched for the end of the header section without finding
    /// it: a message that arrives a byte at a time is scanned once, not once per byte.
    scanned: usize,
}

impl StreamFramer {
    pub fn new(max_message: usize) -> Self {
        StreamFramer {
            buf: BytesMut::with_capacity(4096),
            max_message,
            scanned: 0,
        }
    }

    /// Bytes of a message that has begun but is not complete (0 between messages). The
    /// connection applies its header-read deadline while this is not 0.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The buffer to read into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        // Leading CRLFs: "\r\n\r\n" is a ping; a lone "\r\n" is a pong we discard.
        let mut skip = 0;
        while skip < self.buf.len() && matches!(self.buf[skip], b'\r' | b'\n') {
            skip += 1;
        }
        if skip > 0 {
            let crlfs = &self.buf[..skip];
            let is_ping = crlfs.windows(4).any(|w| w == b"\r\n\r\n");
            if skip == self.buf.len() && !is_ping && skip < 4 {
                // Maybe the start of a ping; wait for more unless it is a complete pong.
                if crlfs == b"\r\n" {
                    self.buf.advance(skip);
                }
                return Ok(None);
            }
            self.buf.advance(skip);
            self.scanned = 0;
            if is_ping {
                return Ok(Some(Frame::Ping));
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        // Resume where the last search stopped (less the 3 bytes a CRLFCRLF may straddle).
        let from = self.scanned.saturating_sub(3);
        let Some(header_end) = find_header_end(&self.buf[from..]).map(|e| e + from) else {
            if self.buf.len() > self.max_message {
                return Err(FrameError::HeaderTooLong(self.max_message));
            }
            self.scanned = self.buf.len();
            return Ok(None);
        };
        let length = content_length(&self.buf[..header_end])?;
        let total = header_end + length;
        if total > self.max_message {
            return Err(FrameError::TooLarge(self.max_message));
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.scanned = 0;
        Ok(Some(Frame::Message(self.buf.split_to(total).freeze())))
    }
}

/// Index just past the blank line that ends the header section (CRLFCRLF or LFLF).
fn find_header_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = memchr(b'\n', &b[i..]) {
        let at = i + nl + 1;
        match b.get(at) {
            Some(b'\n') => return Some(at + 1),
            Some(b'\r') if b.get(at + 1) == Some(&b'\n') => return Some(at + 2),
            None => return None,
            _ => i = at,
        }
    }
    None
}

/// Content-Length from a header section; required on streams (RFC 3261 18.3).
fn content_length(head: &[u8]) -> Result<usize, FrameError> {
    for line in head.split(|&c| c == b'\n') {
        let Some(colon) = memchr(b':', line) else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let v =
                std::str::from_utf8(&line[colon + 1..]).map_err(|_| FrameError::ContentLength)?;
            return parse_small_number(v, u32::MAX)
                .map(|n| n as usize)
                .ok_or(FrameError::ContentLength);
        }
    }
    Err(FrameError::ContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(f: &mut StreamFramer, b: &[u8]) {
        f.buffer().extend_from_slice(b);
    }

    #[test]
    fn frames_split_and_pipelined_messages() {
        let m1 = b"OPTIONS sip:a SIP/2.0\r\nl: 3\r\n\r\nabc";
        let m2 = b"OPTIONS sip:b SIP/2.0\r\nContent-Length: 0\r\n\r\n";
        let mut f = StreamFramer::new(65535);
        feed(&mut f, &m1[..10]);
        assert_eq!(f.next_frame(), Ok(None));
        feed(&mut f, &m1[10..]);
        feed(&mut f, m2);
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::Message(Bytes::from_static(m1))))
        );
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::Message(Bytes::from_static(m2))))
        );
        assert_eq!(f.next_frame(), Ok(None));
    }

    #[test]
    fn keepalives() {
        let mut f = StreamFramer::new(65535);
        feed(&mut f, b"\r\n\r\n");
        assert_eq!(f.next_frame(), Ok(Some(Frame::Ping)));
        feed(&mut f, b"\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        feed(&mut f, b"OPTIONS sip:a SIP/2.0\r\nl: 0\r\n\r\n");
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Message(_)))));
    }

    #[test]
    fn stream_errors() {
        let mut f = StreamFramer::new(64);
        feed(&mut f, b"OPTIONS sip:a SIP/2.0\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::ContentLength));
        let mut f = StreamFramer::new(64);
        feed(&mut f, b"OPTIONS sip:a SIP/2.0\r\nl: 1000\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::TooLarge(64)));
        let mut f = StreamFramer::new(16);
        feed(&mut f, &[b'x'; 40]);
        assert_eq!(f.next_frame(), Err(FrameError::HeaderTooLong(16)));
    }
}
