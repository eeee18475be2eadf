//! Tunnels: WireGuard SDP handling and the table of dialogs the gateway authorised.

pub mod sdp;
pub mod table;

pub use table::{Party, Tunnel, TunnelState, TunnelTable};
