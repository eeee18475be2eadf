//! The transaction layer of RFC 3261 section 17 (with the RFC 6026 `Accepted` states),
//! sans-IO: every entry point takes `now`, transmissions are queued for the driver
//! ([`TransactionLayer::poll_transmit`]), and timers are reported by
//! [`TransactionLayer::poll_timeout`] and run by [`TransactionLayer::handle_timeout`].
//!
//! ```text
//! Client INVITE (17.1.1, RFC 6026)            Server INVITE (17.2.1, RFC 6026)
//!   Calling --1xx--> Proceeding                 Proceeding --2xx--> Accepted --L--> gone
//!   Calling/Proceeding --2xx--> Accepted        Proceeding --300-699--> Completed
//!   Calling/Proceeding --300-699--> Completed   Completed --ACK--> Confirmed --I--> gone
//!   (ACK sent) --D--> gone; Accepted --M--> gone   Completed --H--> gone (no ACK)
//!   Calling --B--> gone (timeout); A retransmits   G retransmits the final (unreliable)
//!   Proxy Timer C (16.6 item 11) while no final
//!
//! Client non-INVITE (17.1.2)                  Server non-INVITE (17.2.2)
//!   Trying --1xx--> Proceeding                  Trying --1xx--> Proceeding
//!   Trying/Proceeding --final--> Completed      Trying/Proceeding --final--> Completed
//!   Completed --K--> gone; --F--> timeout       Completed --J--> gone
//!   E retransmits (unreliable)
//! ```

pub mod keys;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::flow::{Destination, Flow};
use crate::{HeaderName, Message, Method};
pub use keys::{ClientKey, KeyMethod, ServerKey};

/// Identifier of a transaction, unique for the life of the layer.
pub type TxId = u64;

/// RFC 3261 timer values (Table 4) and the proxy's Timer C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
    pub timer_c: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            timer_c: Duration::from_secs(180),
        }
    }
}

/// A message for the driver to send.
#[derive(Clone, Debug)]
pub struct Transmit {
    pub dest: Destination,
    pub bytes: Bytes,
    /// The client transaction to notify when the message cannot be sent.
    pub tx: Option<TxId>,
}

/// What happened to a request offered to [`TransactionLayer::on_request`].
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOutcome {
    /// A new server transaction; the core must process the request.
    New(TxId),
    /// A retransmission, handled here (the last response was resent if there was one).
    Absorbed,
    /// An ACK for a 2xx, or an ACK matching no transaction: the core handles it.
    AckToCore,
}

/// Events the core must act on.
#[derive(Debug)]
pub enum TxEvent {
    /// Timer B or F: the client transaction got no final response.
    Timeout(TxId),
    /// Proxy Timer C fired on a client INVITE transaction.
    TimerC { tx: TxId, provisional: bool },
    /// A server transaction ended; its response context can go.
    ServerGone(TxId),
    /// A client transaction ended.
    ClientGone(TxId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    A,
    B,
    C,
    D,
    E,
    F,
    G,
    H,
    I,
    J,
    K,
    L,
    M,
}

/// Server transaction states; the data each state needs lives in it.
#[derive(Debug)]
enum ServerState {
    /// Non-INVITE before any response.
    Trying,
    /// Provisional sent (or INVITE awaiting its final), last provisional kept for retransmission.
    Proceeding { last: Option<Bytes> },
    /// Final non-2xx sent: retransmitted on request retransmissions (and Timer G for INVITE/UDP).
    Completed { response: Bytes, g: Duration },
    /// INVITE answered 2xx (RFC 6026): absorb INVITE retransmissions, pass further 2xx.
    Accepted,
    /// ACK received for a non-2xx final.
    Confirmed,
}

#[derive(Debug)]
struct ServerTx {
    key: ServerKey,
    invite: bool,
    flow: Flow,
    state: ServerState,
}

/// Client transaction states.
#[derive(Debug)]
enum ClientState {
    /// INVITE `Calling` / non-INVITE `Trying`, with the current retransmission interval.
    Calling {
        interval: Duration,
    },
    Proceeding,
    Completed {
        ack: Option<Bytes>,
    },
    Accepted,
}

#[derive(Debug)]
struct ClientTx {
    key: ClientKey,
    invite: bool,
    dest: Destination,
    reliable: bool,
    request: Bytes,
    state: ClientState,
    provisional: bool,
    timer_c_deadline: Option<Instant>,
}

#[derive(Debug)]
enum Tx {
    Server(ServerTx),
    Client(ClientTx),
}

/// Counters the metrics layer reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct TxStats {
    pub retransmissions_sent: u64,
    pub retransmissions_absorbed: u64,
    pub unexpected_events: u64,
}

/// All transactions of the proxy, their timers and their outgoing messages.
#[derive(Debug)]
pub struct TransactionLayer {
    timers: TimerConfig,
    /// Boxed: growing the map moves 16-byte slots, not whole transactions (a rehash of
    /// 200 000 transactions stalled the loop for tens of milliseconds).
    txs: HashMap<TxId, Box<Tx>>,
    server_index: HashMap<ServerKey, TxId>,
    client_index: HashMap<ClientKey, TxId>,
    heap: BinaryHeap<Reverse<(Instant, u64, TxId, TimerSlot)>>,
    seq: u64,
    next_id: TxId,
    out: VecDeque<Transmit>,
    pub stats: TxStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TimerSlot(u8);

impl TimerSlot {
    fn of(t: Timer) -> Self {
        TimerSlot(t as u8)
    }
    fn timer(self) -> Timer {
        use Timer::*;
        [A, B, C, D, E, F, G, H, I, J, K, L, M][self.0 as usize]
    }
}

impl TransactionLayer {
    pub fn new(timers: TimerConfig) -> Self {
        TransactionLayer {
            timers,
            txs: HashMap::new(),
            server_index: HashMap::new(),
            client_index: HashMap::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            next_id: 1,
            out: VecDeque::new(),
            stats: TxStats::default(),
        }
    }

    pub fn timers(&self) -> TimerConfig {
        self.timers
    }

    /// New timer values (a reload): transactions started from now on run with them.
    pub fn set_timers(&mut self, timers: TimerConfig) {
        self.timers = timers;
    }
    /// Gives memory back once a flood has drained (tables a quarter full or less).
    pub fn shrink(&mut self) {
        if self.txs.capacity() > 4096 && self.txs.len() * 4 < self.txs.capacity() {
            self.txs.shrink_to_fit();
            self.server_index.shrink_to_fit();
            self.client_index.shrink_to_fit();
        }
        if self.heap.capacity() > 4096 && self.heap.len() * 4 < self.heap.capacity() {
            self.heap.shrink_to_fit();
        }
        if self.out.capacity() > 4096 && self.out.is_empty() {
            self.out.shrink_to_fit();
        }
    }

    /// Number of live transactions.
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Transactions still waiting for a final response (server) or sending one (client);
    /// the others only absorb retransmissions until their timers end them.
    pub fn unfinished(&self) -> usize {
        self.txs
            .values()
            .filter(|t| match &***t {
                Tx::Server(s) => matches!(
                    s.state,
                    ServerState::Trying | ServerState::Proceeding { .. }
                ),
                Tx::Client(c) => matches!(
                    c.state,
                    ClientState::Calling { .. } | ClientState::Proceeding
                ),
            })
            .count()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Queues a message sent outside any transaction (stateless forwarding of ACK for 2xx).
    pub fn send_stateless(&mut self, dest: Destination, bytes: Bytes) {
        self.out.push_back(Transmit {
            dest,
            bytes,
            tx: None,
        });
    }

    /// The earliest instant at which [`Self::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    fn arm(&mut self, id: TxId, timer: Timer, after: Duration, now: Instant) {
        self.seq += 1;
        self.heap
            .push(Reverse((now + after, self.seq, id, TimerSlot::of(timer))));
    }

    fn alloc_id(&mut self) -> TxId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ----- server side -----

    /// Matches a request to a server transaction (17.2.3) or creates one.
    pub fn on_request(&mut self, msg: &Message, flow: Flow, now: Instant) -> ServerOutcome {
        let key = ServerKey::of_request(msg);
        if let Some(outcome) = self.absorb(key.as_ref(), msg, now) {
            return outcome;
        }
        match key.and_then(|k| self.create_server(k, msg, flow)) {
            Some(id) => ServerOutcome::New(id),
            None => ServerOutcome::AckToCore,
        }
    }

    /// Matches a request to an existing server transaction (17.2.3): a retransmission is
    /// absorbed (the last response resent), an ACK goes to its transaction or, unmatched, to
    /// the core. `None`: the request starts a new transaction (see [`Self::create_server`]).
    /// `key` is the request's [`ServerKey::of_request`] (computed once by the caller).
    pub fn absorb(
        &mut self,
        key: Option<&ServerKey>,
        msg: &Message,
        now: Instant,
    ) -> Option<ServerOutcome> {
        let Some(key) = key else {
            return Some(ServerOutcome::AckToCore);
        };
        let is_ack = msg.method() == Some(Method::Ack);
        if let Some(&id) = self.server_index.get(key) {
            let Some(Tx::Server(tx)) = self.txs.get_mut(&id).map(|b| &mut **b) else {
                return Some(ServerOutcome::Absorbed);
            };
            if is_ack {
                return Some(match tx.state {
                    ServerState::Completed { .. } => {
                        tx.state = ServerState::Confirmed;
                        let after = if tx.flow.transport.is_reliable() {
                            Duration::ZERO
                        } else {
                            self.timers.t4
                        };
                        self.arm(id, Timer::I, after, now);
                        ServerOutcome::Absorbed
                    }
                    ServerState::Accepted => ServerOutcome::AckToCore,
                    _ => ServerOutcome::Absorbed,
                });
            }
            let resend = match &tx.state {
                ServerState::Proceeding { last: Some(r) } => Some(r.clone()),
                ServerState::Completed { response, .. } => Some(response.clone()),
                _ => None,
            };
            self.stats.retransmissions_absorbed += 1;
            if let Some(bytes) = resend {
                let flow = tx.flow;
                self.stats.retransmissions_sent += 1;
                self.out.push_back(Transmit {
                    dest: Destination::Flow(flow),
                    bytes,
                    tx: None,
                });
            }
            return Some(ServerOutcome::Absorbed);
        }
        is_ack.then_some(ServerOutcome::AckToCore)
    }

    /// Creates the server transaction of a new request (not an ACK; `None` for one, or for a
    /// request without a usable Via).
    pub fn create_server(&mut self, key: ServerKey, msg: &Message, flow: Flow) -> Option<TxId> {
        if msg.method() == Some(Method::Ack) {
            return None;
        }
        let id = self.alloc_id();
        let invite = msg.method() == Some(Method::Invite);
        let state = if invite {
            ServerState::Proceeding { last: None }
        } else {
            ServerState::Trying
        };
        self.server_index.insert(key.clone(), id);
        self.txs.insert(
            id,
            Box::new(Tx::Server(ServerTx {
                key,
                invite,
                flow,
                state,
            })),
        );
        Some(id)
    }

    /// The server INVITE transaction a CANCEL refers to (RFC 3261 section 9.2).
    pub fn invite_for_cancel(&self, cancel: &Message) -> Option<TxId> {
        let mut key = ServerKey::of_request(cancel)?;
        key.method = KeyMethod::Invite;
        self.server_index.get(&key).copied()
    }

    /// The flow a server transaction answers on.
    pub fn server_flow(&self, id: TxId) -> Option<Flow> {
        match self.txs.get(&id).map(|b| &**b) {
            Some(Tx::Server(s)) => Some(s.flow),
            _ => None,
        }
    }

    /// True while the server transaction can still send a final response.
    pub fn server_awaits_final(&self, id: TxId) -> bool {
        matches!(
            self.txs.get(&id).map(|b| &**b),
            Some(Tx::Server(ServerTx {
                state: ServerState::Trying | ServerState::Proceeding { .. },
                ..
            }))
        )
    }

    /// Sends a response through a server transaction.
    pub fn respond(&mut self, id: TxId, status: u16, bytes: Bytes, now: Instant) {
        let t1 = self.timers.t1;
        let Some(Tx::Server(tx)) = self.txs.get_mut(&id).map(|b| &mut **b) else {
            return;
        };
        let reliable = tx.flow.transport.is_reliable();
        let flow = tx.flow;
        let mut arm: Vec<(Timer, Duration)> = Vec::new();
        match (&tx.state, tx.invite, status) {
            (ServerState::Trying | ServerState::Proceeding { .. }, _, 100..=199) => {
                tx.state = ServerState::Proceeding {
                    last: Some(bytes.clone()),
                };
            }
            (ServerState::Proceeding { .. }, true, 200..=299) => {
                tx.state = ServerState::Accepted;
                arm.push((Timer::L, 64 * t1));
            }
            (ServerState::Accepted, true, 200..=299) => {}
            (ServerState::Proceeding { .. }, true, _) => {
                tx.state = ServerState::Completed {
                    response: bytes.clone(),
                    g: t1,
                };
                if !reliable {
                    arm.push((Timer::G, t1));
                }
                arm.push((Timer::H, 64 * t1));
            }
            (ServerState::Trying | ServerState::Proceeding { .. }, false, _) => {
                tx.state = ServerState::Completed {
                    response: bytes.clone(),
                    g: t1,
                };
                arm.push((Timer::J, if reliable { Duration::ZERO } else { 64 * t1 }));
            }
            _ => {
                // A response after the final one: not sent (RFC 3261 16.7 item 10 keeps
                // finals single); counted so that a core bug shows.
                self.stats.unexpected_events += 1;
                return;
            }
        }
        self.out.push_back(Transmit {
            dest: Destination::Flow(flow),
            bytes,
            tx: None,
        });
        for (t, d) in arm {
            self.arm(id, t, d, now);
        }
    }

    // ----- client side -----

    /// Starts a client transaction for `request` (already carrying our Via with `branch`).
    pub fn start_client(
        &mut self,
        request: Bytes,
        method: Method,
        branch: &str,
        dest: Destination,
        reliable: bool,
        now: Instant,
    ) -> TxId {
        let id = self.alloc_id();
        let invite = method == Method::Invite;
        let key = ClientKey::new(branch, method);
        let t1 = self.timers.t1;
        self.client_index.insert(key.clone(), id);
        self.out.push_back(Transmit {
            dest: dest.clone(),
            bytes: request.clone(),
            tx: Some(id),
        });
        self.txs.insert(
            id,
            Box::new(Tx::Client(ClientTx {
                key,
                invite,
                dest,
                reliable,
                request,
                state: ClientState::Calling { interval: t1 },
                provisional: false,
                timer_c_deadline: invite.then(|| now + self.timers.timer_c),
            })),
        );
        if !reliable {
            self.arm(id, if invite { Timer::A } else { Timer::E }, t1, now);
        }
        self.arm(id, if invite { Timer::B } else { Timer::F }, 64 * t1, now);
        if invite {
            self.arm(id, Timer::C, self.timers.timer_c, now);
        }
        id
    }

    /// The request a client transaction sent.
    pub fn client_request(&self, id: TxId) -> Option<&Bytes> {
        match self.txs.get(&id).map(|b| &**b) {
            Some(Tx::Client(c)) => Some(&c.request),
            _ => None,
        }
    }

    /// Destination and reliability of a client transaction.
    pub fn client_dest(&self, id: TxId) -> Option<(Destination, bool)> {
        match self.txs.get(&id).map(|b| &**b) {
            Some(Tx::Client(c)) => Some((c.dest.clone(), c.reliable)),
            _ => None,
        }
    }

    /// True once a client INVITE transaction has seen a provisional response.
    pub fn client_has_provisional(&self, id: TxId) -> bool {
        matches!(self.txs.get(&id).map(|b| &**b), Some(Tx::Client(c)) if c.provisional)
    }

    /// Matches a response to its client transaction (17.1.3). Returns the transaction when
    /// the core must process the response; `None` when it was absorbed or matches nothing.
    pub fn on_response(&mut self, msg: &Message, now: Instant) -> Option<TxId> {
        let key = ClientKey::of_response(msg)?;
        let id = *self.client_index.get(&key)?;
        let status = msg.status()?;
        let (t1, t4, timer_c) = (self.timers.t1, self.timers.t4, self.timers.timer_c);
        let Some(Tx::Client(tx)) = self.txs.get_mut(&id).map(|b| &mut **b) else {
            return None;
        };
        let mut arm: Vec<(Timer, Duration)> = Vec::new();
        let deliver = match (&tx.state, status) {
            (ClientState::Calling { .. } | ClientState::Proceeding, 100..=199) => {
                // Non-INVITE: Timer E continues at T2 in Proceeding (17.1.2.2).
                tx.state = ClientState::Proceeding;
                if tx.invite && status > 100 {
                    tx.provisional = true;
                    // Timer C is reset by every provisional response (16.7 item 2).
                    let deadline = now + timer_c;
                    tx.timer_c_deadline = Some(deadline);
                    arm.push((Timer::C, timer_c));
                }
                true
            }
            (ClientState::Calling { .. } | ClientState::Proceeding, 200..=299) if tx.invite => {
                tx.state = ClientState::Accepted;
                tx.timer_c_deadline = None;
                arm.push((Timer::M, 64 * t1));
                true
            }
            (ClientState::Accepted, 200..=299) => true,
            (ClientState::Calling { .. } | ClientState::Proceeding, _) => {
                tx.timer_c_deadline = None;
                let ack = if tx.invite {
                    let ack = Message::parse(tx.request.clone(), &Default::default())
                        .ok()
                        .map(|req| build_ack(&req, msg));
                    arm.push((
                        Timer::D,
                        if tx.reliable {
                            Duration::ZERO
                        } else {
                            32 * t1.max(Duration::from_secs(1))
                        },
                    ));
                    ack
                } else {
                    arm.push((Timer::K, if tx.reliable { Duration::ZERO } else { t4 }));
                    None
                };
                if let Some(a) = &ack {
                    let dest = tx.dest.clone();
                    self.out.push_back(Transmit {
                        dest,
                        bytes: a.clone(),
                        tx: None,
                    });
                }
                tx.state = ClientState::Completed { ack };
                true
            }
            (ClientState::Completed { ack }, 300..=699) => {
                // Retransmitted final: resend the ACK, absorb.
                if let Some(a) = ack {
                    let t = Transmit {
                        dest: tx.dest.clone(),
                        bytes: a.clone(),
                        tx: None,
                    };
                    self.out.push_back(t);
                    self.stats.retransmissions_sent += 1;
                }
                self.stats.retransmissions_absorbed += 1;
                false
            }
            _ => {
                self.stats.retransmissions_absorbed += 1;
                false
            }
        };
        for (t, d) in arm {
            self.arm(id, t, d, now);
        }
        deliver.then_some(id)
    }

    /// Reports that a message of a client transaction could not be sent (17.1.4): the
    /// transaction ends, and the core answers as if a 503 had arrived.
    pub fn transport_error(&mut self, id: TxId) -> bool {
        let awaiting = matches!(
            self.txs.get(&id).map(|b| &**b),
            Some(Tx::Client(ClientTx {
                state: ClientState::Calling { .. } | ClientState::Proceeding,
                ..
            }))
        );
        if awaiting {
            self.remove(id);
        }
        awaiting
    }

    fn remove(&mut self, id: TxId) -> Option<TxEvent> {
        match *self.txs.remove(&id)? {
            Tx::Server(s) => {
                self.server_index.remove(&s.key);
                Some(TxEvent::ServerGone(id))
            }
            Tx::Client(c) => {
                self.client_index.remove(&c.key);
                Some(TxEvent::ClientGone(id))
            }
        }
    }

    /// Runs every timer due at `now`; returns what the core must act on.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<TxEvent> {
        let mut events = Vec::new();
        while let Some(Reverse((at, _, id, slot))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            self.fire(id, slot.timer(), now, &mut events);
        }
        events
    }

    fn fire(&mut self, id: TxId, timer: Timer, now: Instant, events: &mut Vec<TxEvent>) {
        let t2 = self.timers.t2;
        let Some(tx) = self.txs.get_mut(&id).map(|b| &mut **b) else {
            return;
        };
        let mut resend: Option<(Destination, Bytes)> = None;
        let mut rearm: Option<(Timer, Duration)> = None;
        let mut terminate = false;
        match (tx, timer) {
            (Tx::Client(c), Timer::A) => {
                if let ClientState::Calling { interval } = &mut c.state {
                    *interval *= 2;
                    resend = Some((c.dest.clone(), c.request.clone()));
                    rearm = Some((Timer::A, *interval));
                }
            }
            (Tx::Client(c), Timer::E) => match &mut c.state {
                ClientState::Calling { interval } => {
                    *interval = (*interval * 2).min(t2);
                    resend = Some((c.dest.clone(), c.request.clone()));
                    rearm = Some((Timer::E, *interval));
                }
                ClientState::Proceeding => {
                    resend = Some((c.dest.clone(), c.request.clone()));
                    rearm = Some((Timer::E, t2));
                }
                _ => {}
            },
            (Tx::Client(c), Timer::B | Timer::F) => {
                let waiting = if c.invite {
                    matches!(c.state, ClientState::Calling { .. })
                } else {
                    matches!(
                        c.state,
                        ClientState::Calling { .. } | ClientState::Proceeding
                    )
                };
                if waiting {
                    events.push(TxEvent::Timeout(id));
                    terminate = true;
                }
            }
            (Tx::Client(c), Timer::C) => {
                if let Some(deadline) = c.timer_c_deadline {
                    if now >= deadline {
                        c.timer_c_deadline = None;
                        events.push(TxEvent::TimerC {
                            tx: id,
                            provisional: c.provisional,
                        });
                    }
                }
            }
            (Tx::Client(c), Timer::D | Timer::K) => {
                terminate = matches!(c.state, ClientState::Completed { .. });
            }
            (Tx::Client(c), Timer::M) => {
                terminate = matches!(c.state, ClientState::Accepted);
            }
            (Tx::Server(s), Timer::G) => {
                if let ServerState::Completed { response, g } = &mut s.state {
                    *g = (*g * 2).min(t2);
                    resend = Some((Destination::Flow(s.flow), response.clone()));
                    rearm = Some((Timer::G, *g));
                }
            }
            (Tx::Server(s), Timer::H) => {
                terminate = matches!(s.state, ServerState::Completed { .. });
            }
            (Tx::Server(s), Timer::I) => {
                terminate = matches!(s.state, ServerState::Confirmed);
            }
            (Tx::Server(s), Timer::J) => {
                terminate = matches!(s.state, ServerState::Completed { .. });
            }
            (Tx::Server(s), Timer::L) => {
                terminate = matches!(s.state, ServerState::Accepted);
            }
            _ => self.stats.unexpected_events += 1,
        }
        if let Some((dest, bytes)) = resend {
            self.stats.retransmissions_sent += 1;
            self.out.push_back(Transmit {
                dest,
                bytes,
                tx: Some(id),
            });
        }
        if let Some((t, d)) = rearm {
            self.arm(id, t, d, now);
        }
        if terminate {
            events.extend(self.remove(id));
        }
    }

    /// Ends a client transaction whose outcome the core has already decided (Timer C
    /// expired without provisional response, or shutdown).
    pub fn abandon_client(&mut self, id: TxId) -> Option<TxEvent> {
        if matches!(self.txs.get(&id).map(|b| &**b), Some(Tx::Client(_))) {
            self.remove(id)
        } else {
            None
        }
    }
}

/// Builds the ACK for a non-2xx final response (RFC 3261 section 17.1.1.3): Request-URI,
/// Call-ID, From, CSeq number, top Via and Route of the INVITE; To of the response.
pub fn build_ack(invite: &Message, response: &Message) -> Bytes {
    build_in_transaction(invite, "ACK", response.value_of(HeaderName::To).as_deref())
}

/// Builds a CANCEL for a client INVITE transaction (RFC 3261 section 9.1).
pub fn build_cancel(invite: &Message) -> Bytes {
    build_in_transaction(invite, "CANCEL", None)
}

fn build_in_transaction(invite: &Message, method: &str, to: Option<&str>) -> Bytes {
    use std::fmt::Write;
    let mut s = String::with_capacity(512);
    let uri = invite.request_uri().unwrap_or_default();
    let _ = write!(s, "{method} {uri} SIP/2.0\r\n");
    if let Some(via) = invite.top_via_value() {
        let _ = write!(s, "Via: {via}\r\n");
    }
    s.push_str("Max-Forwards: 70\r\n");
    for (idx, h) in invite.headers() {
        let value = invite.value(idx);
        match h.name {
            HeaderName::From => {
                let _ = write!(s, "From: {value}\r\n");
            }
            HeaderName::To => {
                let _ = write!(s, "To: {}\r\n", to.unwrap_or(&value));
            }
            HeaderName::CallId => {
                let _ = write!(s, "Call-ID: {value}\r\n");
            }
            HeaderName::Route => {
                let _ = write!(s, "Route: {value}\r\n");
            }
            _ => {}
        }
    }
    let _ = write!(
        s,
        "CSeq: {} {method}\r\nContent-Length: 0\r\n\r\n",
        invite.cseq().seq
    );
    Bytes::from(s)
}

#[cfg(test)]
mod tests;
