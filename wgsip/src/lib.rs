//! wgsip: the WireGuard-over-SIP endpoint and caller that speak Gatehouse's profile
//! (SASL in SIP, WireGuard SDP) and configure a real WireGuard interface over its UAPI socket.

pub mod caller;
pub mod config;
pub mod endpoint;
pub mod load;
pub mod net;
pub mod sipua;
pub mod site;
pub mod uapi;
pub mod wgsdp;
