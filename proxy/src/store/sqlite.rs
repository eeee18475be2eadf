//! The embedded store: one SQLite file (WAL), the single-host default. Both the running
//! gateway and `gatehouse user ...` open the same file; WAL mode and a busy timeout make that
//! safe. Schema changes are numbered migrations (`PRAGMA user_version`).

// The I/O side: read and written off the SIP loop (the storage worker), with wall-clock
// timestamps.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::Path;
use std::time::Duration;

use gatehouse_auth::scram::{Verifier, MIN_ITERATIONS};
use gatehouse_auth::{Credential, Mechanism};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    journal, unix_now, validate_user, Applied, BindingRecord, Credentials, Reservation, Role,
    Snapshot, StoreError, StoreWrite, TunnelQuery, UserSummary,
};

const MIGRATIONS: &[&str] = &[
    // 1: users, their AORs, registrar bindings, gateway keys.
    "CREATE TABLE users (
        username    TEXT PRIMARY KEY NOT NULL,
        salt        BLOB NOT NULL,
        iterations  INTEGER NOT NULL CHECK (iterations >= 4096),
        stored_key  BLOB NOT NULL CHECK (length(stored_key) = 32),
        server_key  BLOB NOT NULL CHECK (length(server_key) = 32),
        mechanisms  TEXT,
        enabled     INTEGER NOT NULL DEFAULT 1,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
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
        expires_at  INTEGER NOT NULL,
        instance    TEXT,
        identity    TEXT NOT NULL,
        PRIMARY KEY (aor, contact)
    );
    CREATE TABLE keys (
        name  TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    );",
    // 2: the tunnel table.
    "CREATE TABLE tunnels (
        call_id      TEXT NOT NULL,
        caller_tag   TEXT NOT NULL,
        callee_tag   TEXT,
        identity     TEXT NOT NULL,
        from_aor     TEXT NOT NULL,
        to_aor       TEXT NOT NULL,
        prefixes     TEXT NOT NULL,
        pskmth       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        state        TEXT NOT NULL,
        PRIMARY KEY (call_id, caller_tag)
    );",
    // 3: admin identities (their own realm and role), separate from SIP users.
    "CREATE TABLE admins (
        username    TEXT PRIMARY KEY NOT NULL,
        salt        BLOB NOT NULL,
        iterations  INTEGER NOT NULL CHECK (iterations >= 4096),
        stored_key  BLOB NOT NULL CHECK (length(stored_key) = 32),
        server_key  BLOB NOT NULL CHECK (length(server_key) = 32),
        role        TEXT NOT NULL CHECK (role IN ('admin', 'read-only')),
        enabled     INTEGER NOT NULL DEFAULT 1
    );",
    // 4: how to reach both parties of a tunnel (admin teardown).
    "ALTER TABLE tunnels ADD COLUMN caller TEXT; ALTER TABLE tunnels ADD COLUMN callee TEXT;",
    // 5: a generation counter of the users and their AORs, kept by triggers whoever writes
    // (gateway, CLI, admin API): a running gateway re-reads its credential snapshot when it
    // moves.
    "CREATE TABLE generations (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
    INSERT INTO generations (name, value) VALUES ('users', 0);
    CREATE TRIGGER users_insert AFTER INSERT ON users
        BEGIN UPDATE generations SET value = value + 1 WHERE name = 'users'; END;
    CREATE TRIGGER users_update AFTER UPDATE ON users
        BEGIN UPDATE generations SET value = value + 1 WHERE name = 'users'; END;
    CREATE TRIGGER users_delete AFTER DELETE ON users
        BEGIN UPDATE generations SET value = value + 1 WHERE name = 'users'; END;
    CREATE TRIGGER user_aors_insert AFTER INSERT ON user_aors
        BEGIN UPDATE generations SET value = value + 1 WHERE name = 'users'; END;
    CREATE TRIGGER user_aors_delete AFTER DELETE ON user_aors
        BEGIN UPDATE generations SET value = value + 1 WHERE name = 'users'; END;",
    // 6: RFC 5626 reg-id of a binding: with the instance, which flow of a device it is.
    "ALTER TABLE bindings ADD COLUMN reg_id INTEGER;",
    // 7: the gateway holding a binding's flow (`[cluster] peer_uri`; the same column as
    // PostgreSQL's migration 3, so both backends keep the same rows).
    "ALTER TABLE bindings ADD COLUMN holder TEXT;",
    // 8: the caller's WireGuard public key of a tunnel (a live tunnel's key belongs to its
    // identity: `tunnel::claims`; the same column as PostgreSQL's migration 5).
    "ALTER TABLE tunnels ADD COLUMN pubkey TEXT NOT NULL DEFAULT '';",
];

/// An open SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// The file (None in memory).
    path: Option<std::path::PathBuf>,
}

impl SqliteStore {
    /// Opens (and creates or migrates) the store file.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore {
            conn,
            path: Some(path.to_owned()),
        };
        store.migrate()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Verifiers are not passwords, but they are offline-attackable: owner only.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(store)
    }

    /// How long a statement waits for another connection's write lock before it fails with
    /// "busy" (5 s as opened; the storage worker sets a short one and retries itself).
    pub fn set_busy_timeout(&mut self, t: Duration) -> Result<(), StoreError> {
        self.conn.busy_timeout(t)?;
        Ok(())
    }

    /// An in-memory store (tests, and the embedded demo when no file is configured).
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore { conn, path: None };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tx = self.conn.transaction()?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A named 32-byte key, created at random on first use (dialog MAC key, fake-verifier key).
    pub fn key(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let existing: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM keys WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(v) = existing.filter(|v| v.len() == 32) {
            let mut k = [0u8; 32];
            k.copy_from_slice(&v);
            return Ok(k);
        }
        let k: [u8; 32] = rand::random();
        self.conn.execute(
            "INSERT OR REPLACE INTO keys (name, value) VALUES (?1, ?2)",
            params![name, k.as_slice()],
        )?;
        Ok(k)
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
        validate_user(username, aors)?;
        if iterations < MIN_ITERATIONS {
            return Err(StoreError::Invalid(format!(
                "iterations must be at least {MIN_ITERATIONS}"
            )));
        }
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), iterations);
        let mechs = mechanisms.map(|m| m.iter().map(|m| m.name()).collect::<Vec<_>>().join(" "));
        let tx = self.conn.transaction()?;
        let now = unix_now();
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO users (username, salt, iterations, stored_key, server_key, mechanisms, enabled, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7)",
            params![username, v.salt, v.iterations, v.stored_key.as_slice(), v.server_key.as_slice(), mechs, now],
        )?;
        if inserted == 0 {
            return Err(StoreError::Exists(username.into()));
        }
        for a in aors {
            tx.execute(
                "INSERT OR IGNORE INTO user_aors (username, aor) VALUES (?1, ?2)",
                params![username, a],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a user's verifier.
    pub fn set_password(
        &mut self,
        username: &str,
        password: &[u8],
        iterations: u32,
    ) -> Result<(), StoreError> {
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), iterations.max(MIN_ITERATIONS));
        let n = self.conn.execute(
            "UPDATE users SET salt = ?2, iterations = ?3, stored_key = ?4, server_key = ?5, updated_at = ?6 WHERE username = ?1",
            params![username, v.salt, v.iterations, v.stored_key.as_slice(), v.server_key.as_slice(), unix_now()],
        )?;
        if n == 0 {
            return Err(StoreError::NoUser(username.into()));
        }
        Ok(())
    }

    pub fn set_enabled(&mut self, username: &str, enabled: bool) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE users SET enabled = ?2, updated_at = ?3 WHERE username = ?1",
            params![username, enabled, unix_now()],
        )?;
        if n == 0 {
            return Err(StoreError::NoUser(username.into()));
        }
        Ok(())
    }

    pub fn delete_user(&mut self, username: &str) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM users WHERE username = ?1", [username])?;
        if n == 0 {
            return Err(StoreError::NoUser(username.into()));
        }
        Ok(())
    }

    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT username FROM users ORDER BY username")?;
        let names: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        names
            .iter()
            .map(|n| self.user(n)?.ok_or_else(|| StoreError::NoUser(n.clone())))
            .collect()
    }

    pub fn user(&self, username: &str) -> Result<Option<UserSummary>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT mechanisms, enabled, iterations FROM users WHERE username = ?1",
                [username],
                |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, u32>(2)?,
                    ))
                },
            )
            .optional()?;
        let Some((mechs, enabled, iterations)) = row else {
            return Ok(None);
        };
        Ok(Some(UserSummary {
            username: username.into(),
            aors: self.aors(username)?,
            mechanisms: mechs.map(|m| m.split_whitespace().map(str::to_owned).collect()),
            enabled,
            iterations,
        }))
    }

    fn aors(&self, username: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT aor FROM user_aors WHERE username = ?1 ORDER BY aor")?;
        let aors = stmt
            .query_map([username], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(aors)
    }

    /// The full credential of a user (for the SASL server).
    pub fn credential(&self, username: &str) -> Result<Option<Credential>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT salt, iterations, stored_key, server_key, mechanisms, enabled FROM users WHERE username = ?1",
            )?
            .query_row([username], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            })
            .optional()?;
        let Some((salt, iterations, stored, server, mechs, enabled)) = row else {
            return Ok(None);
        };
        let (Ok(stored_key), Ok(server_key)) =
            (<[u8; 32]>::try_from(stored), <[u8; 32]>::try_from(server))
        else {
            return Ok(None);
        };
        Ok(Some(Credential {
            username: username.into(),
            verifier: Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            aors: self.aors(username)?,
            mechanisms: mechs.map(|m| {
                m.split_whitespace()
                    .filter_map(Mechanism::from_name)
                    .collect()
            }),
            enabled,
        }))
    }

    /// The generation of the users table (moves on every change of a user or its AORs).
    pub fn users_generation(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT value FROM generations WHERE name = 'users'",
            [],
            |r| r.get(0),
        )?)
    }

    /// Every user's credential (the core's in-memory snapshot).
    pub fn credentials(&self) -> Result<Credentials, StoreError> {
        let mut aors: std::collections::HashMap<String, Vec<String>> = Default::default();
        let mut stmt = self
            .conn
            .prepare("SELECT username, aor FROM user_aors ORDER BY username, aor")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (u, a) = row?;
            aors.entry(u).or_default().push(a);
        }
        let mut stmt = self.conn.prepare(
            "SELECT username, salt, iterations, stored_key, server_key, mechanisms, enabled FROM users",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, bool>(6)?,
            ))
        })?;
        let mut out = Credentials::new();
        for row in rows {
            let (username, salt, iterations, stored, server, mechs, enabled) = row?;
            let (Ok(stored_key), Ok(server_key)) =
                (<[u8; 32]>::try_from(stored), <[u8; 32]>::try_from(server))
            else {
                continue; // the schema's CHECKs make this unreachable
            };
            let user_aors = aors.remove(&username).unwrap_or_default();
            out.insert(
                username.clone(),
                Credential {
                    username,
                    verifier: Verifier {
                        salt,
                        iterations,
                        stored_key,
                        server_key,
                    },
                    aors: user_aors,
                    mechanisms: mechs.map(|m| {
                        m.split_whitespace()
                            .filter_map(Mechanism::from_name)
                            .collect()
                    }),
                    enabled,
                },
            );
        }
        Ok(out)
    }

    /// The file of the store (None in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Stops this connection's commits from checkpointing the WAL (SQLite's default runs a
    /// checkpoint inside the commit that passes 1000 pages: 10-500 ms with the file's sync, and
    /// a tunnel's 200 waits for its commit; docs/PERFORMANCE.md). The storage worker's connection
    /// does this and a [`Checkpointer`] keeps the WAL short beside it.
    pub fn leave_checkpoints_to_another_thread(&mut self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// What a starting core needs: credentials, bindings live at `now_unix` (expired ones are
    /// deleted), the tunnel table. Writes a previous run left in the journal (the write lock
    /// was held elsewhere when it stopped) are applied first.
    pub fn snapshot(&mut self, now_unix: u64) -> Result<Snapshot, StoreError> {
        if let Some(path) = self.path.clone() {
            let replayed = journal::replay(self, &journal::path_for(&path))?;
            if replayed > 0 {
                tracing::info!(writes = replayed, "journal of a previous run applied");
            }
        }
        Ok(Snapshot {
            credentials: self.credentials()?,
            bindings: self.live_bindings(now_unix)?,
            tunnels: self.tunnels()?,
        })
    }

    /// Applies a batch of the core's writes in one transaction (all or nothing).
    pub fn apply(&mut self, writes: &[StoreWrite]) -> Result<Applied, StoreError> {
        // BEGIN and COMMIT as cached statements: rusqlite's `transaction()` parses both
        // again for every batch, a tenth of the storage thread's work under call load.
        self.conn.prepare_cached("BEGIN")?.execute([])?;
        let outcome = Self::apply_writes(&self.conn, writes)
            .and_then(|applied| Ok((self.conn.prepare_cached("COMMIT")?.execute([])?, applied)));
        match outcome {
            Ok((_, applied)) => Ok(applied),
            Err(e) => {
                // All or nothing: what the batch did goes (a failed COMMIT leaves it open).
                if !self.conn.is_autocommit() {
                    if let Err(rb) = self.conn.execute_batch("ROLLBACK") {
                        tracing::warn!(error = %rb, "rollback of a failed store batch failed");
                    }
                }
                Err(e)
            }
        }
    }

    fn apply_writes(tx: &Connection, writes: &[StoreWrite]) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        for w in writes {
            match w {
                StoreWrite::SaveBinding(b) => save_binding(tx, b)?,
                StoreWrite::RemoveBinding { aor, contact } => remove_binding(tx, aor, contact)?,
                StoreWrite::SaveTunnel(t) => save_tunnel(tx, t)?,
                StoreWrite::DeleteTunnel {
                    call_id,
                    caller_tag,
                } => delete_tunnel(tx, call_id, caller_tag)?,
                // One gateway per file: nobody to tell.
                StoreWrite::AuthOutcome { .. } => {}
                // One gateway per file: its own table is the count that matters, and the
                // core checked it (a core on a file store asks for no reservation).
                StoreWrite::ReserveTunnel {
                    call_id,
                    caller_tag,
                    ..
                } => applied.reservations.push(Reservation {
                    call_id: call_id.clone(),
                    caller_tag: caller_tag.clone(),
                    refused: None,
                }),
            }
        }
        Ok(applied)
    }

    // ----- bindings -----

    pub fn save_binding(&mut self, b: &BindingRecord) -> Result<(), StoreError> {
        save_binding(&self.conn, b)
    }

    pub fn remove_binding(&mut self, aor: &str, contact: &str) -> Result<(), StoreError> {
        remove_binding(&self.conn, aor, contact)
    }

    /// Bindings not yet expired at `now_unix`; expired ones are deleted.
    pub fn live_bindings(&mut self, now_unix: u64) -> Result<Vec<BindingRecord>, StoreError> {
        self.conn.execute(
            "DELETE FROM bindings WHERE expires_at <= ?1",
            [now_unix as i64],
        )?;
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings ORDER BY aor"
        ))?;
        let rows = stmt.query_map([], binding_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The bindings of one AOR not yet expired at `now_unix`.
    pub fn bindings_of(
        &mut self,
        aor: &str,
        now_unix: u64,
    ) -> Result<Vec<BindingRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE aor = ?1 AND expires_at > ?2"
        ))?;
        let rows = stmt
            .query_map(params![aor, now_unix as i64], binding_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// The columns [`binding_row`] reads, in its order.
const BINDING_COLUMNS: &str =
    "aor, contact, transport, remote, expires_at, instance, identity, reg_id, holder";

fn binding_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BindingRecord> {
    Ok(BindingRecord {
        aor: r.get(0)?,
        contact: r.get(1)?,
        transport: r.get(2)?,
        remote: r.get(3)?,
        expires_at: r.get::<_, i64>(4)? as u64,
        instance: r.get(5)?,
        identity: r.get(6)?,
        reg_id: r.get(7)?,
        holder: r.get(8)?,
    })
}

fn save_binding(conn: &Connection, b: &BindingRecord) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO bindings (aor, contact, transport, remote, expires_at, instance, identity, reg_id, holder)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        b.aor,
        b.contact,
        b.transport,
        b.remote,
        b.expires_at as i64,
        b.instance,
        b.identity,
        b.reg_id,
        b.holder
    ])?;
    Ok(())
}

fn remove_binding(conn: &Connection, aor: &str, contact: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM bindings WHERE aor = ?1 AND contact = ?2")?
        .execute(params![aor, contact])?;
    Ok(())
}

fn save_tunnel(conn: &Connection, t: &crate::tunnel::Tunnel) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO tunnels (call_id, caller_tag, callee_tag, identity, from_aor, to_aor, prefixes, pskmth, created_at, state, caller, callee, pubkey)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        t.call_id,
        t.caller_tag,
        t.callee_tag,
        t.identity,
        t.from,
        t.to,
        t.prefixes,
        t.pskmth,
        t.created_unix as i64,
        t.state.as_str(),
        t.caller.as_ref().map(|p| p.encode()),
        t.callee.as_ref().map(|p| p.encode()),
        t.pubkey
    ])?;
    Ok(())
}

fn delete_tunnel(conn: &Connection, call_id: &str, caller_tag: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM tunnels WHERE call_id = ?1 AND caller_tag = ?2")?
        .execute(params![call_id, caller_tag])?;
    Ok(())
}

impl SqliteStore {
    pub fn tunnels(&self) -> Result<Vec<crate::tunnel::Tunnel>, StoreError> {
        self.tunnel_rows(&TunnelQuery::default())
    }

    /// Every tunnel's (Call-ID, caller tag).
    pub fn tunnel_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT call_id, caller_tag FROM tunnels")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Tunnel rows in Call-ID order, from a cursor or of one Call-ID, at most `limit`.
    pub fn tunnel_rows(
        &self,
        q: &TunnelQuery<'_>,
    ) -> Result<Vec<crate::tunnel::Tunnel>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT call_id, caller_tag, callee_tag, identity, from_aor, to_aor, prefixes, pskmth, created_at, state, caller, callee, pubkey FROM tunnels \
             WHERE (?1 IS NULL OR call_id > ?1) AND (?2 IS NULL OR call_id = ?2) ORDER BY call_id, caller_tag LIMIT ?3",
        )?;
        let limit = q.limit.map_or(-1, |l| l as i64);
        let rows = stmt
            .query_map(rusqlite::params![q.after, q.call_id, limit], |r| {
                Ok(crate::tunnel::Tunnel {
                    call_id: r.get(0)?,
                    caller_tag: r.get(1)?,
                    callee_tag: r.get(2)?,
                    identity: r.get(3)?,
                    from: r.get(4)?,
                    to: r.get(5)?,
                    prefixes: r.get(6)?,
                    pskmth: r.get(7)?,
                    created_unix: r.get::<_, i64>(8)? as u64,
                    state: crate::tunnel::TunnelState::parse(&r.get::<_, String>(9)?),
                    caller: r
                        .get::<_, Option<String>>(10)?
                        .as_deref()
                        .and_then(crate::tunnel::Party::decode),
                    callee: r
                        .get::<_, Option<String>>(11)?
                        .as_deref()
                        .and_then(crate::tunnel::Party::decode),
                    pubkey: r.get(12)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

impl SqliteStore {
    pub fn add_admin(
        &mut self,
        username: &str,
        password: &[u8],
        role: Role,
    ) -> Result<(), StoreError> {
        validate_user(username, &[])?;
        let salt: [u8; 16] = rand::random();
        let v = Verifier::derive(password, salt.to_vec(), MIN_ITERATIONS);
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO admins (username, salt, iterations, stored_key, server_key, role) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![username, v.salt, v.iterations, v.stored_key.as_slice(), v.server_key.as_slice(), role.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(username.into()));
        }
        Ok(())
    }

    pub fn delete_admin(&mut self, username: &str) -> Result<(), StoreError> {
        if self
            .conn
            .execute("DELETE FROM admins WHERE username = ?1", [username])?
            == 0
        {
            return Err(StoreError::NoUser(username.into()));
        }
        Ok(())
    }

    pub fn admins(&self) -> Result<Vec<(String, Role, bool)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT username, role, enabled FROM admins ORDER BY username")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })?
            .filter_map(|r| r.ok())
            .filter_map(|(u, role, e)| Role::parse(&role).map(|r| (u, r, e)))
            .collect();
        Ok(rows)
    }

    /// An admin's credential and role.
    pub fn admin_credential(
        &self,
        username: &str,
    ) -> Result<Option<(Credential, Role)>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT salt, iterations, stored_key, server_key, role, enabled FROM admins WHERE username = ?1",
                [username],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, bool>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((salt, iterations, stored, server, role, enabled)) = row else {
            return Ok(None);
        };
        let (Ok(stored_key), Ok(server_key), Some(role)) = (
            <[u8; 32]>::try_from(stored),
            <[u8; 32]>::try_from(server),
            Role::parse(&role),
        ) else {
            return Ok(None);
        };
        Ok(Some((
            Credential {
                username: username.into(),
                verifier: Verifier {
                    salt,
                    iterations,
                    stored_key,
                    server_key,
                },
                aors: vec![],
                mechanisms: None,
                enabled,
            },
            role,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The storage worker's commits never checkpoint: the WAL grows past SQLite's 1000-page
    /// automatic checkpoint untouched until the checkpointer's connection copies it, and the
    /// next commit then starts it over.
    #[test]
    fn commits_leave_the_wal_to_the_checkpointer() {
        let dir = std::env::temp_dir().join(format!("gh-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.sqlite");
        let wal = dir.join("store.sqlite-wal");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&wal);
        let mut s = SqliteStore::open(&path).unwrap();
        s.leave_checkpoints_to_another_thread().unwrap();
        s.conn.execute_batch("CREATE TABLE bulk (b BLOB)").unwrap();
        let frame = 4096 + 24;
        let commit = |s: &SqliteStore| {
            s.conn
                .execute("INSERT INTO bulk VALUES (zeroblob(4000))", [])
                .unwrap()
        };
        for _ in 0..1500 {
            commit(&s);
        }
        let frames = std::fs::metadata(&wal).unwrap().len() / frame;
        assert!(
            frames > 1500,
            "no commit checkpointed: {frames} frames in the WAL"
        );
        let other = Connection::open(&path).unwrap();
        let (log, done) = checkpoint(&other).unwrap();
        assert!(
            log > 1500 && done == log,
            "the checkpointer copied {done} of {log}"
        );
        let size = std::fs::metadata(&wal).unwrap().len();
        for _ in 0..100 {
            commit(&s);
        }
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            size,
            "after a complete checkpoint the WAL is written from its start again"
        );
        drop((s, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn users_round_trip_without_plaintext() {
        let dir = std::env::temp_dir().join(format!("gh-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.sqlite");
        let _ = std::fs::remove_file(&path);
        {
            let mut s = SqliteStore::open(&path).unwrap();
            s.add_user(
                "alice",
                b"Pa55-unique-marker",
                &["sip:alice@partner.example".into()],
                None,
                4096,
            )
            .unwrap();
            assert!(matches!(
                s.add_user("alice", b"x", &[], None, 4096),
                Err(StoreError::Exists(_))
            ));
            assert!(matches!(
                s.add_user("bob", b"x", &["not-a-uri".into()], None, 4096),
                Err(StoreError::Invalid(_))
            ));
        }
        // Another connection (as the CLI next to a running gateway) sees the user.
        let s = SqliteStore::open(&path).unwrap();
        let c = s.credential("alice").unwrap().unwrap();
        assert!(c.verifier.check_password(b"Pa55-unique-marker"));
        assert_eq!(c.aors, vec!["sip:alice@partner.example".to_owned()]);
        let k1 = s.key("dialog").unwrap();
        assert_eq!(s.key("dialog").unwrap(), k1, "keys persist");
        drop(s);
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(dir.join("store.sqlite-wal")).unwrap_or_default();
        for b in [&bytes, &wal] {
            assert!(
                !b.windows(18).any(|w| w == b"Pa55-unique-marker"),
                "plaintext password in the store"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bindings_expire() {
        let mut s = SqliteStore::in_memory().unwrap();
        let b = BindingRecord {
            aor: "sip:vpn@org.example".into(),
            contact: "sip:vpn@192.0.2.5:5060".into(),
            transport: "udp".into(),
            remote: "192.0.2.5:5060".into(),
            expires_at: 1000,
            instance: None,
            identity: "vpn".into(),
            holder: Some("sip:192.0.2.11:5060".into()),
            reg_id: None,
        };
        s.save_binding(&b).unwrap();
        assert_eq!(s.live_bindings(999).unwrap(), vec![b]);
        assert!(s.live_bindings(1000).unwrap().is_empty());
    }

    /// A batch is one transaction: a write that fails takes the batch's earlier writes with
    /// it, and the connection is ready for the next batch.
    #[test]
    fn a_failed_batch_leaves_nothing_and_the_next_one_commits() {
        let mut s = SqliteStore::in_memory().unwrap();
        s.conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON tunnels WHEN NEW.call_id = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        let tunnel = |call_id: &str| {
            StoreWrite::SaveTunnel(Box::new(crate::tunnel::Tunnel {
                call_id: call_id.into(),
                caller_tag: "a".into(),
                callee_tag: Some("b".into()),
                identity: "alice".into(),
                from: "sip:alice@partner.example".into(),
                to: "sip:vpn@org.example".into(),
                prefixes: "2001:db8:1::/64".into(),
                pubkey: String::new(),
                pskmth: "scram".into(),
                created_unix: 1,
                state: crate::tunnel::TunnelState::Established,
                caller: None,
                callee: None,
            }))
        };
        assert!(s.apply(&[tunnel("good"), tunnel("bad")]).is_err());
        assert!(
            s.conn.is_autocommit(),
            "the failed batch's transaction is gone"
        );
        assert!(s.tunnels().unwrap().is_empty());
        s.apply(&[tunnel("good")]).unwrap();
        let ids: Vec<String> = s
            .tunnels()
            .unwrap()
            .into_iter()
            .map(|t| t.call_id)
            .collect();
        assert_eq!(ids, ["good"]);
    }
}

/// Checkpoints a store file's WAL on its own thread and connection, so that no commit of the
/// storage worker waits for one. A passive checkpoint copies what no reader still needs into
/// the database file and never blocks a writer; once everything is copied, the next write
/// transaction starts the WAL over, so it stays short under a steady load.
#[derive(Debug)]
pub struct Checkpointer {
    /// Dropped to stop the thread (it ends at its next wake-up, at most [`CHECKPOINT_EVERY`]).
    _stop: std::sync::mpsc::Sender<()>,
}

/// How often the checkpointer runs.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

impl Checkpointer {
    /// Starts checkpointing `path` every [`CHECKPOINT_EVERY`] until dropped.
    pub fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_millis(100))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("gatehouse-ckpt".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = checkpoint(&conn) {
                        tracing::debug!(error = %e, "WAL checkpoint failed; retried in a second");
                    }
                }
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start the checkpointer: {e}")))?;
        Ok(Checkpointer { _stop: stop })
    }
}

/// One passive checkpoint: (frames in the WAL, frames now in the database file).
pub fn checkpoint(conn: &Connection) -> Result<(i64, i64), StoreError> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })?)
}
