//! Shared test harness: fixtures, a gateway on ephemeral loopback ports, waiting on
//! events with timeouts, external tools found or skipped loudly.

use std::path::PathBuf;
use std::time::Duration;

/// Root of the repository.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Bytes of a file under tests/fixtures.
pub fn fixture(rel: &str) -> Vec<u8> {
    let p = repo().join("tests/fixtures").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Default time limit for waiting on an event in a test.
pub const WAIT: Duration = Duration::from_secs(10);
