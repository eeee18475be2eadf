//! Tunnels: WireGuard SDP handling and the table of dialogs the gateway authorised.

pub use gatehouse_sip::wireguard as sdp;
pub mod claims;
pub mod table;

pub use table::{Party, Tunnel, TunnelState, TunnelTable};
