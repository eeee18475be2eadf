//! The store: users (SCRAM verifiers, never passwords), the AORs each user may present,
//! admin identities, registrar bindings, tunnels and the gateway's own keys.
//!
//! Two backends behind one [`Store`]: an SQLite file ([`sqlite`], the single-host default, or
//! in memory for the embedded demo) and a PostgreSQL database ([`pg`]) that several gateways
//! share — `[auth] store` (and `--store`) is a file path or a `postgres://` URL. Both have
//! numbered migrations and the same operations; the same tests run against both.

// The I/O side: called off the SIP loop only, with wall-clock timestamps.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::Path;
use std::time::Duration;

use gatehouse_auth::{Credential, CredentialSource, Mechanism};

pub mod journal;
pub mod pg;
pub mod sqlite;
pub mod worker;

pub use crate::core::persist::{
    Applied, BindingRecord, Credentials, Reservation, Snapshot, StoreWrite,
};
pub use pg::PgStore;
pub use sqlite::SqliteStore;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store (PostgreSQL): {message}")]
    Postgres {
        message: String,
        /// The database was unreachable (refused, reset, closed): worth retrying.
        transient: bool,
    },
    #[error("user `{0}` already exists")]
    Exists(String),
    #[error("no user `{0}`")]
    NoUser(String),
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Worth retrying: another connection holds SQLite's write lock (past the busy timeout),
    /// or PostgreSQL is unreachable (the next call connects again).
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            StoreError::Postgres { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// A user as listed by the CLI (no key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub username: String,
    pub aors: Vec<String>,
    pub mechanisms: Option<Vec<String>>,
    pub enabled: bool,
    pub iterations: u32,
}

/// An admin identity's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "read-only" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) fn validate_user(username: &str, aors: &[String]) -> Result<(), StoreError> {
    if username.is_empty()
        || username.len() > 128
        || username
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(StoreError::Invalid(format!("bad username `{username}`")));
    }
    for a in aors {
        let ok = crate::sip::Uri::parse(a).ok().is_some_and(|u| {
            matches!(u.scheme, crate::sip::Scheme::Sip | crate::sip::Scheme::Sips)
                && u.user.is_some()
        });
        if !ok {
            return Err(StoreError::Invalid(format!(
                "`{a}` is not a sip:user@domain AOR"
            )));
        }
    }
    Ok(())
}

/// Which tunnel rows to read (both backends).
#[derive(Debug, Default)]
pub struct TunnelQuery<'a> {
    /// Rows with a Call-ID after this one (a page's cursor).
    pub after: Option<&'a str>,
    /// Rows of this Call-ID only.
    pub call_id: Option<&'a str>,
    pub limit: Option<usize>,
}

/// An open store, on either backend.
#[derive(Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    /// Boxed: the client and its configuration are large; a store is opened once.
    Postgres(Box<PgStore>),
}

pub use crate::config::store_url;

/// A store location fit for a log line: the password of a URL is replaced by `***`.
pub fn display_location(location: &Path) -> String {
    let Some(url) = store_url(location) else {
        return location.display().to_string();
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) if auth.contains(':') => {
            let user = auth.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Runs `$body` with `$s` bound to the backend in use.
macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Store::Sqlite($s) => $body,
            Store::Postgres($s) => $body,
        }
    };
}

impl Store {
    /// Opens the store at `location`: a `postgres://` URL (connects and migrates) or a file
    /// (created or migrated).
    pub fn open(location: &Path) -> Result<Store, StoreError> {
        match store_url(location) {
            Some(url) => PgStore::connect(url).map(|p| Store::Postgres(Box::new(p))),
            None => SqliteStore::open(location).map(Store::Sqlite),
        }
    }

    /// An in-memory SQLite store (tests, and the embedded demo when no store is configured).
    pub fn in_memory() -> Result<Store, StoreError> {
        SqliteStore::in_memory().map(Store::Sqlite)
    }

    /// Which backend: "sqlite" or "postgres".
    /// A store several gateways share (PostgreSQL): its tunnels are the cluster's.
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// SQLite's wait for another connection's write lock (PostgreSQL has no such lock).
    pub fn set_busy_timeout(&mut self, t: Duration) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.set_busy_timeout(t),
            Store::Postgres(_) => Ok(()),
        }
    }

    /// The file of an SQLite store (its journal lives beside it); `None` otherwise.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Store::Sqlite(s) => s.path(),
            Store::Postgres(_) => None,
        }
    }

    /// A named 32-byte key, created at random on first use (dialog MAC key, fake-verifier
    /// key); on PostgreSQL every gateway of a cluster reads the same one.
    pub fn key(&self, name: &str) -> Result<[u8; 32], StoreError> {
        each!(self, s => s.key(name))
    }

    /// Adds a user; the password is turned into a SCRAM-SHA-256 verifier and dropped.
    pub fn add_user(
        &mut self,
        username: &str,
        password: &[u8],
        aors: &[String],
        mechanisms: Option<&[Mechanism]>,
        iterations: u32,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_user(username, password, aors, mechanisms, iterations))
    }

    /// Replaces a user's verifier.
    pub fn set_password(
        &mut self,
        username: &str,
        password: &[u8],
        iterations: u32,
    ) -> Result<(), StoreError> {
        each!(self, s => s.set_password(username, password, iterations))
    }

    pub fn set_enabled(&mut self, username: &str, enabled: bool) -> Result<(), StoreError> {
        each!(self, s => s.set_enabled(username, enabled))
    }

    pub fn delete_user(&mut self, username: &str) -> Result<(), StoreError> {
        each!(self, s => s.delete_user(username))
    }

    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        each!(self, s => s.list_users())
    }

    pub fn user(&self, username: &str) -> Result<Option<UserSummary>, StoreError> {
        each!(self, s => s.user(username))
    }

    /// The full credential of a user (for the SASL server).
    pub fn credential(&self, username: &str) -> Result<Option<Credential>, StoreError> {
        each!(self, s => s.credential(username))
    }

    /// The generation of the users table (moves on every change of a user or its AORs).
    pub fn users_generation(&self) -> Result<i64, StoreError> {
        each!(self, s => s.users_generation())
    }

    /// Every user's credential (the core's in-memory snapshot).
    pub fn credentials(&self) -> Result<Credentials, StoreError> {
        each!(self, s => s.credentials())
    }

    /// What a starting core needs: credentials, bindings live at `now_unix` (expired ones are
    /// deleted), the tunnel table (after a journal left by a previous run, on SQLite).
    pub fn snapshot(&mut self, now_unix: u64) -> Result<Snapshot, StoreError> {
        each!(self, s => s.snapshot(now_unix))
    }

    /// Applies a batch of the core's writes in one transaction (all or nothing).
    pub fn apply(&mut self, writes: &[StoreWrite]) -> Result<Applied, StoreError> {
        each!(self, s => s.apply(writes))
    }

    /// Bindings not yet expired at `now_unix`; expired ones are deleted.
    pub fn live_bindings(&mut self, now_unix: u64) -> Result<Vec<BindingRecord>, StoreError> {
        each!(self, s => s.live_bindings(now_unix))
    }

    /// The bindings of one AOR not yet expired at `now_unix`.
    pub fn bindings_of(
        &mut self,
        aor: &str,
        now_unix: u64,
    ) -> Result<Vec<BindingRecord>, StoreError> {
        each!(self, s => s.bindings_of(aor, now_unix))
    }

    /// The `[cluster] peer_uri` of every gateway connected to a shared store now; `None` on a
    /// file store (one gateway: there are no peers to know about).
    pub fn live_peers(&self) -> Result<Option<Vec<String>>, StoreError> {
        match self {
            Store::Postgres(s) => s.live_peers().map(Some),
            Store::Sqlite(_) => Ok(None),
        }
    }

    pub fn tunnels(&self) -> Result<Vec<crate::tunnel::Tunnel>, StoreError> {
        each!(self, s => s.tunnels())
    }

    /// One page of the stored tunnels (every gateway's, on a shared database) after the
    /// Call-ID `after`, and the cursor of the next page when there may be one.
    pub fn tunnel_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<crate::tunnel::Tunnel>, Option<String>), StoreError> {
        let q = TunnelQuery {
            after,
            call_id: None,
            limit: Some(limit),
        };
        let rows = each!(self, s => s.tunnel_rows(&q))?;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|t| t.call_id.clone()))
            .flatten();
        Ok((rows, next))
    }

    /// Every stored tunnel's (Call-ID, caller tag): what a gateway compares its table with
    /// after it may have missed notifications.
    pub fn tunnel_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        each!(self, s => s.tunnel_keys())
    }

    /// The stored tunnel of a Call-ID (whichever gateway set it up).
    pub fn tunnel(&self, call_id: &str) -> Result<Option<crate::tunnel::Tunnel>, StoreError> {
        let q = TunnelQuery {
            after: None,
            call_id: Some(call_id),
            limit: Some(1),
        };
        Ok(each!(self, s => s.tunnel_rows(&q))?.into_iter().next())
    }

    pub fn add_admin(
        &mut self,
        username: &str,
        password: &[u8],
        role: Role,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_admin(username, password, role))
    }

    pub fn delete_admin(&mut self, username: &str) -> Result<(), StoreError> {
        each!(self, s => s.delete_admin(username))
    }

    pub fn admins(&self) -> Result<Vec<(String, Role, bool)>, StoreError> {
        each!(self, s => s.admins())
    }

    /// An admin's credential and role.
    pub fn admin_credential(
        &self,
        username: &str,
    ) -> Result<Option<(Credential, Role)>, StoreError> {
        each!(self, s => s.admin_credential(username))
    }
}

/// The admins table as a credential source (for the admin API's SASL server).
#[derive(Debug)]
pub struct Admins<'a>(pub &'a Store);

impl CredentialSource for Admins<'_> {
    fn lookup(&self, username: &str) -> Option<Credential> {
        self.0
            .admin_credential(username)
            .ok()
            .flatten()
            .map(|(c, _)| c)
    }
}
