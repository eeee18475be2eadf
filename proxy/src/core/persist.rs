//! What the core starts from and what it asks to be persisted: plain data, no I/O.
//!
//! The core never touches the store. At start the driver loads a [`Snapshot`] (credentials,
//! live bindings, the tunnel table); while running, every change the core makes to persistent
//! state leaves it as a [`StoreWrite`] in a [`WriteBatch`] (`Proxy::take_writes`), which the
//! driver hands to the storage worker off the loop (`store::worker`). Credential changes made
//! elsewhere (CLI, admin API) come back as a new credential snapshot
//! (`Proxy::set_credentials`).

use std::collections::HashMap;

use gatehouse_auth::Credential;

use crate::tunnel::Tunnel;

/// A registrar binding (AOR -> Contact through a flow), persisted across restarts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BindingRecord {
    pub aor: String,
    pub contact: String,
    pub transport: String,
    /// Source address of the REGISTER (where requests to the contact are sent).
    pub remote: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub instance: Option<String>,
    pub identity: String,
    /// RFC 5626 reg-id (absent in journals written before it existed).
    #[serde(default)]
    pub reg_id: Option<u32>,
    /// The gateway holding the binding's flow, as its `[cluster] peer_uri`: requests for the
    /// binding from another gateway of the cluster go through it (RFC 5626 edge proxy).
    /// `None` when the gateway that accepted the REGISTER has no peer URI (one gateway alone).
    #[serde(default)]
    pub holder: Option<String>,
}

/// Users by name, as the SASL server looks them up (`CredentialSource`).
pub type Credentials = HashMap<String, Credential>;

/// The persistent state a core starts from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub credentials: Credentials,
    /// Bindings not yet expired.
    pub bindings: Vec<BindingRecord>,
    pub tunnels: Vec<Tunnel>,
}

/// One change to persistent state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StoreWrite {
    SaveBinding(BindingRecord),
    RemoveBinding {
        aor: String,
        contact: String,
    },
    SaveTunnel(Box<Tunnel>),
    DeleteTunnel {
        call_id: String,
        caller_tag: String,
    },
    /// A tunnel just proposed (its `SaveTunnel` earlier in the same batch), counted against
    /// the policy's limits over the whole cluster (shared store only): in the transaction that
    /// inserted its row, the store's counters (which include it) must not exceed the limits,
    /// else the row goes again and the set-up is refused (`Applied::reservations`).
    ReserveTunnel {
        call_id: String,
        caller_tag: String,
        identity: String,
        to: String,
        max_total: Option<u32>,
        max_per_identity: Option<u32>,
        max_per_target: Option<u32>,
        /// Unix second after which the core no longer waits (it went ahead on its own
        /// counts): a reservation that reaches the store later is not evaluated.
        wait_until_unix: u64,
    },
    /// An authentication's outcome, for the other gateways of a cluster to count in their
    /// lockout (announced on a shared store, nothing on a file of one gateway's own).
    AuthOutcome {
        user: Option<String>,
        source: std::net::IpAddr,
        success: bool,
    },
}

impl StoreWrite {
    /// Bounded label (logs, metrics).
    pub fn label(&self) -> &'static str {
        match self {
            StoreWrite::SaveBinding(_) => "save_binding",
            StoreWrite::RemoveBinding { .. } => "remove_binding",
            StoreWrite::SaveTunnel(_) => "save_tunnel",
            StoreWrite::DeleteTunnel { .. } => "delete_tunnel",
            StoreWrite::ReserveTunnel { .. } => "reserve_tunnel",
            StoreWrite::AuthOutcome { .. } => "auth_outcome",
        }
    }
}

/// What a committed batch decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The outcome of each `ReserveTunnel` of the batch.
    pub reservations: Vec<Reservation>,
}

/// A tunnel counted against the cluster's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub call_id: String,
    pub caller_tag: String,
    /// The limit the cluster's tunnels reached (the row is gone), or `None`: within limits.
    pub refused: Option<gatehouse_policy::Denied>,
}

/// The writes of one batch of input, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub writes: Vec<StoreWrite>,
    /// The batch establishes a tunnel: the transmits produced with it (the tunnel's 200 among
    /// them) must not leave before the batch is committed, so an established tunnel is never
    /// lost to a crash. The driver holds them until the storage worker acknowledges.
    pub durable: bool,
    /// The core waits for what the store answers to this batch (a tunnel's reservation
    /// against the cluster's limits): hand it to the worker now, not at the next tick.
    pub urgent: bool,
}
