//! Gatehouse system tests: one binary, one harness (see `harness`).

mod harness;
mod sipp;
mod tls;
mod torture;
