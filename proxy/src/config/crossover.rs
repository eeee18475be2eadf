//! `[crossover]` and `[crossover.home]`: realm crossover (docs/realm-crossover.md).
//!
//! ```toml
//! [crossover]                       # foreign side: callers from other realms, their home vouches
//! enabled = true                    # offer SXOVER-PLUS (TLS connections only)
//! realms = ["partner.example"]      # homes we relay to; ["any"] (the default) for every realm
//! certificate = "xover-client.pem"  # our client certificate: names our SIP domain(s)
//! private_key = "xover-client.key"
//! trusted_cas = "xover-cas.pem"     # anchors for homes' server certificates (and, on the
//!                                   # home side, for foreign gateways' client certificates)
//! deadline_ms = 5000                # a home that has not answered by then: 403, that call only
//! max_pending = 1024                # relays waiting for a home, in all
//! max_pending_per_realm = 64        # ... for one realm
//! allow_private = false             # homes at private/loopback addresses (tests, closed nets)
//! [crossover.homes]                 # pinned home addresses, instead of DNS _sxover._tcp.REALM
//! "partner.example" = "192.0.2.7:8443"
//!
//! [crossover.home]                  # home side: our users authenticate for foreign gateways
//! listen = "0.0.0.0:8443"           # HTTPS with the [tls] certificate (it must name our realm)
//! key_file = "xover-home.key"       # HPKE private key (gatehouse xover-key FILE makes one)
//! previous_key_file = "old.key"     # during a rotation: still opens exchanges sealed to it
//! foreign_domains = ["org.example"] # who may ask; ["any"] for every verified domain
//! rate_per_domain = 20              # relayed rounds per second per foreign domain (burst 4x)
//! max_pending = 1024                # exchanges between rounds
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrossover {
    #[serde(default)]
    enabled: bool,
    realms: Option<Spanned<Vec<String>>>,
    certificate: Option<Spanned<PathBuf>>,
    private_key: Option<Spanned<PathBuf>>,
    trusted_cas: Option<Spanned<PathBuf>>,
    deadline_ms: Option<Spanned<u64>>,
    max_pending: Option<Spanned<usize>>,
    max_pending_per_realm: Option<Spanned<usize>>,
    #[serde(default)]
    allow_private: bool,
    #[serde(default)]
    homes: BTreeMap<String, Spanned<String>>,
    home: Option<RawHome>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHome {
    listen: Spanned<String>,
    key_file: Spanned<PathBuf>,
    previous_key_file: Option<Spanned<PathBuf>>,
    foreign_domains: Spanned<Vec<String>>,
    rate_per_domain: Option<Spanned<u32>>,
    max_pending: Option<Spanned<usize>>,
}

/// Realms or domains a side accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Any,
    Only(Vec<String>),
}

impl Allowed {
    pub fn admits(&self, name: &str) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Only(list) => list.iter().any(|n| n.eq_ignore_ascii_case(name)),
        }
    }
}

/// The foreign side (relaying for callers of other realms).
#[derive(Debug, Clone)]
pub struct CrossoverSettings {
    pub realms: Allowed,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub trusted_cas: PathBuf,
    pub deadline: Duration,
    pub max_pending: usize,
    pub max_pending_per_realm: usize,
    pub allow_private: bool,
    /// Pinned home addresses by realm (instead of DNS).
    pub homes: BTreeMap<String, SocketAddr>,
}

/// The home side (authenticating our users for foreign gateways).
#[derive(Debug, Clone)]
pub struct HomeSettings {
    pub listen: SocketAddr,
    pub key_file: PathBuf,
    pub previous_key_file: Option<PathBuf>,
    pub foreign_domains: Allowed,
    pub rate_per_domain: u32,
    pub max_pending: usize,
    /// Anchors for foreign gateways' client certificates (`[crossover] trusted_cas`).
    pub trusted_cas: PathBuf,
}

fn names(
    cx: &Ctx<'_>,
    list: &Spanned<Vec<String>>,
    key: &str,
    default_any: bool,
) -> Result<Allowed, ConfigError> {
    let v = list.get_ref();
    if v.is_empty() && !default_any {
        return Err(cx.err(list.span(), key, "list names or [\"any\"]"));
    }
    if v.iter().any(|n| n == "any") {
        if v.len() > 1 {
            return Err(cx.err(list.span(), key, "`any` stands alone"));
        }
        return Ok(Allowed::Any);
    }
    for n in v {
        if !gatehouse_auth::xover::valid_realm(n) {
            return Err(cx.err(
                list.span(),
                key,
                format!("`{n}` is not a domain name (lower case)"),
            ));
        }
    }
    Ok(Allowed::Only(v.clone()))
}

impl RawCrossover {
    /// Validates both sides. `resolve` makes relative paths relative to the file.
    pub(super) fn validate(
        &self,
        cx: &Ctx<'_>,
        resolve: &dyn Fn(&std::path::Path) -> PathBuf,
        has_tls: bool,
    ) -> Result<(Option<CrossoverSettings>, Option<HomeSettings>), ConfigError> {
        let cas = self.trusted_cas.as_ref().map(|p| resolve(p.get_ref()));
        let home = match &self.home {
            None => None,
            Some(h) => {
                let listen: SocketAddr = h.listen.get_ref().parse().map_err(|_| {
                    cx.err(h.listen.span(), "crossover.home.listen", "expected IP:port")
                })?;
                if !has_tls {
                    return Err(cx.err(
                        h.listen.span(),
                        "crossover.home.listen",
                        "the crossover service is HTTPS: it needs the [tls] table (a certificate naming the realm)",
                    ));
                }
                let Some(trusted_cas) = cas.clone() else {
                    return Err(cx.err(
                        h.listen.span(),
                        "crossover.trusted_cas",
                        "the home verifies foreign gateways' client certificates: set crossover.trusted_cas",
                    ));
                };
                Some(HomeSettings {
                    listen,
                    key_file: resolve(h.key_file.get_ref()),
                    previous_key_file: h.previous_key_file.as_ref().map(|p| resolve(p.get_ref())),
                    foreign_domains: names(
                        cx,
                        &h.foreign_domains,
                        "crossover.home.foreign_domains",
                        false,
                    )?,
                    rate_per_domain: match &h.rate_per_domain {
                        Some(v) => {
                            cx.range(v, "crossover.home.rate_per_domain", 1, 100_000, "/s")?
                        }
                        None => 20,
                    },
                    max_pending: match &h.max_pending {
                        Some(v) => cx.range(v, "crossover.home.max_pending", 1, 1_000_000, "")?,
                        None => 1024,
                    },
                    trusted_cas,
                })
            }
        };
        if !self.enabled {
            return Ok((None, home));
        }
        let need = |v: &Option<Spanned<PathBuf>>, key: &str| -> Result<PathBuf, ConfigError> {
            v.as_ref().map(|p| resolve(p.get_ref())).ok_or_else(|| {
                cx.err(
                    cx.end(),
                    key,
                    "crossover.enabled needs it (the client certificate naming our domain, its key, and the anchors for homes)",
                )
            })
        };
        let max_pending = match &self.max_pending {
            Some(v) => cx.range(v, "crossover.max_pending", 1, 1_000_000, "")?,
            None => 1024,
        };
        let max_pending_per_realm = match &self.max_pending_per_realm {
            Some(v) => cx.range(v, "crossover.max_pending_per_realm", 1, 1_000_000, "")?,
            None => 64.min(max_pending),
        };
        if max_pending_per_realm > max_pending {
            if let Some(v) = &self.max_pending_per_realm {
                return Err(cx.err(
                    v.span(),
                    "crossover.max_pending_per_realm",
                    format!("more than crossover.max_pending ({max_pending})"),
                ));
            }
        }
        let mut homes = BTreeMap::new();
        for (realm, addr) in &self.homes {
            if !gatehouse_auth::xover::valid_realm(realm) {
                return Err(cx.err(
                    addr.span(),
                    "crossover.homes",
                    format!("`{realm}` is not a realm"),
                ));
            }
            let a: SocketAddr = addr
                .get_ref()
                .parse()
                .map_err(|_| cx.err(addr.span(), "crossover.homes", "expected IP:port"))?;
            homes.insert(realm.clone(), a);
        }
        let realms = match &self.realms {
            Some(r) => names(cx, r, "crossover.realms", true)?,
            None => Allowed::Any,
        };
        Ok((
            Some(CrossoverSettings {
                realms,
                certificate: need(&self.certificate, "crossover.certificate")?,
                private_key: need(&self.private_key, "crossover.private_key")?,
                trusted_cas: need(&self.trusted_cas, "crossover.trusted_cas")?,
                deadline: match &self.deadline_ms {
                    Some(v) => cx.ms(v, "crossover.deadline_ms", 100, 60_000)?,
                    None => Duration::from_secs(5),
                },
                max_pending,
                max_pending_per_realm,
                allow_private: self.allow_private,
                homes,
            }),
            home,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    const BASE: &str = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";

    #[test]
    fn crossover_settings_are_checked_with_their_line() {
        for (extra, key, msg) in [
            ("[crossover]\nenabled = true\n", "crossover.certificate", "needs it"),
            (
                "[crossover]\nenabled = true\ncertificate = \"c\"\nprivate_key = \"k\"\ntrusted_cas = \"a\"\ndeadline_ms = 5\n",
                "crossover.deadline_ms",
                "allowed range 100 to 60000 ms",
            ),
            (
                "[crossover]\nenabled = true\ncertificate = \"c\"\nprivate_key = \"k\"\ntrusted_cas = \"a\"\nrealms = [\"any\", \"x.example\"]\n",
                "crossover.realms",
                "stands alone",
            ),
            (
                "[crossover]\nenabled = true\ncertificate = \"c\"\nprivate_key = \"k\"\ntrusted_cas = \"a\"\nmax_pending = 10\nmax_pending_per_realm = 11\n",
                "crossover.max_pending_per_realm",
                "more than crossover.max_pending",
            ),
            (
                "[crossover]\nenabled = true\ncertificate = \"c\"\nprivate_key = \"k\"\ntrusted_cas = \"a\"\n[crossover.homes]\n\"partner.example\" = \"nowhere\"\n",
                "crossover.homes",
                "expected IP:port",
            ),
            (
                "[crossover.home]\nlisten = \"127.0.0.1:8443\"\nkey_file = \"k\"\nforeign_domains = [\"org.example\"]\n",
                "crossover.home.listen",
                "needs the [tls] table",
            ),
        ] {
            let text = format!("{BASE}{extra}");
            let e = Config::parse(&text, "t.toml").unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(msg), "{e}");
            assert!(e.line > 0, "{e}");
        }
    }

    #[test]
    fn crossover_is_off_unless_configured() {
        let c = Config::parse(BASE, "t.toml").unwrap();
        assert!(c.crossover.is_none() && c.crossover_home.is_none());
    }
}
