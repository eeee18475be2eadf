//! The PostgreSQL backend: the same tables and operations as the SQLite store, for several
//! gateways sharing one database (`[auth] store = "postgres://user:password@host:port/db"`).
//!
//! Every call blocks on the database: like the SQLite store, it is used only off the SIP loop
//! (the storage worker's thread, blocking tasks of the admin API, the CLI). The client is
//! rust-postgres's blocking `postgres::Client` (a thin wrapper over `tokio-postgres` on a
//! runtime of its own), behind a mutex so that reads take `&self` as they do on SQLite.
//!
//! Migrations are numbered (`gatehouse_schema.version`) and run under a transaction-scoped
//! advisory lock, so gateways starting together migrate once. Keys (`dialog-mac`,
//! `fake-verifier`) are created with `ON CONFLICT DO NOTHING` and read back: every gateway of
//! a cluster ends up with the same ones. Triggers move the users generation on every change
//! of a user or its AORs and `NOTIFY gatehouse_users`, and `NOTIFY gatehouse_tunnels` for every
//! tunnel row deleted.

// The I/O side, used off the loop only.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::sync::Mutex;

use gatehouse_auth::scram::{Verifier, MIN_ITERATIONS};
use gatehouse_auth::{Credential, Mechanism};
use postgres::{Client, NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    unix_now, validate_user, Applied, BindingRecord, Credentials, Reservation, Role, Snapshot,
    StoreError, StoreWrite, TunnelQuery, UserSummary,
};

/// The PostgreSQL schema, one entry per version. Never edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of SQLite's migrations 1 to 6, in PostgreSQL's types, with the users
    // generation kept (and announced) by statement triggers.
    "CREATE TABLE users (
        username    TEXT PRIMARY KEY,
        salt        BYTEA NOT NULL,
        iterations  INTEGER NOT NULL CHECK (iterations >= 4096),
        stored_key  BYTEA NOT NULL CHECK (length(stored_key) = 32),
        server_key  BYTEA NOT NULL CHECK (length(server_key) = 32),
        mechanisms  TEXT,
        enabled     BOOLEAN NOT NULL DEFAULT TRUE,
        created_at  BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL
    );
    CREATE TABLE user_aors (
        username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
        aor      TEXT NOT NULL,
        PRIMARY KEY (username, aor)
    );
    CREATE TABLE bindings (
        aor         TEXT NOT NULL,
        contact     TEXT NOT NULL,
        transport   TEXT NOT NULL,
        remote      TEXT NOT NULL,
        expires_at  BIGINT NOT NULL,
        instance    TEXT,
        identity    TEXT NOT NULL,
        reg_id      BIGINT,
        PRIMARY KEY (aor, contact)
    );
    CREATE TABLE keys (
        name  TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE tunnels (
        call_id      TEXT NOT NULL,
        caller_tag   TEXT NOT NULL,
        callee_tag   TEXT,
        identity     TEXT NOT NULL,
        from_aor     TEXT NOT NULL,
        to_aor       TEXT NOT NULL,
        prefixes     TEXT NOT NULL,
        pskmth       TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        state        TEXT NOT NULL,
        caller       TEXT,
        callee       TEXT,
        PRIMARY KEY (call_id, caller_tag)
    );
    CREATE TABLE admins (
        username    TEXT PRIMARY KEY,
        salt        BYTEA NOT NULL,
        iterations  INTEGER NOT NULL CHECK (iterations >= 4096),
        stored_key  BYTEA NOT NULL CHECK (length(stored_key) = 32),
        server_key  BYTEA NOT NULL CHECK (length(server_key) = 32),
        role        TEXT NOT NULL CHECK (role IN ('admin', 'read-only')),
        enabled     BOOLEAN NOT NULL DEFAULT TRUE
    );
    CREATE TABLE generations (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO generations (name, value) VALUES ('users', 0);
    CREATE FUNCTION gatehouse_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE generations SET value = value + 1 WHERE name = 'users';
        PERFORM pg_notify('gatehouse_users', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
        FOR EACH STATEMENT EXECUTE FUNCTION gatehouse_users_changed();
    CREATE TRIGGER user_aors_changed AFTER INSERT OR UPDATE OR DELETE ON user_aors
        FOR EACH STATEMENT EXECUTE FUNCTION gatehouse_users_changed();",
    // 2: a tunnel row deleted anywhere (a BYE, a teardown through any gateway's admin API)
    // is announced, so the gateway holding it in memory forgets it too.
    "CREATE FUNCTION gatehouse_tunnel_gone() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('gatehouse_tunnels', OLD.call_id || ' ' || OLD.caller_tag);
        RETURN NULL;
    END $$;
    CREATE TRIGGER tunnel_gone AFTER DELETE ON tunnels
        FOR EACH ROW EXECUTE FUNCTION gatehouse_tunnel_gone();",
    // 3: the gateway holding a binding's flow (`[cluster] peer_uri`), and every change of a
    // binding announced with the AOR and the writer's instance (`gatehouse.instance`, set by
    // each gateway's connection; empty for others), so the other gateways reload that AOR.
    "ALTER TABLE bindings ADD COLUMN holder TEXT;
    CREATE FUNCTION gatehouse_binding_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        changed TEXT;
    BEGIN
        IF TG_OP = 'DELETE' THEN changed := OLD.aor; ELSE changed := NEW.aor; END IF;
        PERFORM pg_notify('gatehouse_bindings',
            coalesce(current_setting('gatehouse.instance', true), '') || ' ' || changed);
        RETURN NULL;
    END $$;
    CREATE TRIGGER binding_changed AFTER INSERT OR UPDATE OR DELETE ON bindings
        FOR EACH ROW EXECUTE FUNCTION gatehouse_binding_changed();",
    // 4: tunnels counted in total, per identity and per target by a trigger, so that a
    // tunnel's limits are checked against the whole cluster in the transaction that inserts
    // it (`ReserveTunnel`). The `total` row is always locked first: no deadlock.
    "CREATE TABLE tunnel_counts (
        kind TEXT NOT NULL,
        key  TEXT NOT NULL,
        n    BIGINT NOT NULL,
        PRIMARY KEY (kind, key)
    );
    INSERT INTO tunnel_counts SELECT 'total', '', count(*) FROM tunnels;
    INSERT INTO tunnel_counts SELECT 'identity', identity, count(*) FROM tunnels GROUP BY identity;
    INSERT INTO tunnel_counts SELECT 'target', to_aor, count(*) FROM tunnels GROUP BY to_aor;
    CREATE FUNCTION gatehouse_tunnel_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        d BIGINT;
        ident TEXT;
        target TEXT;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            d := 1; ident := NEW.identity; target := NEW.to_aor;
        ELSE
            d := -1; ident := OLD.identity; target := OLD.to_aor;
        END IF;
        INSERT INTO tunnel_counts (kind, key, n) VALUES ('total', '', d)
            ON CONFLICT (kind, key) DO UPDATE SET n = tunnel_counts.n + EXCLUDED.n;
        INSERT INTO tunnel_counts (kind, key, n) VALUES ('identity', ident, d)
            ON CONFLICT (kind, key) DO UPDATE SET n = tunnel_counts.n + EXCLUDED.n;
        INSERT INTO tunnel_counts (kind, key, n) VALUES ('target', target, d)
            ON CONFLICT (kind, key) DO UPDATE SET n = tunnel_counts.n + EXCLUDED.n;
        IF d < 0 THEN
            DELETE FROM tunnel_counts WHERE kind <> 'total' AND key IN (ident, target) AND n <= 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tunnel_counted AFTER INSERT OR DELETE ON tunnels
        FOR EACH ROW EXECUTE FUNCTION gatehouse_tunnel_counted();",
    // 5: the caller's WireGuard public key of a tunnel (a live tunnel's key belongs to its
    // identity: `tunnel::claims`; the same column as SQLite's migration 8).
    "ALTER TABLE tunnels ADD COLUMN pubkey TEXT NOT NULL DEFAULT '';",
];

/// The prefix of the `application_name` of a gateway's listening connection; the rest is its
/// `[cluster] peer_uri`. The gateways whose listener is connected are the live ones
/// ([`PgStore::live_peers`]): a gateway that dies loses its connection with it.
const PRESENCE: &str = "gatehouse ";

/// What a notification on the shared database says (`PgStore::follow_changes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user or its AORs changed.
    Users,
    /// The listener (re)connected: notifications may have been missed meanwhile.
    Connected,
    /// A tunnel's row left the database: `(Call-ID, caller tag)`.
    TunnelGone(String, String),
    /// Another gateway (or a CLI) changed the bindings of this AOR.
    Bindings(String),
    /// Another gateway authenticated someone, or failed to.
    AuthOutcome {
        user: Option<String>,
        source: std::net::IpAddr,
        success: bool,
    },
}

impl Change {
    /// A `gatehouse_auth` payload (`instance seq success source user`); `None` when
    /// malformed or sent by `own` instance.
    fn auth_outcome(payload: &str, own: u64) -> Option<Change> {
        let mut it = payload.splitn(5, ' ');
        let instance: u64 = it.next()?.parse().ok()?;
        let _seq = it.next()?;
        let success = it.next()? == "1";
        let source = it.next()?.parse().ok()?;
        let user = it.next().filter(|u| !u.is_empty()).map(str::to_owned);
        (instance != own).then_some(Change::AuthOutcome {
            user,
            source,
            success,
        })
    }

    /// A `gatehouse_bindings` payload (`instance aor`); `None` when sent by `own` instance.
    fn bindings(payload: &str, own: u64) -> Option<Change> {
        let (instance, aor) = payload.split_once(' ')?;
        (instance.parse::<u64>().ok() != Some(own) && !aor.is_empty())
            .then(|| Change::Bindings(aor.to_owned()))
    }
}

/// The columns [`binding_row`] reads, in its order.
const BINDING_COLUMNS: &str =
    "aor, contact, transport, remote, expires_at, instance, identity, reg_id, holder";

fn binding_row(r: &Row) -> BindingRecord {
    BindingRecord {
        aor: r.get(0),
        contact: r.get(1),
        transport: r.get(2),
        remote: r.get(3),
        expires_at: r.get::<_, i64>(4) as u64,
        instance: r.get(5),
        identity: r.get(6),
        reg_id: r
            .get::<_, Option<i64>>(7)
            .and_then(|v| u32::try_from(v).ok()),
        holder: r.get(8),
    }
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Arbitrary, fixed: the advisory lock every gateway takes to migrate.
const MIGRATION_LOCK: i64 = 0x6761_7465_686f_7573; // "gatehous"

/// A connection to the shared database.
pub struct PgStore {
    /// `None` after the connection broke (the next call connects again) and at drop.
    client: Mutex<Option<Client>>,
    /// Where to connect again (holds the password: never logged or printed).
    config: postgres::Config,
    /// TLS to the database, when the URL asks for it.
    tls: Tls,
    /// This connection's number in the `gatehouse_auth` notifications it sends (so that its
    /// own listener skips them).
    instance: u64,
    /// Outcomes announced so far (their sequence numbers).
    notified: std::sync::atomic::AtomicU64,
}

/// The locked, connected client of a [`PgStore`].
struct Conn<'a>(std::sync::MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("present until drop")
    }
}

impl Drop for PgStore {
    /// Closing the connection blocks on the client's runtime: off any async runtime too.
    fn drop(&mut self) {
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = client {
            off_runtime(move || drop(c));
        }
    }
}

impl std::fmt::Debug for PgStore {
    // The URL may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

fn pg(e: postgres::Error) -> StoreError {
    // An error the server reported (a constraint, a type) is final; anything else (refused,
    // reset, closed, timed out) says the database is unreachable: worth retrying.
    let transient = e.as_db_error().is_none() || e.is_closed();
    StoreError::Postgres {
        message: e.to_string(),
        transient,
    }
}

fn key32(v: Vec<u8>) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(v).ok()
}

fn mechanisms(m: Option<String>) -> Option<Vec<Mechanism>> {
    m.map(|m| {
        m.split_whitespace()
            .filter_map(Mechanism::from_name)
            .collect()
    })
}

fn credential(username: String, r: &Row, aors: Vec<String>) -> Option<Credential> {
    Some(Credential {
        username,
        verifier: Verifier {
            salt: r.get("salt"),
            iterations: u32::try_from(r.get::<_, i32>("iterations")).ok()?,
            stored_key: key32(r.get("stored_key"))?,
            server_key: key32(r.get("server_key"))?,
        },
        aors,
        // The admins table has no mechanisms column: none means every offered one.
        mechanisms: mechanisms(r.try_get("mechanisms").ok().flatten()),
        enabled: r.get("enabled"),
    })
}

/// Runs `f`, a call of the blocking client. Inside an async runtime (the gateway's start, the
/// admin API) that client may not start its own runtime on the same thread: the call then
/// runs on a scoped thread of its own (the caller waits, as it would for SQLite); elsewhere
/// (the storage worker, the CLI) it runs here.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| s.spawn(f).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// How the connections to the database are made: plain TCP, or TLS (rustls) verified against
/// the CA named by the URL's `sslrootcert`.
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(MakeRustlsConnect),
}

impl Tls {
    /// Reads `sslmode` and `sslrootcert` from the URL's query (libpq's names). `sslmode=require`
    /// (or `verify-ca`, `verify-full`) means TLS with the server's certificate verified against
    /// `sslrootcert` and its name against the URL's host: never encryption without
    /// authentication. `disable` or no `sslmode` is plain TCP (a private network); `prefer`
    /// (libpq's default, TLS that silently falls back) is refused as a false promise.
    /// Returns the URL without `sslrootcert` (rust-postgres does not know it).
    fn from_url(url: &str) -> Result<(String, Tls), StoreError> {
        let invalid = |m: String| StoreError::Invalid(m);
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), Tls::Plain));
        };
        let mut kept = Vec::new();
        let (mut mode, mut root) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslrootcert", v)) => {
                    root = Some(
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned(),
                    )
                }
                Some(("sslmode", v)) => mode = Some(v.to_owned()),
                _ => kept.push(pair),
            }
        }
        let query = kept.join("&");
        let url = if query.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{query}")
        };
        match (mode.as_deref(), root) {
            (None | Some("disable"), None) => Ok((url, Tls::Plain)),
            (Some("require" | "verify-ca" | "verify-full"), Some(root)) => {
                let config = crate::tls::roots_from_pem_file(std::path::Path::new(&root))
                    .and_then(crate::tls::client_config)
                    .map_err(|e| invalid(format!("sslrootcert {e}")))?;
                // rust-postgres then insists on TLS (it knows no verify-* modes).
                let url = format!("{url}{}sslmode=require", if url.contains('?') { "&" } else { "?" });
                Ok((url, Tls::Rustls(MakeRustlsConnect::new(config))))
            }
            (Some("require" | "verify-ca" | "verify-full"), None) => Err(invalid(
                "sslmode=require needs sslrootcert=FILE: the CA certificate (PEM) that signed the database's certificate".into(),
            )),
            (None | Some("disable"), Some(_)) => Err(invalid(
                "sslrootcert without sslmode=require".into(),
            )),
            (Some(m), _) => Err(invalid(format!(
                "sslmode={m}: use require (TLS, certificate verified against sslrootcert) or disable"
            ))),
        }
    }

    fn connect(&self, config: &postgres::Config) -> Result<Client, postgres::Error> {
        match self {
            Tls::Plain => config.connect(NoTls),
            Tls::Rustls(tls) => config.connect(tls.clone()),
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/dbname`, with
    /// `?sslmode=require&sslrootcert=FILE` for TLS) and migrates.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        off_runtime(|| {
            let (url, tls) = Tls::from_url(url)?;
            let mut config: postgres::Config = url.parse().map_err(pg)?;
            // A database host that does not answer must not hold the worker for minutes.
            config.connect_timeout(CONNECT_TIMEOUT);
            // The binding trigger names the writer, so that its own listener skips the change.
            let instance: u64 = rand::random();
            let options = match config.get_options() {
                Some(o) => format!("{o} -c gatehouse.instance={instance}"),
                None => format!("-c gatehouse.instance={instance}"),
            };
            config.options(&options);
            let client = tls.connect(&config).map_err(pg)?;
            let store = PgStore {
                client: Mutex::new(Some(client)),
                config,
                tls,
                instance,
                notified: std::sync::atomic::AtomicU64::new(0),
            };
            store.migrate()?;
            Ok(store)
        })
    }

    /// Runs a database call (see [`off_runtime`]).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        off_runtime(f)
    }

    /// The connection, connecting again first when the last one broke (the database
    /// restarted or the network failed): the caller gets an error only while it stays down.
    fn client(&self) -> Result<Conn<'_>, StoreError> {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let fresh = self.tls.connect(&self.config).map_err(pg)?;
            tracing::info!("connected to PostgreSQL again");
            *guard = Some(fresh);
        }
        Ok(Conn(guard))
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client()?;
        let mut tx = c.transaction().map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS gatehouse_schema (version INTEGER NOT NULL)")
            .map_err(pg)?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM gatehouse_schema", &[])
            .map_err(pg)?
        {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO gatehouse_schema (version) VALUES (0)", &[])
                    .map_err(pg)?;
                0
            }
        };
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(m).map_err(pg)?;
            tx.execute(
                "UPDATE gatehouse_schema SET version = $1",
                &[&((i + 1) as i32)],
            )
            .map_err(pg)?;
        }
        tx.commit().map_err(pg)
    }

    /// Starts a thread that `LISTEN`s on `gatehouse_users` and `gatehouse_tunnels` over a
    /// connection of its own and calls `changed` at each notification (a user or its AORs
    /// changed, a tunnel row deleted, through any gateway or CLI of the cluster). It connects
    /// again after an outage (pausing a second between attempts), reports
    /// [`Change::Connected`] after each connection (a change may have been missed), and ends when
    /// `changed` returns false or `stop` is set (seen within a second). With a `peer` URI
    /// (`[cluster] peer_uri`) the connection announces this gateway as live to the others
    /// ([`PgStore::live_peers`]).
    pub fn follow_changes(
        &self,
        peer: Option<&str>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        changed: impl Fn(Change) -> bool + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        use postgres::fallible_iterator::FallibleIterator;
        use std::sync::atomic::Ordering;
        let mut config = self.config.clone();
        if let Some(peer) = peer {
            config.application_name(&format!("{PRESENCE}{peer}"));
        }
        let tls = self.tls.clone();
        let own = self.instance;
        let round = std::time::Duration::from_secs(1);
        std::thread::Builder::new()
            .name("gatehouse-pg-listen".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut client = match tls.connect(&config) {
                        Ok(c) => c,
                        Err(_) => {
                            // The storage worker reports the outage; this only retries.
                            std::thread::sleep(round);
                            continue;
                        }
                    };
                    if client
                        .batch_execute(
                            "LISTEN gatehouse_users; LISTEN gatehouse_tunnels; LISTEN gatehouse_auth; \
                             LISTEN gatehouse_bindings",
                        )
                        .is_err()
                    {
                        std::thread::sleep(round);
                        continue;
                    }
                    // After a (re)connection a change may have been missed: resynchronise.
                    if !changed(Change::Connected) {
                        return;
                    }
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let next = {
                            let mut notifications = client.notifications();
                            let mut waiting = notifications.timeout_iter(round);
                            waiting.next()
                        };
                        match next {
                            Ok(Some(n)) => {
                                let change = match n.channel() {
                                    "gatehouse_tunnels" => {
                                        let (call_id, tag) =
                                            n.payload().split_once(' ').unwrap_or((n.payload(), ""));
                                        Some(Change::TunnelGone(call_id.to_owned(), tag.to_owned()))
                                    }
                                    "gatehouse_auth" => Change::auth_outcome(n.payload(), own),
                                    "gatehouse_bindings" => Change::bindings(n.payload(), own),
                                    _ => Some(Change::Users),
                                };
                                if change.is_some_and(|c| !changed(c)) {
                                    return;
                                }
                            }
                            Err(_) => break,
                            Ok(None) if client.is_closed() => break,
                            Ok(None) => {}
                        }
                    }
                }
            })
    }

    /// A named 32-byte key, created at random by the first gateway that asks.
    pub fn key(&self, name: &str) -> Result<[u8; 32], StoreError> {
        self.run(|| {
            let mut c = self.client()?;
            let k: [u8; 32] = rand::random();
            c.execute(
                "INSERT INTO keys (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &k.as_slice()],
            )
            .map_err(pg)?;
            let v: Vec<u8> = c
                .query_one("SELECT value FROM keys WHERE name = $1", &[&name])
                .map_err(pg)?
                .get(0);
            key32(v).ok_or_else(|| StoreError::Invalid(format!("key `{name}` is not 32 bytes")))
        })
    }

    pub fn add_user(
        &self,
        username: &str,
        password: &[u8],
        aors: &[String],
        mechanisms: Option<&[Mechanism]>,
        iterations: u32,
    ) -> Result<(), StoreError> {
        self.run(|| {
        validate_user(username, aors)?;
        if iterations < MIN_ITERATIONS {
            return Err(StoreError::Invalid(format!(
                "iterations must be at least {MIN_ITERATIONS}"
            )));
        }
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), iterations);
        let mechs = mechanisms.map(|m| m.iter().map(|m| m.name()).collect::<Vec<_>>().join(" "));
        let mut c = self.client()?;
        let mut tx = c.transaction().map_err(pg)?;
        let now = unix_now();
        let inserted = tx
            .execute(
                "INSERT INTO users (username, salt, iterations, stored_key, server_key, mechanisms, enabled, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7, $7) ON CONFLICT (username) DO NOTHING",
                &[&username, &v.salt, &(v.iterations as i32), &v.stored_key.as_slice(), &v.server_key.as_slice(), &mechs, &now],
            )
            .map_err(pg)?;
        if inserted == 0 {
            return Err(StoreError::Exists(username.into()));
        }
        for a in aors {
            tx.execute(
                "INSERT INTO user_aors (username, aor) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&username, a],
            )
            .map_err(pg)?;
        }
        tx.commit().map_err(pg)
        })
    }

    pub fn set_password(
        &self,
        username: &str,
        password: &[u8],
        iterations: u32,
    ) -> Result<(), StoreError> {
        self.run(|| {
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), iterations.max(MIN_ITERATIONS));
        let n = self
            .client()?
            .execute(
                "UPDATE users SET salt = $2, iterations = $3, stored_key = $4, server_key = $5, updated_at = $6 WHERE username = $1",
                &[&username, &v.salt, &(v.iterations as i32), &v.stored_key.as_slice(), &v.server_key.as_slice(), &unix_now()],
            )
            .map_err(pg)?;
        if n == 0 {
            return Err(StoreError::NoUser(username.into()));
        }
        Ok(())
        })
    }

    pub fn set_enabled(&self, username: &str, enabled: bool) -> Result<(), StoreError> {
        self.run(|| {
            let n = self
                .client()?
                .execute(
                    "UPDATE users SET enabled = $2, updated_at = $3 WHERE username = $1",
                    &[&username, &enabled, &unix_now()],
                )
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NoUser(username.into()));
            }
            Ok(())
        })
    }

    pub fn delete_user(&self, username: &str) -> Result<(), StoreError> {
        self.run(|| {
            let n = self
                .client()?
                .execute("DELETE FROM users WHERE username = $1", &[&username])
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NoUser(username.into()));
            }
            Ok(())
        })
    }

    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        self.run(|| {
            let names: Vec<String> = self
                .client()?
                .query("SELECT username FROM users ORDER BY username", &[])
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            names
                .iter()
                .map(|n| self.user(n)?.ok_or_else(|| StoreError::NoUser(n.clone())))
                .collect()
        })
    }

    pub fn user(&self, username: &str) -> Result<Option<UserSummary>, StoreError> {
        self.run(|| {
            let Some(r) = self
                .client()?
                .query_opt(
                    "SELECT mechanisms, enabled, iterations FROM users WHERE username = $1",
                    &[&username],
                )
                .map_err(pg)?
            else {
                return Ok(None);
            };
            let mechs: Option<String> = r.get(0);
            Ok(Some(UserSummary {
                username: username.into(),
                aors: self.aors(username)?,
                mechanisms: mechs.map(|m| m.split_whitespace().map(str::to_owned).collect()),
                enabled: r.get(1),
                iterations: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
            }))
        })
    }

    fn aors(&self, username: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .client()?
            .query(
                "SELECT aor FROM user_aors WHERE username = $1 ORDER BY aor",
                &[&username],
            )
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The full credential of a user (for the SASL server).
    pub fn credential(&self, username: &str) -> Result<Option<Credential>, StoreError> {
        self.run(|| {
        let row = self
            .client()?
            .query_opt(
                "SELECT salt, iterations, stored_key, server_key, mechanisms, enabled FROM users WHERE username = $1",
                &[&username],
            )
            .map_err(pg)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let aors = self.aors(username)?;
        Ok(credential(username.to_owned(), &r, aors))
        })
    }

    /// The generation of the users table (moves on every change of a user or its AORs).
    pub fn users_generation(&self) -> Result<i64, StoreError> {
        self.run(|| {
            Ok(self
                .client()?
                .query_one("SELECT value FROM generations WHERE name = 'users'", &[])
                .map_err(pg)?
                .get(0))
        })
    }

    /// Every user's credential (the core's in-memory snapshot).
    pub fn credentials(&self) -> Result<Credentials, StoreError> {
        self.run(|| {
        let mut c = self.client()?;
        let mut aors: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in c
            .query(
                "SELECT username, aor FROM user_aors ORDER BY username, aor",
                &[],
            )
            .map_err(pg)?
        {
            aors.entry(r.get(0)).or_default().push(r.get(1));
        }
        let mut out = Credentials::new();
        for r in c
            .query(
                "SELECT username, salt, iterations, stored_key, server_key, mechanisms, enabled FROM users",
                &[],
            )
            .map_err(pg)?
        {
            let username: String = r.get("username");
            let user_aors = aors.remove(&username).unwrap_or_default();
            if let Some(cred) = credential(username.clone(), &r, user_aors) {
                out.insert(username, cred);
            }
        }
        Ok(out)
        })
    }

    /// What a starting core needs: credentials, live bindings (expired ones deleted), tunnels.
    pub fn snapshot(&self, now_unix: u64) -> Result<Snapshot, StoreError> {
        self.run(|| {
            Ok(Snapshot {
                credentials: self.credentials()?,
                bindings: self.live_bindings(now_unix)?,
                tunnels: self.tunnels()?,
            })
        })
    }

    /// Applies a batch of the core's writes in one transaction (all or nothing).
    pub fn apply(&self, writes: &[StoreWrite]) -> Result<Applied, StoreError> {
        self.run(|| {
        let mut applied = Applied::default();
        let mut c = self.client()?;
        let mut tx = c.transaction().map_err(pg)?;
        for w in writes {
            match w {
                StoreWrite::SaveBinding(b) => {
                    tx.execute(
                        "INSERT INTO bindings (aor, contact, transport, remote, expires_at, instance, identity, reg_id, holder)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                         ON CONFLICT (aor, contact) DO UPDATE SET transport = EXCLUDED.transport,
                           remote = EXCLUDED.remote, expires_at = EXCLUDED.expires_at,
                           instance = EXCLUDED.instance, identity = EXCLUDED.identity, reg_id = EXCLUDED.reg_id,
                           holder = EXCLUDED.holder",
                        &[&b.aor, &b.contact, &b.transport, &b.remote, &(b.expires_at as i64), &b.instance, &b.identity, &b.reg_id.map(i64::from), &b.holder],
                    )
                    .map_err(pg)?;
                }
                StoreWrite::RemoveBinding { aor, contact } => {
                    tx.execute(
                        "DELETE FROM bindings WHERE aor = $1 AND contact = $2",
                        &[aor, contact],
                    )
                    .map_err(pg)?;
                }
                StoreWrite::SaveTunnel(t) => {
                    tx.execute(
                        "INSERT INTO tunnels (call_id, caller_tag, callee_tag, identity, from_aor, to_aor, prefixes, pskmth, created_at, state, caller, callee, pubkey)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                         ON CONFLICT (call_id, caller_tag) DO UPDATE SET callee_tag = EXCLUDED.callee_tag,
                           identity = EXCLUDED.identity, from_aor = EXCLUDED.from_aor, to_aor = EXCLUDED.to_aor,
                           prefixes = EXCLUDED.prefixes, pskmth = EXCLUDED.pskmth, created_at = EXCLUDED.created_at,
                           state = EXCLUDED.state, caller = EXCLUDED.caller, callee = EXCLUDED.callee, pubkey = EXCLUDED.pubkey",
                        &[
                            &t.call_id, &t.caller_tag, &t.callee_tag, &t.identity, &t.from, &t.to,
                            &t.prefixes, &t.pskmth, &(t.created_unix as i64), &t.state.as_str(),
                            &t.caller.as_ref().map(|p| p.encode()), &t.callee.as_ref().map(|p| p.encode()), &t.pubkey,
                        ],
                    )
                    .map_err(pg)?;
                }
                StoreWrite::DeleteTunnel {
                    call_id,
                    caller_tag,
                } => {
                    tx.execute(
                        "DELETE FROM tunnels WHERE call_id = $1 AND caller_tag = $2",
                        &[call_id, caller_tag],
                    )
                    .map_err(pg)?;
                }
                StoreWrite::AuthOutcome {
                    user,
                    source,
                    success,
                } => {
                    // Delivered at commit; the sender knows itself by its instance number, and
                    // the sequence number keeps equal outcomes of one transaction apart
                    // (PostgreSQL delivers identical notifications of a transaction once).
                    let seq = self.notified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let payload = format!(
                        "{} {seq} {} {source} {}",
                        self.instance,
                        u8::from(*success),
                        user.as_deref().unwrap_or("")
                    );
                    tx.execute("SELECT pg_notify('gatehouse_auth', $1)", &[&payload])
                        .map_err(pg)?;
                }
                StoreWrite::ReserveTunnel {
                    call_id,
                    caller_tag,
                    identity,
                    to,
                    max_total,
                    max_per_identity,
                    max_per_target,
                    wait_until_unix,
                } => {
                    // Queued through an outage: the core went ahead without the answer.
                    if unix_now() > *wait_until_unix as i64 {
                        continue;
                    }
                    // The counters include this tunnel (its row went in above, the trigger
                    // counted it) and every tunnel committed before: another transaction
                    // inserting a tunnel waits on the `total` counter row until this one ends,
                    // so two gateways cannot both take the last place.
                    let rows = tx
                        .query(
                            "SELECT kind, n FROM tunnel_counts WHERE (kind = 'total' AND key = '')
                               OR (kind = 'identity' AND key = $1) OR (kind = 'target' AND key = $2)
                             FOR UPDATE",
                            &[identity, to],
                        )
                        .map_err(pg)?;
                    let count = |kind: &str| {
                        rows.iter()
                            .find(|r| r.get::<_, &str>(0) == kind)
                            .map_or(0, |r| r.get::<_, i64>(1))
                    };
                    let over = |max: &Option<u32>, kind: &str| {
                        max.is_some_and(|m| count(kind) > i64::from(m))
                    };
                    use gatehouse_policy::Denied;
                    let refused = if over(max_total, "total") {
                        Some(Denied::LimitTotal)
                    } else if over(max_per_identity, "identity") {
                        Some(Denied::LimitIdentity)
                    } else if over(max_per_target, "target") {
                        Some(Denied::LimitTarget)
                    } else {
                        None
                    };
                    if refused.is_some() {
                        tx.execute(
                            "DELETE FROM tunnels WHERE call_id = $1 AND caller_tag = $2",
                            &[call_id, caller_tag],
                        )
                        .map_err(pg)?;
                    }
                    applied.reservations.push(Reservation {
                        call_id: call_id.clone(),
                        caller_tag: caller_tag.clone(),
                        refused,
                    });
                }
            }
        }
        tx.commit().map_err(pg)?;
        Ok(applied)
        })
    }

    /// Bindings not yet expired at `now_unix`; expired ones are deleted.
    pub fn live_bindings(&self, now_unix: u64) -> Result<Vec<BindingRecord>, StoreError> {
        self.run(|| {
            let mut c = self.client()?;
            c.execute(
                "DELETE FROM bindings WHERE expires_at <= $1",
                &[&(now_unix as i64)],
            )
            .map_err(pg)?;
            Ok(c.query(
                &format!("SELECT {BINDING_COLUMNS} FROM bindings ORDER BY aor"),
                &[],
            )
            .map_err(pg)?
            .iter()
            .map(binding_row)
            .collect())
        })
    }

    /// The bindings of one AOR not yet expired at `now_unix`.
    pub fn bindings_of(&self, aor: &str, now_unix: u64) -> Result<Vec<BindingRecord>, StoreError> {
        self.run(|| {
            let mut c = self.client()?;
            Ok(c.query(
                &format!(
                    "SELECT {BINDING_COLUMNS} FROM bindings WHERE aor = $1 AND expires_at > $2"
                ),
                &[&aor, &(now_unix as i64)],
            )
            .map_err(pg)?
            .iter()
            .map(binding_row)
            .collect())
        })
    }

    /// The `[cluster] peer_uri` of every gateway whose listener is connected now (this one's
    /// included): its `application_name` says so ([`PRESENCE`]).
    pub fn live_peers(&self) -> Result<Vec<String>, StoreError> {
        self.run(|| {
            let mut c = self.client()?;
            Ok(c.query(
                "SELECT DISTINCT substr(application_name, $1) FROM pg_stat_activity
                     WHERE starts_with(application_name, $2)",
                &[&(PRESENCE.len() as i32 + 1), &PRESENCE],
            )
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    pub fn tunnels(&self) -> Result<Vec<crate::tunnel::Tunnel>, StoreError> {
        self.tunnel_rows(&TunnelQuery::default())
    }

    /// Every tunnel's (Call-ID, caller tag).
    pub fn tunnel_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.run(|| {
            Ok(self
                .client()?
                .query("SELECT call_id, caller_tag FROM tunnels", &[])
                .map_err(pg)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    /// Tunnel rows in Call-ID order, from a cursor or of one Call-ID, at most `limit`.
    pub fn tunnel_rows(
        &self,
        q: &TunnelQuery<'_>,
    ) -> Result<Vec<crate::tunnel::Tunnel>, StoreError> {
        let limit = q.limit.map(|l| l as i64);
        self.run(|| {
        Ok(self
            .client()?
            .query(
                "SELECT call_id, caller_tag, callee_tag, identity, from_aor, to_aor, prefixes, pskmth, created_at, state, caller, callee, pubkey FROM tunnels \
                 WHERE ($1::text IS NULL OR call_id > $1) AND ($2::text IS NULL OR call_id = $2) ORDER BY call_id, caller_tag LIMIT $3",
                &[&q.after, &q.call_id, &limit],
            )
            .map_err(pg)?
            .iter()
            .map(|r| crate::tunnel::Tunnel {
                call_id: r.get(0),
                caller_tag: r.get(1),
                callee_tag: r.get(2),
                identity: r.get(3),
                from: r.get(4),
                to: r.get(5),
                prefixes: r.get(6),
                pskmth: r.get(7),
                created_unix: r.get::<_, i64>(8) as u64,
                state: crate::tunnel::TunnelState::parse(r.get(9)),
                caller: r
                    .get::<_, Option<String>>(10)
                    .as_deref()
                    .and_then(crate::tunnel::Party::decode),
                callee: r
                    .get::<_, Option<String>>(11)
                    .as_deref()
                    .and_then(crate::tunnel::Party::decode),
                pubkey: r.get(12),
            })
            .collect())
        })
    }

    pub fn add_admin(&self, username: &str, password: &[u8], role: Role) -> Result<(), StoreError> {
        self.run(|| {
        validate_user(username, &[])?;
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), MIN_ITERATIONS);
        let n = self
            .client()?
            .execute(
                "INSERT INTO admins (username, salt, iterations, stored_key, server_key, role) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (username) DO NOTHING",
                &[&username, &v.salt, &(v.iterations as i32), &v.stored_key.as_slice(), &v.server_key.as_slice(), &role.as_str()],
            )
            .map_err(pg)?;
        if n == 0 {
            return Err(StoreError::Exists(username.into()));
        }
        Ok(())
        })
    }

    pub fn delete_admin(&self, username: &str) -> Result<(), StoreError> {
        self.run(|| {
            let n = self
                .client()?
                .execute("DELETE FROM admins WHERE username = $1", &[&username])
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NoUser(username.into()));
            }
            Ok(())
        })
    }

    pub fn admins(&self) -> Result<Vec<(String, Role, bool)>, StoreError> {
        self.run(|| {
            Ok(self
                .client()?
                .query(
                    "SELECT username, role, enabled FROM admins ORDER BY username",
                    &[],
                )
                .map_err(pg)?
                .iter()
                .filter_map(|r| Role::parse(r.get(1)).map(|role| (r.get(0), role, r.get(2))))
                .collect())
        })
    }

    /// An admin's credential and role.
    pub fn admin_credential(
        &self,
        username: &str,
    ) -> Result<Option<(Credential, Role)>, StoreError> {
        self.run(|| {
        let row = self
            .client()?
            .query_opt(
                "SELECT salt, iterations, stored_key, server_key, role, enabled FROM admins WHERE username = $1",
                &[&username],
            )
            .map_err(pg)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let Some(role) = Role::parse(r.get("role")) else {
            return Ok(None);
        };
        Ok(credential(username.to_owned(), &r, Vec::new()).map(|c| (c, role)))
        })
    }
}
