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
            StoreWrite::AuthOutcome { .. } => "auth_outcome",
        }
    }
}

/// The writes of one batch of input, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub writes: Vec<StoreWrite>,
    /// The batch establishes a tunnel: the transmits produced with it (the tunnel's 200 among
    /// them) must not leave before the batch is committed, so an established tunnel is never
    /// lost to a crash. The driver holds them until the storage worker acknowledges.
    pub durable: bool,
}
