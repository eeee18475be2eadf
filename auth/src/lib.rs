//! SASL for SIP and HTTP, sans-IO: no sockets, no clock reads (time is an argument).
//!
//! - [`header`]: the `SASL` scheme's parameters (`realm`, `mech`, `c2s`, `s2c`, `s2s`);
//! - [`server`]: the SASL server (rsasl SCRAM plus the gateway's own checks), producing the
//!   [`server::Authenticated`] proof;
//! - [`scram_msg`]: strict RFC 5802 parsers of the client messages (run before rsasl);
//! - [`scram`]: verifiers, the SCRAM client, ClientKey recovery and the `scram` PSK derivation;
//! - [`secret`]: zeroizing, redacted secret values.

pub mod header;
pub mod scram;
pub mod scram_msg;
pub mod secret;
pub mod server;
pub mod xover;

pub use header::{HeaderError, SaslParams};
pub use secret::Secret;
pub use server::{
    AuthError, Authenticated, Credential, CredentialSource, Crossed, Exchange, Failure, Mechanism,
    Outcome, SaslServer, ServerSettings, ServerStats, Subscriber, TlsInfo,
};
