//! The registrar for internal endpoints (the To side of tunnels): REGISTER authenticated
//! with the 401 SASL flow, the identity must own the To AOR, bindings AOR -> Contact through
//! the flow the REGISTER came on, with expiry, persisted in the store so that they survive a
//! restart (RFC 3261 section 10.3, with the flow kept as RFC 5626 would).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use super::auth::{aor_key, header_aor, may_present};
use super::persist::{BindingRecord, StoreWrite};
use super::{Proxy, Reject};
use crate::flow::{Destination, Flow, Transport};
use crate::sip::{build_response, HeaderName, Message, NameAddr};
use crate::transaction::TxId;
use gatehouse_auth::Authenticated;

/// One live binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub contact: String,
    pub transport: Transport,
    /// Where the REGISTER came from: requests for the AOR go there (NAT-safe).
    pub remote: SocketAddr,
    pub expires: Instant,
    pub instance: Option<String>,
}

impl Binding {
    pub fn destination(&self) -> Destination {
        Destination::Addr {
            transport: self.transport,
            addr: self.remote,
            server_name: None,
        }
    }
}

/// Live bindings by AOR key (`sip:user@host`).
#[derive(Debug, Default)]
pub struct Bindings {
    by_aor: HashMap<String, Vec<Binding>>,
}

impl Bindings {
    /// Live bindings of an AOR, most recently refreshed first.
    pub fn live(&mut self, aor: &str, now: Instant) -> Vec<Binding> {
        let Some(list) = self.by_aor.get_mut(aor) else {
            return Vec::new();
        };
        list.retain(|b| b.expires > now);
        let out = list.clone();
        if list.is_empty() {
            self.by_aor.remove(aor);
        }
        out
    }

    pub fn count(&self) -> usize {
        self.by_aor.values().map(Vec::len).sum()
    }

    fn upsert(&mut self, aor: &str, b: Binding, max: usize) -> bool {
        let list = self.by_aor.entry(aor.to_owned()).or_default();
        if let Some(existing) = list.iter_mut().find(|x| x.contact == b.contact) {
            *existing = b;
        } else {
            if list.len() >= max {
                return false;
            }
            list.push(b);
        }
        list.sort_by_key(|b| std::cmp::Reverse(b.expires));
        true
    }

    fn remove(&mut self, aor: &str, contact: &str) {
        if let Some(list) = self.by_aor.get_mut(aor) {
            list.retain(|b| b.contact != contact);
        }
    }

    /// Every live binding with its AOR.
    pub fn all(&self, now: Instant) -> Vec<(String, Binding)> {
        let mut v: Vec<(String, Binding)> = self
            .by_aor
            .iter()
            .flat_map(|(a, list)| {
                list.iter()
                    .filter(|b| b.expires > now)
                    .map(move |b| (a.clone(), b.clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn clear(&mut self, aor: &str) -> Vec<Binding> {
        self.by_aor.remove(aor).unwrap_or_default()
    }
}

/// Maps the core's monotonic clock to wall-clock seconds for persistence.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    pub instant: Instant,
    pub system: SystemTime,
}

impl WallClock {
    pub fn unix(&self, at: Instant) -> u64 {
        let base = self
            .system
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match at.checked_duration_since(self.instant) {
            Some(d) => base + d.as_secs(),
            None => base.saturating_sub(self.instant.duration_since(at).as_secs()),
        }
    }

    pub fn instant(&self, unix: u64) -> Instant {
        let base = self
            .system
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if unix >= base {
            self.instant + Duration::from_secs(unix - base)
        } else {
            self.instant
                .checked_sub(Duration::from_secs(base - unix))
                .unwrap_or(self.instant)
        }
    }
}

impl Proxy {
    /// Takes the persisted bindings of the start snapshot.
    pub(super) fn load_bindings(&mut self, records: Vec<BindingRecord>) {
        for r in records {
            let (Some(transport), Ok(remote)) =
                (Transport::from_token(&r.transport), r.remote.parse())
            else {
                continue;
            };
            let b = Binding {
                contact: r.contact,
                transport,
                remote,
                expires: self.clock.instant(r.expires_at),
                instance: r.instance,
            };
            let max = self.cfg.registrar.max_bindings_per_aor;
            self.bindings.upsert(&r.aor, b, max);
        }
        tracing::info!(
            bindings = self.bindings.count(),
            "registrar bindings loaded"
        );
    }

    /// REGISTER addressed to the gateway's domain.
    /// REGISTER after its SASL exchange (run statelessly by the admit stage).
    pub(super) fn register(
        &mut self,
        id: TxId,
        msg: Message,
        flow: Flow,
        auth: Authenticated,
        now: Instant,
    ) -> Result<(), Reject> {
        let aor = header_aor(&msg, HeaderName::To).ok_or(Reject::Malformed(
            crate::sip::ParseError::Malformed(HeaderName::To),
        ))?;
        let host = aor.rsplit('@').next().unwrap_or("");
        if !self.is_our_domain(host) {
            return Err(Reject::Forbidden(
                "Forbidden (not a domain of this registrar)",
            ));
        }
        if !may_present(&auth, &aor) {
            return Err(Reject::IdentityNotAllowed);
        }
        let default_expires = msg
            .value_of(HeaderName::Expires)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(self.cfg.registrar.default_expires);
        let contacts: Vec<String> = msg.list_values(HeaderName::Contact);
        let bad_contact =
            || Reject::Malformed(crate::sip::ParseError::Malformed(HeaderName::Contact));
        if contacts.iter().any(|c| c == "*") {
            if contacts.len() != 1 || default_expires != 0 {
                return Err(bad_contact());
            }
            for b in self.bindings.clear(&aor) {
                self.writes.push(StoreWrite::RemoveBinding {
                    aor: aor.clone(),
                    contact: b.contact,
                });
            }
        }
        let reg = self.cfg.registrar;
        for c in contacts.iter().filter(|c| *c != "*") {
            let na = NameAddr::parse(c).ok_or_else(bad_contact)?;
            crate::sip::Uri::parse(na.uri).map_err(|_| bad_contact())?;
            let expires = na
                .param("expires")
                .map(|e| e.parse::<u32>().map_err(|_| bad_contact()))
                .transpose()?
                .unwrap_or(default_expires);
            let contact = na.uri.to_owned();
            if expires == 0 {
                self.bindings.remove(&aor, &contact);
                self.writes.push(StoreWrite::RemoveBinding {
                    aor: aor.clone(),
                    contact,
                });
                continue;
            }
            if expires < reg.min_expires {
                return Err(Reject::IntervalTooBrief(reg.min_expires));
            }
            let expires = expires.min(reg.max_expires);
            let binding = Binding {
                contact: contact.clone(),
                transport: flow.transport,
                remote: flow.remote,
                expires: now + Duration::from_secs(expires.into()),
                instance: na
                    .param("+sip.instance")
                    .map(|s| s.trim_matches('"').to_owned()),
            };
            if !self
                .bindings
                .upsert(&aor, binding.clone(), reg.max_bindings_per_aor)
            {
                return Err(Reject::Forbidden(
                    "Forbidden (too many bindings for this AOR)",
                ));
            }
            let record = BindingRecord {
                aor: aor.clone(),
                contact,
                transport: flow.transport.to_string().to_ascii_lowercase(),
                remote: flow.remote.to_string(),
                expires_at: self.clock.unix(binding.expires),
                instance: binding.instance.clone(),
                identity: auth.identity().to_owned(),
            };
            self.writes.push(StoreWrite::SaveBinding(record));
        }
        // 200 OK lists every current binding with its remaining time.
        let mut extra: Vec<(&str, String)> = self
            .bindings
            .live(&aor, now)
            .iter()
            .map(|b| {
                let left = b.expires.saturating_duration_since(now).as_secs();
                ("Contact", format!("<{}>;expires={left}", b.contact))
            })
            .collect();
        if let Some(info) = self.auth_info(id) {
            extra.push(info);
        }
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let tag = self.new_tag();
        let resp = build_response(&msg, 200, "OK", Some(&tag), &extra);
        self.finish(id, 200, resp, now);
        tracing::info!(%aor, identity = auth.identity(), bindings = self.bindings.count(), "registered");
        Ok(())
    }

    /// Every live registration (admin API).
    pub fn registration_list(&self, now: Instant) -> Vec<(String, Binding)> {
        self.bindings.all(now)
    }

    /// Removes every binding of an AOR (admin API); returns how many went.
    pub fn remove_registration(&mut self, aor: &str) -> usize {
        let gone = self.bindings.clear(aor);
        let n = gone.len();
        for b in gone {
            self.writes.push(StoreWrite::RemoveBinding {
                aor: aor.to_owned(),
                contact: b.contact,
            });
        }
        n
    }

    /// Live bindings for a Request-URI's AOR.
    pub(super) fn bindings_for(&mut self, ruri: &str, now: Instant) -> Vec<Binding> {
        match aor_key(ruri) {
            Some(aor) => self.bindings.live(&aor, now),
            None => Vec::new(),
        }
    }
}
