//! Tunnel and call policy, pure: `Policy::decide(query) -> Result<Permit, Denied>`.
//!
//! Rules come from TOML, are checked in order, and the first rule whose kind, callers,
//! targets and methods match decides (no fall-through). Nothing matching means deny.
//!
//! ```toml
//! org_prefixes = ["2001:db8:789::/48"]        # no caller may ever claim these (or overlaps)
//! [limits]
//! max_tunnels = 1000                           # all tunnels through the gateway
//! [[rule]]
//! name = "partners"
//! kind = "tunnel"                              # tunnel | call | method
//! callers = ["*@partner.example"]              # exact AOR, *@domain, realm:NAME, trusted, any
//! crossover = ["partner.example"]              # realms whose callers this rule admits by realm
//!                                              # crossover (their home vouches), or ["any"];
//!                                              # absent: no crossover caller matches the rule
//! targets = ["sip:vpn@org.example"]            # exact AOR, *@domain, any
//! mechanisms = ["SCRAM-SHA-256-PLUS"]          # optional
//! require_tls = true
//! pskmth = ["scram"]                           # acceptable, in the gateway's preference
//! require_psk = true
//! prefixes = ["2001:db8:456::/48"]             # what callers of this rule may claim
//! max_tunnels_per_identity = 2
//! max_tunnels_per_target = 50
//! [[rule]]
//! name = "partner-calls"
//! kind = "call"
//! callers = ["*@partner.example"]
//! multipart = true                             # multipart bodies (never with WireGuard); default false
//! ```
//! A `Permit` is only made by [`Policy::decide`]; a `Denied` carries a bounded reason that
//! becomes a Warning header and a metric label.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A configured trusted source (no identity).
    Trusted,
    /// An authenticated SASL identity presenting `aor` (its From AOR).
    Authenticated {
        aor: &'a str,
        realm: &'a str,
        mechanism: &'a str,
        /// `Some(home realm)` when the caller's own home authenticated it by realm crossover
        /// (docs/realm-crossover.md): such a caller matches only rules whose `crossover`
        /// option names its realm or `any`.
        crossover: Option<&'a str>,
    },
}

/// What kind of session or request.
#[derive(Debug, Clone)]
pub enum Session<'a> {
    /// A WireGuard tunnel offer.
    Tunnel {
        prefixes: &'a [IpNet],
        /// The caller's pskmth list, in its preference order.
        pskmth: &'a [String],
        /// Whether a `scram` PSK can be derived (a SCRAM exchange authenticated this request).
        scram_available: bool,
        /// Whether an `xover` key is at hand (the caller's home released one for this offer;
        /// outward, whether the far end's gateway can obtain one from this gateway as the
        /// caller's home).
        xover_available: bool,
        /// The target is another organisation's domain (federation, docs/realm-crossover.md):
        /// the caller is one of ours, so its prefixes may be the organisation's own
        /// (`org_prefixes` guards inbound offers only), and no `scram` PSK of this gateway's
        /// ever goes outward (the far end keys the tunnel with `xover`).
        outward: bool,
    },
    /// An INVITE that is not a tunnel (an ordinary call).
    Call,
    /// An out-of-dialog request of another method.
    Method(&'a str),
}

/// Current tunnel counts, for limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub by_identity: u32,
    pub by_target: u32,
    pub total: u32,
}

/// A policy question.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub caller: Caller<'a>,
    /// Over TLS (including for the -PLUS binding).
    pub tls: bool,
    pub from: &'a str,
    pub to: &'a str,
    pub session: Session<'a>,
    pub counts: Counts,
}

/// Permission to proceed, with what it decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    rule: String,
    pskmth: Option<String>,
    multipart: bool,
    limits: Limits,
}

/// The tunnel limits a permit was checked against (all `None` for other sessions): a
/// gateway sharing its tunnels with others checks them again against the cluster's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub total: Option<u32>,
    pub per_identity: Option<u32>,
    pub per_target: Option<u32>,
}

impl Limits {
    /// True when some limit applies.
    pub fn any(&self) -> bool {
        self.total.is_some() || self.per_identity.is_some() || self.per_target.is_some()
    }

    /// The first limit the counts reach (the same order as the decision's).
    pub fn reached(&self, counts: &Counts) -> Option<Denied> {
        if self.total.is_some_and(|m| counts.total >= m) {
            Some(Denied::LimitTotal)
        } else if self.per_identity.is_some_and(|m| counts.by_identity >= m) {
            Some(Denied::LimitIdentity)
        } else if self.per_target.is_some_and(|m| counts.by_target >= m) {
            Some(Denied::LimitTarget)
        } else {
            None
        }
    }
}

impl Permit {
    /// The rule that matched.
    pub fn rule(&self) -> &str {
        &self.rule
    }
    /// The pskmth chosen for a tunnel (`none`, `scram`).
    pub fn pskmth(&self) -> Option<&str> {
        self.pskmth.as_deref()
    }
    /// The rule lets multipart bodies through (`multipart = true`; never a tunnel offer).
    pub fn allows_multipart(&self) -> bool {
        self.multipart
    }
    /// The tunnel limits that applied.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// Why a request was denied. Bounded set: usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no rule permits this")]
    NoRule,
    #[error("denied by rule")]
    RuleDenies,
    #[error("mechanism not allowed")]
    Mechanism,
    #[error("TLS required")]
    TlsRequired,
    #[error("prefix not allowed")]
    Prefix,
    #[error("prefix overlaps the organisation's")]
    OrgPrefix,
    #[error("no acceptable pskmth")]
    Pskmth,
    #[error("a pre-shared key is required")]
    PskRequired,
    #[error("tunnel limit per identity reached")]
    LimitIdentity,
    #[error("tunnel limit per target reached")]
    LimitTarget,
    #[error("tunnel limit reached")]
    LimitTotal,
    /// Not the rules' decision but the gateway's, with the same answer: a prefix of the offer
    /// overlaps one another identity's live tunnel holds.
    #[error("prefix held by another identity's tunnel")]
    PrefixHeld,
    /// The offer's public key is another identity's live tunnel's.
    #[error("public key held by another identity's tunnel")]
    KeyHeld,
}

impl Denied {
    /// Every reason (metrics initialise a series per label).
    pub const ALL: [Denied; 13] = [
        Denied::NoRule,
        Denied::RuleDenies,
        Denied::Mechanism,
        Denied::TlsRequired,
        Denied::Prefix,
        Denied::OrgPrefix,
        Denied::Pskmth,
        Denied::PskRequired,
        Denied::LimitIdentity,
        Denied::LimitTarget,
        Denied::LimitTotal,
        Denied::PrefixHeld,
        Denied::KeyHeld,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Denied::NoRule => "no_rule",
            Denied::RuleDenies => "rule_denies",
            Denied::Mechanism => "mechanism",
            Denied::TlsRequired => "tls_required",
            Denied::Prefix => "prefix",
            Denied::OrgPrefix => "org_prefix",
            Denied::Pskmth => "pskmth",
            Denied::PskRequired => "psk_required",
            Denied::LimitIdentity => "limit_identity",
            Denied::LimitTarget => "limit_target",
            Denied::LimitTotal => "limit_total",
            Denied::PrefixHeld => "prefix_held",
            Denied::KeyHeld => "key_held",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tunnel,
    Call,
    Method,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    org_prefixes: Vec<toml::Spanned<String>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_tunnels: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: toml::Spanned<String>,
    kind: Kind,
    #[serde(default)]
    action: Action,
    callers: toml::Spanned<Vec<String>>,
    #[serde(default)]
    targets: Option<Vec<String>>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    mechanisms: Option<Vec<String>>,
    #[serde(default)]
    require_tls: bool,
    #[serde(default)]
    pskmth: Option<toml::Spanned<Vec<String>>>,
    #[serde(default)]
    require_psk: bool,
    #[serde(default)]
    prefixes: Option<Vec<toml::Spanned<String>>>,
    max_tunnels_per_identity: Option<u32>,
    max_tunnels_per_target: Option<u32>,
    #[serde(default)]
    multipart: bool,
    #[serde(default)]
    crossover: Option<toml::Spanned<Vec<String>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Domain(String),
    Realm(String),
    Trusted,
    Any,
}

impl Pattern {
    fn parse(s: &str) -> Option<Pattern> {
        let s = s.trim();
        Some(match s {
            "any" => Pattern::Any,
            "trusted" => Pattern::Trusted,
            _ if s.starts_with("realm:") => Pattern::Realm(s[6..].to_owned()),
            _ if s.starts_with("*@") && s.len() > 2 => Pattern::Domain(s[2..].to_ascii_lowercase()),
            _ if s.starts_with("sip:") || s.starts_with("sips:") => Pattern::Exact(normalise(s)),
            _ => return None,
        })
    }

    fn matches_aor(&self, aor: &str) -> bool {
        let aor = normalise(aor);
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => *e == aor,
            Pattern::Domain(d) => aor.rsplit_once('@').is_some_and(|(_, h)| h == d),
            Pattern::Realm(_) | Pattern::Trusted => false,
        }
    }

    fn matches_caller(&self, caller: &Caller<'_>) -> bool {
        match (self, caller) {
            (Pattern::Trusted, Caller::Trusted) => true,
            (Pattern::Any, Caller::Authenticated { .. }) => true,
            (Pattern::Realm(r), Caller::Authenticated { realm, .. }) => r == realm,
            (p, Caller::Authenticated { aor, .. }) => p.matches_aor(aor),
            _ => false,
        }
    }
}

/// `sip:user@host` with the host lower-cased and `sips:` folded into `sip:`.
fn normalise(aor: &str) -> String {
    let aor = aor.trim().trim_start_matches('<').trim_end_matches('>');
    let aor = aor
        .strip_prefix("sips:")
        .map_or_else(|| aor.to_owned(), |r| format!("sip:{r}"));
    let aor = aor.split(';').next().unwrap_or("").to_owned();
    match aor.rsplit_once('@') {
        Some((u, h)) => format!(
            "{u}@{}",
            h.split(':').next().unwrap_or(h).to_ascii_lowercase()
        ),
        None => aor,
    }
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    kind: Kind,
    action: Action,
    callers: Vec<Pattern>,
    targets: Option<Vec<Pattern>>,
    methods: Option<Vec<String>>,
    mechanisms: Option<Vec<String>>,
    require_tls: bool,
    pskmth: Option<Vec<String>>,
    require_psk: bool,
    prefixes: Option<Vec<IpNet>>,
    max_per_identity: Option<u32>,
    max_per_target: Option<u32>,
    multipart: bool,
    /// Realms admitted by crossover (`None`: none; `Some([])` never happens; `any` as `*`).
    crossover: Option<Vec<String>>,
}

impl Rule {
    /// A crossover caller matches only a rule that names its realm (or `any`); a local caller
    /// is unaffected.
    fn admits_origin(&self, caller: &Caller<'_>) -> bool {
        match caller {
            Caller::Authenticated {
                crossover: Some(realm),
                ..
            } => self
                .crossover
                .as_ref()
                .is_some_and(|list| list.iter().any(|r| r == "any" || r == realm)),
            _ => true,
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    org_prefixes: Vec<IpNet>,
    max_tunnels: Option<u32>,
}

/// A policy file error with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {message}")]
pub struct PolicyError {
    pub origin: String,
    pub line: usize,
    pub message: String,
}

/// Known pskmth values (wireguard-sdp.md); `gateway` is internal-only, never from a caller.
pub const PSKMTH: [&str; 3] = ["scram", "xover", "none"];

impl Policy {
    /// The policy without a file: trusted sources may do anything, nobody else anything.
    pub fn trusted_only() -> Policy {
        Policy {
            rules: vec![Rule {
                name: "trusted".into(),
                kind: Kind::Any,
                action: Action::Allow,
                callers: vec![Pattern::Trusted],
                targets: None,
                methods: None,
                mechanisms: None,
                require_tls: false,
                pskmth: None,
                require_psk: false,
                prefixes: None,
                max_per_identity: None,
                max_per_target: None,
                multipart: false,
                crossover: None,
            }],
            org_prefixes: Vec::new(),
            max_tunnels: None,
        }
    }

    /// Parses and validates a whole file; nothing of it is used unless all of it is valid.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let line_of = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        };
        let err = |span: std::ops::Range<usize>, message: String| PolicyError {
            origin: origin.to_owned(),
            line: line_of(span),
            message,
        };
        let raw: RawPolicy = toml::from_str(text)
            .map_err(|e| err(e.span().unwrap_or(0..0), e.message().to_owned()))?;
        let net = |s: &toml::Spanned<String>| {
            s.get_ref()
                .parse::<IpNet>()
                .map_err(|_| err(s.span(), format!("`{}` is not a prefix", s.get_ref())))
        };
        let org_prefixes = raw
            .org_prefixes
            .iter()
            .map(net)
            .collect::<Result<Vec<_>, _>>()?;
        let mut rules = Vec::new();
        for r in raw.rule {
            let span = r.name.span();
            let callers = r
                .callers
                .get_ref()
                .iter()
                .map(|c| {
                    Pattern::parse(c).ok_or_else(|| {
                        err(
                            r.callers.span(),
                            format!(
                                "caller pattern `{c}` (AOR, *@domain, realm:NAME, trusted, any)"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if callers.is_empty() {
                return Err(err(span, "a rule needs at least one caller".into()));
            }
            let targets = match r.targets {
                None => None,
                Some(t) => Some(
                    t.iter()
                        .map(|p| match Pattern::parse(p) {
                            Some(p @ (Pattern::Exact(_) | Pattern::Domain(_) | Pattern::Any)) => {
                                Ok(p)
                            }
                            _ => Err(err(
                                span.clone(),
                                format!("target pattern `{p}` (AOR, *@domain, any)"),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if let Some(p) = &r.pskmth {
                for m in p.get_ref() {
                    if !PSKMTH.contains(&m.as_str()) {
                        return Err(err(
                            p.span(),
                            format!("unknown pskmth `{m}` (scram, xover, none)"),
                        ));
                    }
                }
            }
            let prefixes = match &r.prefixes {
                None => None,
                Some(list) => Some(list.iter().map(net).collect::<Result<Vec<_>, _>>()?),
            };
            let crossover = match &r.crossover {
                None => None,
                Some(list) => {
                    let realms = list.get_ref();
                    if realms.is_empty() {
                        return Err(err(
                            list.span(),
                            "`crossover` names realms or `any` (leave it out for none)".into(),
                        ));
                    }
                    for realm in realms {
                        if realm != "any" && !valid_realm(realm) {
                            return Err(err(
                                list.span(),
                                format!(
                                    "`{realm}` is not a realm (lower-case domain name, or `any`)"
                                ),
                            ));
                        }
                    }
                    Some(realms.clone())
                }
            };
            if r.kind == Kind::Method && r.methods.is_none() {
                return Err(err(span, "a method rule needs `methods`".into()));
            }
            rules.push(Rule {
                name: r.name.into_inner(),
                kind: r.kind,
                action: r.action,
                callers,
                targets,
                methods: r.methods,
                mechanisms: r.mechanisms,
                require_tls: r.require_tls,
                pskmth: r.pskmth.map(|p| p.into_inner()),
                require_psk: r.require_psk,
                prefixes,
                max_per_identity: r.max_tunnels_per_identity,
                max_per_target: r.max_tunnels_per_target,
                multipart: r.multipart,
                crossover,
            });
        }
        Ok(Policy {
            rules,
            org_prefixes,
            max_tunnels: raw.limits.max_tunnels,
        })
    }

    /// The decision.
    pub fn decide(&self, q: &Query<'_>) -> Result<Permit, Denied> {
        let kind_matches = |k: Kind| {
            matches!(
                (&q.session, k),
                (_, Kind::Any)
                    | (Session::Tunnel { .. }, Kind::Tunnel)
                    | (Session::Call, Kind::Call)
                    | (Session::Method(_), Kind::Method)
            )
        };
        let rule = self.rules.iter().find(|r| {
            kind_matches(r.kind)
                && r.callers.iter().any(|p| p.matches_caller(&q.caller))
                && r.admits_origin(&q.caller)
                && r.targets
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|p| p.matches_aor(q.to)))
                && match (&q.session, &r.methods) {
                    (Session::Method(m), Some(ms)) => ms.iter().any(|x| x == m),
                    _ => true,
                }
        });
        let Some(rule) = rule else {
            return Err(Denied::NoRule);
        };
        if rule.action == Action::Deny {
            return Err(Denied::RuleDenies);
        }
        if rule.require_tls && !q.tls {
            return Err(Denied::TlsRequired);
        }
        if let (Some(allowed), Caller::Authenticated { mechanism, .. }) =
            (&rule.mechanisms, &q.caller)
        {
            if !allowed.iter().any(|m| m == mechanism) {
                return Err(Denied::Mechanism);
            }
        }
        let Session::Tunnel {
            prefixes,
            pskmth,
            scram_available,
            xover_available,
            outward,
        } = &q.session
        else {
            return Ok(Permit {
                rule: rule.name.clone(),
                pskmth: None,
                multipart: rule.multipart,
                limits: Limits::default(),
            });
        };
        for p in prefixes.iter() {
            if !outward && self.org_prefixes.iter().any(|o| overlaps(o, p)) {
                return Err(Denied::OrgPrefix);
            }
            if let Some(allowed) = &rule.prefixes {
                if !allowed.iter().any(|a| a.contains(p)) {
                    return Err(Denied::Prefix);
                }
            }
        }
        let limits = Limits {
            total: self.max_tunnels,
            per_identity: rule.max_per_identity,
            per_target: rule.max_per_target,
        };
        if let Some(denied) = limits.reached(&q.counts) {
            return Err(denied);
        }
        // pskmth: the caller's first choice that the rule accepts and that can be done.
        let acceptable = |m: &str| {
            rule.pskmth
                .as_ref()
                .is_none_or(|list| list.iter().any(|x| x == m))
                && PSKMTH.contains(&m)
                && (m != "scram" || (*scram_available && !outward))
                && (m != "xover" || *xover_available)
                && (m != "none" || !rule.require_psk)
        };
        match pskmth.iter().find(|m| acceptable(m)) {
            Some(m) => Ok(Permit {
                rule: rule.name.clone(),
                pskmth: Some(m.clone()),
                multipart: false,
                limits,
            }),
            None if rule.require_psk && pskmth.iter().any(|m| m == "none") && pskmth.len() == 1 => {
                Err(Denied::PskRequired)
            }
            None => Err(Denied::Pskmth),
        }
    }
}

impl Policy {
    /// Whether some rule may let a tunnel (and so a PSK) reach `aor`: an allowing rule of
    /// kind `tunnel` or `any` whose targets match it (a rule without targets matches every
    /// AOR). The gateway lets such an AOR register only from the inside.
    pub fn receives_tunnels(&self, aor: &str) -> bool {
        self.rules.iter().any(|r| {
            matches!(r.kind, Kind::Tunnel | Kind::Any)
                && r.action == Action::Allow
                && r.targets
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|p| p.matches_aor(aor)))
        })
    }
}

/// A realm as crossover names it: a lower-case domain name (docs/realm-crossover.md).
fn valid_realm(realm: &str) -> bool {
    (1..=253).contains(&realm.len())
        && realm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !realm.starts_with('.')
        && !realm.ends_with('.')
        && !realm.contains("..")
}

/// Two prefixes overlap when either contains the other (same family only).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    match (a.network(), b.network()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            a.contains(b) || b.contains(a)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
