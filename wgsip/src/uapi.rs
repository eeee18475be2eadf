//! The WireGuard cross-platform UAPI (wireguard-go, boringtun): one request per connection to
//! `/var/run/wireguard/IFNAME.sock`, `key=value` lines, an empty line ends the request; the reply
//! ends with an empty line and its last line is `errno=N` (0 = success). Keys are lowercase
//! hex on the socket.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// UAPI errors.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("cannot reach {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("uapi i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon refused the request (errno={0})")]
    Errno(i64),
    #[error("the daemon's reply has no errno line")]
    NoErrno,
}

/// Lowercase hex of a key.
pub fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// One peer to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    /// `None` = no PSK (all zeros on the socket).
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
}

/// Renders a `set=1` request that sets the interface key and port and adds or replaces a peer.
pub fn render_set(
    private_key: Option<&[u8; 32]>,
    listen_port: Option<u16>,
    peer: Option<&PeerConfig>,
) -> String {
    let mut s = String::from("set=1\n");
    if let Some(k) = private_key {
        // The private key first: boringtun wedges when a peer comes before it.
        s.push_str(&format!("private_key={}\n", hex(k)));
    }
    if let Some(p) = listen_port {
        s.push_str(&format!("listen_port={p}\n"));
    }
    if let Some(peer) = peer {
        s.push_str(&format!("public_key={}\n", hex(&peer.public_key)));
        s.push_str(&format!(
            "preshared_key={}\n",
            hex(&peer.preshared_key.unwrap_or([0; 32]))
        ));
        if let Some(ep) = peer.endpoint {
            s.push_str(&format!("endpoint={ep}\n"));
        }
        s.push_str("replace_allowed_ips=true\n");
        for ip in &peer.allowed_ips {
            s.push_str(&format!("allowed_ip={ip}\n"));
        }
    }
    s.push('\n');
    s
}

/// Renders the removal of a peer.
pub fn render_remove(public_key: &[u8; 32]) -> String {
    format!("set=1\npublic_key={}\nremove=true\n\n", hex(public_key))
}

/// Parses a reply: the `key=value` lines, checking the final `errno`.
pub fn parse_reply(reply: &str) -> Result<Vec<(String, String)>, UapiError> {
    let pairs: Vec<(String, String)> = reply
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    match pairs.last() {
        Some((k, v)) if k == "errno" => match v.trim().parse::<i64>() {
            Ok(0) => Ok(pairs[..pairs.len() - 1].to_vec()),
            Ok(n) => Err(UapiError::Errno(n)),
            Err(_) => Err(UapiError::NoErrno),
        },
        _ => Err(UapiError::NoErrno),
    }
}

/// A peer as `get=1` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: String,
    pub preshared_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub last_handshake_time_sec: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Peers of a `get=1` reply.
pub fn parse_peers(pairs: &[(String, String)]) -> Vec<PeerStatus> {
    let mut peers: Vec<PeerStatus> = Vec::new();
    for (k, v) in pairs {
        if k == "public_key" {
            peers.push(PeerStatus {
                public_key: v.clone(),
                ..PeerStatus::default()
            });
            continue;
        }
        let Some(p) = peers.last_mut() else { continue };
        match k.as_str() {
            "preshared_key" => p.preshared_key = v.clone(),
            "endpoint" => p.endpoint = Some(v.clone()),
            "allowed_ip" => p.allowed_ips.push(v.clone()),
            "last_handshake_time_sec" => p.last_handshake_time_sec = v.parse().unwrap_or(0),
            "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
            "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    peers
}

/// A WireGuard interface reached through its UAPI socket.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub socket: PathBuf,
}

impl Interface {
    pub fn new(name: &str) -> Interface {
        Interface {
            name: name.to_owned(),
            socket: PathBuf::from(format!("/var/run/wireguard/{name}.sock")),
        }
    }

    fn request(&self, req: &str) -> Result<Vec<(String, String)>, UapiError> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| UapiError::Connect(self.socket.clone(), e))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req.as_bytes())?;
        let mut reply = String::new();
        let mut reader = BufReader::new(s);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\n" {
                break;
            }
            reply.push_str(&line);
        }
        parse_reply(&reply)
    }

    pub fn set(
        &self,
        private_key: Option<&[u8; 32]>,
        listen_port: Option<u16>,
        peer: Option<&PeerConfig>,
    ) -> Result<(), UapiError> {
        self.request(&render_set(private_key, listen_port, peer))
            .map(|_| ())
    }

    pub fn remove_peer(&self, public_key: &[u8; 32]) -> Result<(), UapiError> {
        self.request(&render_remove(public_key)).map(|_| ())
    }

    pub fn peers(&self) -> Result<Vec<PeerStatus>, UapiError> {
        self.request("get=1\n\n").map(|p| parse_peers(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_peer_with_key_first() {
        let peer = PeerConfig {
            public_key: [0xab; 32],
            preshared_key: Some([1; 32]),
            endpoint: Some("[2001:db8::2]:51820".parse().unwrap()),
            allowed_ips: vec!["2001:db8:456:1::/64".parse().unwrap()],
        };
        let r = render_set(Some(&[0x11; 32]), Some(51820), Some(&peer));
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "set=1");
        assert!(lines[1].starts_with("private_key=1111"));
        assert_eq!(lines[2], "listen_port=51820");
        assert_eq!(lines[3], format!("public_key={}", "ab".repeat(32)));
        assert_eq!(lines[4], format!("preshared_key={}", "01".repeat(32)));
        assert_eq!(lines[5], "endpoint=[2001:db8::2]:51820");
        assert_eq!(lines[6], "replace_allowed_ips=true");
        assert_eq!(lines[7], "allowed_ip=2001:db8:456:1::/64");
        assert!(r.ends_with("\n\n"));
        let none = render_set(
            None,
            None,
            Some(&PeerConfig {
                preshared_key: None,
                ..peer
            }),
        );
        assert!(none.contains(&format!("preshared_key={}", "00".repeat(32))));
        assert_eq!(
            render_remove(&[2; 32]),
            format!("set=1\npublic_key={}\nremove=true\n\n", "02".repeat(32))
        );
    }

    #[test]
    fn replies_and_errno() {
        assert!(parse_reply("errno=0\n").unwrap().is_empty());
        assert!(
            matches!(parse_reply("errno=-22\n"), Err(UapiError::Errno(-22))),
            "wireguard-go"
        );
        assert!(
            matches!(parse_reply("errno=22\n"), Err(UapiError::Errno(22))),
            "boringtun"
        );
        assert!(matches!(parse_reply(""), Err(UapiError::NoErrno)));
        assert!(matches!(
            parse_reply("private_key=00\n"),
            Err(UapiError::NoErrno)
        ));
        let pairs = parse_reply(
            "private_key=11\nlisten_port=51820\npublic_key=ab\npreshared_key=01\nendpoint=[2001:db8::2]:51820\n\
allowed_ip=2001:db8:456:1::/64\nlast_handshake_time_sec=17\nrx_bytes=92\ntx_bytes=148\nerrno=0\n",
        )
        .unwrap();
        let peers = parse_peers(&pairs);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].preshared_key, "01");
        assert_eq!(peers[0].allowed_ips, vec!["2001:db8:456:1::/64".to_owned()]);
        assert_eq!(
            (
                peers[0].last_handshake_time_sec,
                peers[0].rx_bytes,
                peers[0].tx_bytes
            ),
            (17, 92, 148)
        );
    }
}
