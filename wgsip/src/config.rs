//! wgsip configuration (TOML, unknown keys refused). Secret files (password, private key)
//! must be mode 0600 or they are refused.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use ipnet::IpNet;
use serde::Deserialize;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sip {
    /// The gateway's SIP address (one gateway, or the load balancer in front of several).
    #[serde(default)]
    pub gateway: Option<SocketAddr>,
    /// Several gateways of a cluster, instead of `gateway`: an endpoint registers through
    /// each of them (one flow per gateway, RFC 5626 `reg-id` 1, 2, ...) and stays reachable
    /// while any one lives; a caller tries them in order until one answers.
    #[serde(default)]
    pub gateways: Vec<SocketAddr>,
    /// Local SIP address to bind.
    pub bind: SocketAddr,
    /// The AOR this side presents (From for a caller, the registered AOR for an endpoint).
    pub aor: String,
    pub username: String,
    pub password_file: PathBuf,
    #[serde(default = "default_expires")]
    pub expires: u32,
    /// `tls` (default; SCRAM-SHA-256-PLUS with tls-exporter channel binding) or `udp`
    /// (SCRAM-SHA-256).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// Trust anchor (PEM) for the gateway's certificate (TLS).
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the gateway's certificate (default: its address).
    pub tls_server_name: Option<String>,
}

/// At most this many gateways in `sip.gateways`.
pub const MAX_GATEWAYS: usize = 8;

impl Sip {
    /// The gateways, in order (`gateway`, or the `gateways` list).
    pub fn gateway_list(&self) -> Vec<SocketAddr> {
        self.gateway
            .into_iter()
            .chain(self.gateways.iter().copied())
            .collect()
    }

    /// The settings of the flow through the `n`-th gateway: that gateway alone, and over UDP
    /// a local port of its own (`bind`'s port + n; 0 stays 0, any free port): each flow is
    /// its own binding at the registrar.
    pub fn for_gateway(&self, n: usize) -> Sip {
        let mut one = self.clone();
        one.gateway = self.gateway_list().get(n).copied();
        one.gateways = Vec::new();
        if one.bind.port() != 0 {
            one.bind.set_port(one.bind.port().saturating_add(n as u16));
        }
        one
    }
}

/// TLS by default (SCRAM-SHA-256-PLUS); UDP only when the configuration says so.
fn default_transport() -> String {
    "tls".into()
}

fn default_expires() -> u32 {
    600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireGuard {
    pub interface: String,
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    /// The WireGuard UDP address announced in SDP (`c=`).
    pub address: IpAddr,
    /// The prefix routed into the tunnel towards this side (`prefix=`).
    pub prefix: IpNet,
    /// Address to put on the interface (optional).
    pub interface_address: Option<IpNet>,
    /// Start `wireguard-go` for the interface when its socket is missing.
    #[serde(default)]
    pub start_daemon: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    /// pskmth values the endpoint accepts in an offer.
    #[serde(default = "default_accept")]
    pub pskmth: Vec<String>,
    /// Prefixes callers may claim.
    pub prefixes: Vec<IpNet>,
}

fn default_accept() -> Vec<String> {
    vec!["gateway".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// pskmth list offered, in preference order.
    #[serde(default = "default_offer")]
    pub pskmth: Vec<String>,
    /// Realm crossover (docs/realm-crossover.md): the base64 HPKE public key of this caller's
    /// home realm (`gatehouse xover-key` prints it). When set, the caller authenticates with
    /// SXOVER-PLUS against its home through the gateway it calls (TLS only), and offers
    /// `pskmth=xover` unless `pskmth` says otherwise.
    #[serde(default)]
    pub home_key: Option<String>,
    /// The identity at the home (`user@realm`); default: `username@` the host of `sip.aor`.
    #[serde(default)]
    pub identity: Option<String>,
}

fn default_offer() -> Vec<String> {
    vec!["scram".into()]
}

impl Default for Call {
    fn default() -> Self {
        Call {
            pskmth: default_offer(),
            home_key: None,
            identity: None,
        }
    }
}

/// An endpoint or caller configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub sip: Sip,
    pub wireguard: WireGuard,
    /// Endpoint role: what it accepts.
    pub accept: Option<Accept>,
    /// Caller role: what it offers.
    #[serde(default)]
    pub call: Call,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut c: Config = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
            anyhow::anyhow!("{}:{line}: {}", path.display(), e.message())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.sip.password_file, &mut c.wireguard.private_key_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = c.sip.tls_ca.as_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        match (c.sip.gateway, c.sip.gateways.len()) {
            (Some(_), 0) | (None, 1..=MAX_GATEWAYS) => {}
            (Some(_), _) => bail!(
                "{}: sip.gateway and sip.gateways: name one gateway, or list several",
                path.display()
            ),
            (None, 0) => bail!(
                "{}: sip.gateway (or sip.gateways) is missing",
                path.display()
            ),
            (None, n) => bail!(
                "{}: sip.gateways lists {n} gateways (at most {MAX_GATEWAYS})",
                path.display()
            ),
        }
        let list = c.sip.gateway_list();
        if (1..list.len()).any(|i| list[..i].contains(&list[i])) {
            bail!("{}: sip.gateways lists a gateway twice", path.display());
        }
        match c.sip.transport.as_str() {
            "udp" => {}
            "tls" if c.sip.tls_ca.is_some() => {}
            "tls" => bail!(
                "{}: sip.transport = \"tls\" needs sip.tls_ca",
                path.display()
            ),
            other => bail!("{}: sip.transport `{other}` (udp or tls)", path.display()),
        }
        Ok(c)
    }
}

/// Reads a secret file, refusing one that others can read.
pub fn read_secret(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:o}: secrets files must be 0600",
            path.display()
        );
    }
    let text = Zeroizing::new(std::fs::read_to_string(path)?);
    Ok(Zeroizing::new(
        text.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

/// Reads a base64 X25519 private key (as `wg genkey` writes it) from a 0600 file, or creates one.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        let secret = x25519_dalek::StaticSecret::from(key);
        std::fs::write(path, format!("{}\n", b64.encode(secret.to_bytes())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let text = read_secret(path)?;
    let bytes = b64
        .decode(text.as_bytes())
        .context("private key is not base64")?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("private key is not 32 bytes"))?;
    Ok(Zeroizing::new(
        x25519_dalek::StaticSecret::from(key).to_bytes(),
    ))
}

/// The public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*private)).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(sip: &str) -> anyhow::Result<Config> {
        let d =
            std::env::temp_dir().join(format!("wgsip-config-{}-{}", std::process::id(), sip.len()));
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("endpoint.toml");
        std::fs::write(
            &path,
            format!(
                "[sip]\n{sip}transport = \"udp\"\nbind = \"192.0.2.2:5070\"\naor = \"sip:vpn@org.example\"\n\
username = \"vpn\"\npassword_file = \"vpn.password\"\n[wireguard]\ninterface = \"wg0\"\n\
private_key_file = \"org.key\"\nlisten_port = 51820\naddress = \"192.0.2.2\"\nprefix = \"2001:db8::/64\"\n"
            ),
        )
        .unwrap();
        Config::load(&path)
    }

    #[test]
    fn one_gateway_or_a_list_of_distinct_ones() {
        let one = load("gateway = \"192.0.2.11:5060\"\n").unwrap();
        assert_eq!(one.sip.gateway_list().len(), 1);
        let two = load("gateways = [\"192.0.2.11:5060\", \"192.0.2.12:5060\"]\n").unwrap();
        // Each flow its own gateway and, over UDP, its own local port.
        let second = two.sip.for_gateway(1);
        assert_eq!(
            second.gateway_list(),
            ["192.0.2.12:5060".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(second.bind.port(), 5071);
        assert_eq!(two.sip.for_gateway(0).bind.port(), 5070);
        for (bad, says) in [
            ("", "is missing"),
            (
                "gateway = \"192.0.2.11:5060\"\ngateways = [\"192.0.2.12:5060\"]\n",
                "or list several",
            ),
            (
                "gateways = [\"192.0.2.11:5060\", \"192.0.2.11:5060\"]\n",
                "twice",
            ),
        ] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
