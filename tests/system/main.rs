//! Gatehouse system tests: one binary, one harness (see `harness`).

// A failed unwrap in a test is a failed test with its location: what a test should do.
#![allow(clippy::unwrap_used)]

mod admin;
mod attacks;
mod client;
mod cluster;
mod crossover;
mod dispatcher;
mod dns;
mod federation;
mod hardening;
mod harness;
mod interop;
mod load;
mod operations;
mod postgres;
mod sasl;
mod sipp;
mod storage;
mod tls;
mod torture;
mod wireguard;
