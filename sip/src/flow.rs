//! Where a message came from and where one goes: the vocabulary shared by the sans-IO
//! core and the transport driver.

use std::fmt;
use std::net::SocketAddr;

/// SIP transport protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// Reliable transports need no retransmission timers (RFC 3261 section 17).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// Token used in Via (`SIP/2.0/UDP`).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The transport's name in lower case (`udp`, `tcp`, `tls`): stored records, flow tokens,
    /// metric labels.
    pub fn token(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Value of the URI `transport` parameter, `None` for UDP (the default).
    pub fn uri_param(self) -> Option<&'static str> {
        match self {
            Transport::Udp => None,
            Transport::Tcp => Some("tcp"),
            Transport::Tls => Some("tls"),
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            _ => 5060,
        }
    }

    /// Parses a Via transport token or URI transport parameter.
    pub fn from_token(t: &str) -> Option<Transport> {
        if t.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if t.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if t.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.via_token())
    }
}

/// Identifier of a TCP or TLS connection owned by the transport driver.
pub type ConnId = u64;

/// A transport flow: the path a message arrived on, and the path its responses go back on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    /// Local address the message arrived at (the listener or connection's local end).
    pub local: SocketAddr,
    /// Remote address (source of a request, RFC 3581 target of its responses).
    pub remote: SocketAddr,
    /// The connection for TCP/TLS flows.
    pub conn: Option<ConnId>,
}

/// Where the core wants a message sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Back along an existing flow (responses; requests on a known connection).
    Flow(Flow),
    /// A next hop by address: the driver reuses a connection to it or opens one.
    Addr {
        transport: Transport,
        addr: SocketAddr,
        server_name: Option<Box<str>>,
    },
    /// A next hop by host name: located through DNS (RFC 3263, [`crate::locate`]) before a
    /// request is sent, or resolved by the driver for a stateless message.
    Name {
        host: Box<str>,
        /// The URI's port; `None` lets DNS SRV choose.
        port: Option<u16>,
        /// The URI's `transport=`; `None` lets DNS NAPTR/SRV choose.
        transport: Option<Transport>,
        /// A `sips:` URI: TLS only.
        secure: bool,
    },
}

impl Destination {
    /// The RFC 3263 question for a next hop named by host.
    pub fn query(&self) -> Option<crate::locate::Query> {
        match self {
            Destination::Name {
                host,
                port,
                transport,
                secure,
            } => Some(crate::locate::Query {
                host: host.to_string(),
                port: *port,
                transport: *transport,
                secure: *secure,
            }),
            _ => None,
        }
    }

    /// The transport a message to this destination uses, as far as it is known before DNS:
    /// a name's fixed transport, TLS for `sips:`, else UDP.
    pub fn transport(&self) -> Transport {
        match self {
            Destination::Flow(f) => f.transport,
            Destination::Addr { transport, .. } => *transport,
            Destination::Name {
                transport, secure, ..
            } => {
                if *secure {
                    Transport::Tls
                } else {
                    transport.unwrap_or(Transport::Udp)
                }
            }
        }
    }
}
