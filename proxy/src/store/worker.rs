//! The storage worker: the only code that touches the store while the gateway runs, on its own
//! thread, so a slow disk or another process holding SQLite's write lock never stops the SIP
//! loop.
//!
//! The loop hands it numbered batches of the core's [`StoreWrite`]s (`submit`); it commits
//! whatever has arrived in one transaction and acknowledges the highest number committed
//! ([`StoreEvent::Committed`]). When another connection holds the write lock, the commit is
//! retried (`gatehouse_store_busy_retries_total`) while new batches join it; nothing is dropped.
//! Meanwhile the writes go to the [`journal`](super::journal) and are acknowledged from there,
//! so a held lock delays no SIP message, not even a tunnel's 200.
//! A batch that fails for another reason is replayed write by write so one bad row costs only
//! itself; each write that still fails is counted (`gatehouse_store_errors_total`) and logged.
//!
//! It also keeps the core's credential snapshot fresh: on PostgreSQL a listener thread
//! (`PgStore::follow_changes`) turns each `NOTIFY gatehouse_users` into an immediate
//! refresh and the poll below runs every [`POLL_NOTIFIED`] as a safety net; on SQLite, which
//! has no notifications, every [`POLL`] it reads the users
//! generation (moved by triggers whenever the CLI, the admin API or anyone else changes a
//! user) and, when it moved or a refresh was asked for, sends the new snapshot
//! ([`StoreEvent::Credentials`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::journal::{self, Journal};
use super::{BindingRecord, Credentials, Store, StoreWrite};
use crate::metrics::Metrics;

/// How often the worker looks for credential changes made elsewhere.
pub const POLL: Duration = Duration::from_millis(250);
/// The same where changes are notified (PostgreSQL): only what a lost notification missed.
pub const POLL_NOTIFIED: Duration = Duration::from_secs(5);
/// Pause between commit attempts while another connection holds the write lock.
const BUSY_RETRY: Duration = Duration::from_millis(50);
/// Writes kept in memory while a store without a journal (PostgreSQL) is unreachable.
pub const QUEUE_MAX: usize = 100_000;
/// How long the worker keeps trying at shutdown before it gives the remaining writes up
/// (logged and counted).
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(10);
/// The worker connection's own busy timeout: short, so retries interleave with the
/// credential polls.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// What the worker tells the loop.
#[derive(Debug)]
pub enum StoreEvent {
    /// Every batch up to this number is committed (or, after an error, given up and counted).
    Committed(u64),
    /// The users changed: the core's new credential snapshot.
    Credentials(Credentials),
    /// A tunnel's row left the shared database (another gateway ended it).
    TunnelGone { call_id: String, caller_tag: String },
    /// Every stored tunnel's key, read at Unix second `read_unix` after this gateway's own
    /// writes had landed: the loop forgets established tunnels older than that which are not
    /// among them (ended elsewhere while notifications could not arrive).
    TunnelKeys {
        keys: std::collections::HashSet<(String, String)>,
        read_unix: u64,
    },
    /// The bindings of an AOR as the shared database holds them now (another gateway or a
    /// CLI changed them).
    Bindings {
        aor: String,
        records: Vec<BindingRecord>,
    },
    /// Every live binding, by AOR, after the listener reconnected (changes may have been
    /// missed).
    AllBindings(std::collections::BTreeMap<String, Vec<BindingRecord>>),
    /// The `[cluster] peer_uri` of every gateway connected to the shared database (sent when
    /// the set changes).
    Peers(std::collections::HashSet<String>),
    /// Tunnels counted against the cluster's limits in a committed batch.
    Reservations(Vec<super::Reservation>),
    /// Another gateway of the cluster authenticated `user` from `source`, or failed to.
    AuthOutcome {
        user: Option<String>,
        source: std::net::IpAddr,
        success: bool,
    },
}

enum Job {
    Write {
        seq: u64,
        writes: Vec<StoreWrite>,
    },
    Refresh,
    /// Another gateway changed this AOR's bindings: read them for the loop.
    Bindings(String),
    /// Tunnel rows may have left unannounced (the listener was disconnected): send the loop
    /// the stored tunnels' keys once every queued write has landed.
    Resync,
    /// No more writes: commit what is queued and end (sent by `close` and at drop; the
    /// channel may not disconnect, the PostgreSQL listener holds a sender too).
    Close,
}

/// The loop's handle on the worker thread.
#[derive(Debug)]
pub struct StorageWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    metrics: Arc<Metrics>,
    /// Ends the PostgreSQL listener thread (if any).
    stop_listener: Arc<AtomicBool>,
}

impl Drop for StorageWorker {
    /// A worker dropped without `close` still commits what it has and ends.
    fn drop(&mut self) {
        self.hang_up();
    }
}

impl StorageWorker {
    /// Tells the worker (and the listener) to end; idempotent.
    fn hang_up(&mut self) {
        self.stop_listener.store(true, Ordering::Relaxed);
        if let Some(j) = self.jobs.take() {
            let _ = j.send(Job::Close);
        }
    }

    /// Starts the worker on `store` (the store moves to the worker's thread).
    /// `peer` is this gateway's `[cluster] peer_uri`, announced to the others on a shared store.
    pub fn start(
        mut store: Store,
        metrics: Arc<Metrics>,
        events: UnboundedSender<StoreEvent>,
        peer: Option<&str>,
    ) -> std::io::Result<StorageWorker> {
        if let Err(e) = store.set_busy_timeout(BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "cannot set the storage worker's busy timeout");
        }
        let (tx, rx) = mpsc::channel();
        let stop_listener = Arc::new(AtomicBool::new(false));
        // On PostgreSQL a change of the users anywhere in the cluster arrives as a
        // notification: the snapshot is refreshed at once, the generation poll stays the
        // safety net (a notification lost during a reconnect).
        // A tunnel row deleted by another gateway (its BYE, a teardown through its admin API)
        // goes straight to the loop, which forgets the tunnel if it holds it.
        if let Store::Postgres(pg) = &store {
            let jobs = tx.clone();
            let loop_events = events.clone();
            pg.follow_changes(
                peer,
                Arc::clone(&stop_listener),
                move |change| match change {
                    super::pg::Change::Users => jobs.send(Job::Refresh).is_ok(),
                    super::pg::Change::Bindings(aor) => jobs.send(Job::Bindings(aor)).is_ok(),
                    super::pg::Change::Connected => {
                        jobs.send(Job::Refresh).is_ok() && jobs.send(Job::Resync).is_ok()
                    }
                    super::pg::Change::TunnelGone(call_id, caller_tag) => loop_events
                        .send(StoreEvent::TunnelGone {
                            call_id,
                            caller_tag,
                        })
                        .is_ok(),
                    super::pg::Change::AuthOutcome {
                        user,
                        source,
                        success,
                    } => loop_events
                        .send(StoreEvent::AuthOutcome {
                            user,
                            source,
                            success,
                        })
                        .is_ok(),
                },
            )?;
        }
        // A file store's WAL is checkpointed beside the worker, never inside one of its
        // commits (a checkpoint in the commit path held tunnels' 200s for up to half a second).
        let checkpointer = match &mut store {
            Store::Sqlite(sq) => match sq.path().map(std::path::Path::to_owned) {
                // Started first: commits stop checkpointing only once something else does.
                Some(path) => match super::sqlite::Checkpointer::start(&path)
                    .and_then(|c| sq.leave_checkpoints_to_another_thread().map(|()| c))
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "no separate WAL checkpointer; commits checkpoint");
                        None
                    }
                },
                None => None,
            },
            Store::Postgres(_) => None,
        };
        let m = Arc::clone(&metrics);
        let thread = std::thread::Builder::new()
            .name("gatehouse-store".into())
            .spawn(move || {
                // Ends with the worker.
                let _checkpointer = checkpointer;
                Worker::new(store, m, events).run(rx)
            })?;
        Ok(StorageWorker {
            jobs: Some(tx),
            thread: Some(thread),
            next_seq: 0,
            metrics,
            stop_listener,
        })
    }

    /// Queues a batch; returns its number (acknowledged by [`StoreEvent::Committed`]).
    /// Returns `None` when the worker is gone (its thread ended): the writes are counted as
    /// failed and the caller must not wait for an acknowledgement.
    pub fn submit(&mut self, writes: Vec<StoreWrite>) -> Option<u64> {
        self.next_seq += 1;
        let seq = self.next_seq;
        let n = writes.len();
        self.metrics.store_queued.add(n as i64);
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Job::Write { seq, writes }).is_ok());
        if !sent {
            self.metrics.store_queued.sub(n as i64);
            self.metrics.store_errors.inc_by(n as u64);
            tracing::error!(writes = n, "the storage worker is gone; writes lost");
            return None;
        }
        Some(seq)
    }

    /// Asks for a fresh credential snapshot now (after a change through the admin API).
    pub fn refresh_credentials(&self) {
        if let Some(j) = &self.jobs {
            let _ = j.send(Job::Refresh);
        }
    }

    /// Stops taking writes and waits (off the async runtime's workers) until everything
    /// queued is committed or given up.
    pub async fn close(mut self) {
        self.hang_up();
        if let Some(t) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the storage worker ended abnormally");
            }
        }
    }
}

struct Worker {
    store: Store,
    metrics: Arc<Metrics>,
    events: UnboundedSender<StoreEvent>,
    /// Writes received and not yet committed, in order, and the highest batch number among them.
    pending: Vec<StoreWrite>,
    pending_seq: u64,
    busy_since: Option<Instant>,
    retry_at: Option<Instant>,
    /// Where writes go while the store is locked (file stores only), and how many of the
    /// pending writes are in it.
    journal: Option<Journal>,
    journaled: usize,
    generation: Option<i64>,
    next_poll: Instant,
    refresh: bool,
    /// The highest batch acknowledged from the in-memory queue (no journal).
    acked: u64,
    /// The last credential poll failed (logged once per outage).
    poll_failing: bool,
    /// `Job::Close` arrived.
    closing: bool,
    /// A tunnel resynchronisation is due (`Job::Resync`).
    resync: bool,
    /// How often the users generation is read.
    poll: Duration,
    /// AORs whose bindings changed elsewhere, to read for the loop (at most
    /// [`RELOAD_MAX`]; beyond, every binding is read instead).
    reload: std::collections::BTreeSet<String>,
    reload_all: bool,
    /// Not before then (the store did not answer the last read).
    reload_at: Instant,
    /// The live peers last sent to the loop, and when to read them next (shared store only).
    peers: Option<std::collections::HashSet<String>>,
    next_peers: Instant,
}

/// AORs waiting to be read before the worker reads every binding instead.
const RELOAD_MAX: usize = 4096;
/// How often the live peers are read from a shared store: a dead gateway's bindings are
/// passed over within this time (plus the database noticing the lost connection).
const PEERS_POLL: Duration = Duration::from_secs(1);

impl Worker {
    fn new(store: Store, metrics: Arc<Metrics>, events: UnboundedSender<StoreEvent>) -> Worker {
        let poll = match store {
            Store::Postgres(_) => POLL_NOTIFIED,
            Store::Sqlite(_) => POLL,
        };
        let generation = store.users_generation().ok();
        let journal = store.path().map(|p| Journal::new(journal::path_for(p)));
        Worker {
            journal,
            journaled: 0,
            store,
            metrics,
            events,
            pending: Vec::new(),
            pending_seq: 0,
            busy_since: None,
            retry_at: None,
            generation,
            next_poll: Instant::now() + poll,
            poll,
            refresh: false,
            acked: 0,
            poll_failing: false,
            closing: false,
            resync: false,
            reload: Default::default(),
            reload_all: false,
            reload_at: Instant::now(),
            peers: None,
            next_peers: Instant::now(),
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Write { seq, writes } => {
                self.pending.extend(writes);
                self.pending_seq = seq;
            }
            Job::Refresh => self.refresh = true,
            Job::Bindings(aor) => {
                if self.reload.len() < RELOAD_MAX {
                    self.reload.insert(aor);
                } else {
                    self.reload_all = true;
                }
            }
            Job::Resync => {
                self.resync = true;
                self.reload_all = true;
            }
            Job::Close => self.closing = true,
        }
    }

    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            let now = Instant::now();
            if open {
                let next_poll = if self.store.is_shared() {
                    self.next_poll.min(self.next_peers)
                } else {
                    self.next_poll
                };
                let until = match self.retry_at {
                    Some(at) if !self.pending.is_empty() => at.min(next_poll),
                    _ if !self.pending.is_empty() => now,
                    _ if !self.reload.is_empty() || self.reload_all => {
                        self.reload_at.min(next_poll)
                    }
                    _ => next_poll,
                };
                match jobs.recv_timeout(until.saturating_duration_since(now)) {
                    Ok(job) => self.take(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                }
                // Group everything already waiting into the same commit.
                while let Ok(job) = jobs.try_recv() {
                    self.take(job);
                }
                if self.closing {
                    open = false;
                }
            } else if let Some(at) = self.retry_at {
                std::thread::sleep(at.saturating_duration_since(now));
            }
            let now = Instant::now();
            if !self.pending.is_empty() && self.retry_at.is_none_or(|at| now >= at) {
                self.commit(open);
            }
            if !open && self.pending.is_empty() {
                return;
            }
            if self.refresh || now >= self.next_poll {
                self.next_poll = now + self.poll;
                self.poll_credentials();
            }
            if self.resync && self.pending.is_empty() {
                self.resync_tunnels();
            }
            if self.pending.is_empty() && now >= self.reload_at {
                self.reload_bindings();
            }
            if self.store.is_shared() && now >= self.next_peers {
                self.next_peers = now + PEERS_POLL;
                self.poll_peers();
            }
        }
    }

    /// Reads the bindings of the AORs changed elsewhere (or all of them after a reconnect)
    /// for the loop; what the store cannot answer now is read at the next turn.
    fn reload_bindings(&mut self) {
        let now_unix = super::unix_now().max(0) as u64;
        if self.reload_all {
            match self.store.live_bindings(now_unix) {
                Ok(records) => {
                    let mut by_aor: std::collections::BTreeMap<String, Vec<BindingRecord>> =
                        Default::default();
                    for r in records {
                        by_aor.entry(r.aor.clone()).or_default().push(r);
                    }
                    self.reload_all = false;
                    self.reload.clear();
                    let _ = self.events.send(StoreEvent::AllBindings(by_aor));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "binding resynchronisation waits for the store");
                    self.reload_at = Instant::now() + Duration::from_secs(1);
                }
            }
            return;
        }
        while let Some(aor) = self.reload.first().cloned() {
            match self.store.bindings_of(&aor, now_unix) {
                Ok(records) => {
                    self.reload.remove(&aor);
                    let _ = self.events.send(StoreEvent::Bindings { aor, records });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "binding reload waits for the store");
                    self.reload_at = Instant::now() + Duration::from_secs(1);
                    return;
                }
            }
        }
    }

    /// Tells the loop what a committed batch decided.
    fn report(&self, applied: super::Applied) {
        if !applied.reservations.is_empty() {
            let _ = self
                .events
                .send(StoreEvent::Reservations(applied.reservations));
        }
    }

    /// Reads which gateways are connected; the loop hears of a change.
    fn poll_peers(&mut self) {
        match self.store.live_peers() {
            Ok(Some(peers)) => {
                let peers: std::collections::HashSet<String> = peers.into_iter().collect();
                if self.peers.as_ref() != Some(&peers) {
                    self.peers = Some(peers.clone());
                    let _ = self.events.send(StoreEvent::Peers(peers));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "live peers wait for the store"),
        }
    }

    /// Reads every stored tunnel's key for the loop (off it: the table may be large); retried
    /// at the next turn while the store does not answer.
    fn resync_tunnels(&mut self) {
        let read_unix = super::unix_now().max(0) as u64;
        match self.store.tunnel_keys() {
            Ok(keys) => {
                self.resync = false;
                let _ = self.events.send(StoreEvent::TunnelKeys {
                    keys: keys.into_iter().collect(),
                    read_unix,
                });
            }
            Err(e) => tracing::debug!(error = %e, "tunnel resynchronisation waits for the store"),
        }
    }

    fn commit(&mut self, open: bool) {
        // While the journal holds writes, every write goes there before its commit is tried:
        // the journal stays a complete log since it began (see `journal`).
        if self.journal.as_ref().is_some_and(|j| j.entries() > 0) {
            self.journal_pending();
        }
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.store.apply(&self.pending)
        }));
        match result {
            Ok(Ok(applied)) => {
                self.report(applied);
                self.metrics.store_available.set(1);
                self.metrics
                    .store_commit
                    .observe(t0.elapsed().as_secs_f64());
                if let Some(since) = self.busy_since.take() {
                    tracing::info!(
                        waited_ms = since.elapsed().as_millis() as u64,
                        writes = self.pending.len(),
                        "store write lock released; queued writes committed"
                    );
                }
            }
            Ok(Err(e)) if e.is_busy() => {
                self.metrics.store_available.set(0);
                let since = *self.busy_since.get_or_insert_with(|| {
                    tracing::warn!(
                        writes = self.pending.len(),
                        error = %e,
                        "store locked by another connection or unreachable; writes queued, retrying"
                    );
                    t0
                });
                // Journaled (or, without a journal, queued) writes are acknowledged: what
                // waited for them may leave.
                self.journal_pending();
                self.queue_in_memory();
                if open || since.elapsed() < SHUTDOWN_PATIENCE {
                    self.metrics.store_busy_retries.inc();
                    self.retry_at = Some(Instant::now() + BUSY_RETRY);
                    return;
                }
                if self.journal.is_some() && self.journaled == self.pending.len() {
                    tracing::warn!(
                        writes = self.pending.len(),
                        "store still locked at shutdown; the writes stay in the journal and are applied at the next start"
                    );
                    self.finish(false);
                    return;
                }
                self.one_by_one();
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, writes = self.pending.len(), "store batch failed; retrying write by write");
                self.one_by_one();
            }
            Err(_) => {
                tracing::error!(
                    writes = self.pending.len(),
                    "panic in the store while committing; retrying write by write"
                );
                self.one_by_one();
            }
        }
        self.finish(true);
    }

    /// The pending writes are dealt with: committed (or given up, counted), or left in the
    /// journal at shutdown (`clear_journal` false).
    fn finish(&mut self, clear_journal: bool) {
        if clear_journal {
            if let Some(j) = self.journal.as_mut().filter(|j| j.entries() > 0) {
                if let Err(e) = j.clear() {
                    tracing::error!(error = %e, "cannot empty the store journal");
                }
            }
        }
        self.busy_since = None;
        self.retry_at = None;
        self.journaled = 0;
        self.metrics.store_queued.sub(self.pending.len() as i64);
        self.pending.clear();
        let _ = self.events.send(StoreEvent::Committed(self.pending_seq));
    }

    /// Appends the pending writes not yet journaled and acknowledges them (they survive a
    /// crash from here on). Without a journal (in-memory store) or when the append fails, the
    /// batch waits for the store.
    fn journal_pending(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if self.journaled == self.pending.len() {
            return;
        }
        match j.append(&self.pending[self.journaled..]) {
            Ok(()) => {
                self.journaled = self.pending.len();
                let _ = self.events.send(StoreEvent::Committed(self.pending_seq));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot append to the store journal; writes wait for the store")
            }
        }
    }

    /// Without a journal (PostgreSQL; SQLite in memory cannot be busy) the writes wait in
    /// memory while the store is unreachable: acknowledged, so calls go on, and retried until
    /// they land. A crash in that window loses them (the journal is what prevents it for a
    /// file store). At most [`QUEUE_MAX`] wait; older ones beyond it are given up, counted
    /// and logged.
    fn queue_in_memory(&mut self) {
        if self.journal.is_some() {
            return;
        }
        if self.pending.len() > QUEUE_MAX {
            let excess = self.pending.len() - QUEUE_MAX;
            self.pending.drain(..excess);
            self.metrics.store_errors.inc_by(excess as u64);
            self.metrics.store_queued.sub(excess as i64);
            tracing::error!(
                writes = excess,
                "store unreachable and its queue full; the oldest writes are given up"
            );
        }
        if self.acked < self.pending_seq {
            self.acked = self.pending_seq;
            let _ = self.events.send(StoreEvent::Committed(self.pending_seq));
        }
    }

    /// After a failed batch: each write on its own; failures counted and logged.
    fn one_by_one(&mut self) {
        for w in &self.pending {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.store.apply(std::slice::from_ref(w))
            }));
            let error = match r {
                Ok(Ok(applied)) => {
                    self.report(applied);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "panic".to_owned(),
            };
            self.metrics.store_errors.inc();
            tracing::error!(write = w.label(), %error, "store write failed; not persisted");
        }
    }

    fn poll_credentials(&mut self) {
        let generation = match self.store.users_generation() {
            Ok(g) => {
                if self.pending.is_empty() {
                    self.metrics.store_available.set(1);
                }
                if std::mem::take(&mut self.poll_failing) {
                    tracing::info!("the store answers again; credential changes are followed");
                }
                Some(g)
            }
            Err(e) => {
                self.metrics.store_available.set(0);
                // Once per outage: the poll runs four times a second.
                if !std::mem::replace(&mut self.poll_failing, true) {
                    tracing::warn!(error = %e, "cannot read the users generation; authentication goes on from the snapshot");
                }
                return;
            }
        };
        if generation == self.generation && !self.refresh {
            return;
        }
        match self.store.credentials() {
            Ok(c) => {
                self.generation = generation;
                self.refresh = false;
                tracing::debug!(users = c.len(), "credential snapshot refreshed");
                let _ = self.events.send(StoreEvent::Credentials(c));
            }
            Err(e) => tracing::warn!(error = %e, "cannot load the credential snapshot"),
        }
    }
}
