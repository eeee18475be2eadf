//! A minimal SIP client for system tests: one connection (UDP, TCP or TLS), send text,
//! receive parsed messages with a time limit, and the TLS exporter for -PLUS.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;

use bytes::Bytes;
use gatehouse_sip::framer::{Frame, StreamFramer};
use gatehouse_sip::{Limits, Message};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::harness::WAIT;

enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

pub struct SipClient {
    conn: Conn,
    framer: StreamFramer,
    pub local: SocketAddr,
}

impl SipClient {
    pub fn udp(gw: SocketAddr) -> SipClient {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let local = s.local_addr().unwrap();
        SipClient {
            conn: Conn::Udp(s, gw),
            framer: StreamFramer::new(65535),
            local,
        }
    }

    pub fn tcp(gw: SocketAddr) -> SipClient {
        let s = TcpStream::connect(gw).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let local = s.local_addr().unwrap();
        SipClient {
            conn: Conn::Tcp(s),
            framer: StreamFramer::new(65535),
            local,
        }
    }

    pub fn tls(gw: SocketAddr, ca: CertificateDer<'static>) -> SipClient {
        SipClient::tls_over(TcpStream::connect(gw).unwrap(), ca)
    }

    /// A TLS client whose connection comes from `local_ip` (another loopback address: another
    /// subscriber).
    pub fn tls_from(gw: SocketAddr, ca: CertificateDer<'static>, local_ip: IpAddr) -> SipClient {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(gw),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        sock.bind(&SocketAddr::new(local_ip, 0).into()).unwrap();
        sock.connect(&gw.into()).unwrap();
        SipClient::tls_over(sock.into(), ca)
    }

    fn tls_over(tcp: TcpStream, ca: CertificateDer<'static>) -> SipClient {
        let conn = tls_connection(ca);
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let local = tcp.local_addr().unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // Finish the handshake now so that the exporter is available.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        SipClient {
            conn: Conn::Tls(Box::new(stream)),
            framer: StreamFramer::new(65535),
            local,
        }
    }

    /// Via transport token of this connection.
    pub fn transport(&self) -> &'static str {
        match self.conn {
            Conn::Udp(..) => "UDP",
            Conn::Tcp(_) => "TCP",
            Conn::Tls(_) => "TLS",
        }
    }

    /// RFC 9266 tls-exporter bytes (TLS only).
    pub fn exporter(&self) -> Option<Vec<u8>> {
        match &self.conn {
            Conn::Tls(s) => {
                let mut out = vec![0u8; 32];
                s.conn
                    .export_keying_material(&mut out[..], b"EXPORTER-Channel-Binding", None)
                    .ok()?;
                Some(out)
            }
            _ => None,
        }
    }

    pub fn send(&mut self, msg: &str) {
        match &mut self.conn {
            Conn::Udp(s, to) => {
                s.send_to(msg.as_bytes(), *to).unwrap();
            }
            Conn::Tcp(s) => s.write_all(msg.as_bytes()).unwrap(),
            Conn::Tls(s) => {
                s.write_all(msg.as_bytes()).unwrap();
                s.flush().unwrap();
            }
        }
    }

    /// The next message (responses and requests alike), or a panic after WAIT.
    pub fn recv(&mut self) -> Message {
        let mut buf = vec![0u8; 65535];
        loop {
            if let Conn::Udp(s, _) = &self.conn {
                let n = s.recv(&mut buf).expect("datagram within the time limit");
                return Message::parse(Bytes::copy_from_slice(&buf[..n]), &Limits::default())
                    .expect("parsable");
            }
            if let Some(Frame::Message(b)) = self.framer.next_frame().expect("framing") {
                return Message::parse(b, &Limits::default()).expect("parsable");
            }
            let n = match &mut self.conn {
                Conn::Tcp(s) => s.read(&mut buf).expect("read within the time limit"),
                Conn::Tls(s) => s.read(&mut buf).expect("read within the time limit"),
                Conn::Udp(..) => 0,
            };
            assert!(n > 0, "connection closed by the gateway");
            self.framer.buffer().extend_from_slice(&buf[..n]);
        }
    }

    /// The next response, skipping 100 Trying.
    pub fn recv_final_or_challenge(&mut self) -> Message {
        loop {
            let m = self.recv();
            if m.status() != Some(100) {
                return m;
            }
        }
    }
}

/// A rustls client connection to `localhost` trusting `ca` (ring provider).
pub fn tls_connection(ca: CertificateDer<'static>) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
        .unwrap()
}

/// Value of the first header with this name (case-insensitive), as text.
pub fn header(m: &Message, name: &str) -> Option<String> {
    m.headers()
        .find(|(i, _)| m.name_text(*i).eq_ignore_ascii_case(name))
        .map(|(i, _)| m.value(i).into_owned())
}
