//! The architecture's rules, checked (like rust-analyzer's tidy tests): ARCHITECTURE.md states
//! them, this test fails when the code stops following them.
//!
//! - Crate dependencies point one way: `gatehouse-sip`, `gatehouse-auth`, `gatehouse-policy` and
//!   `gatehouse-heap` depend on no other crate of the workspace; `wgsip` never on the gateway.
//! - The protocol crates (`sip`, `auth`, `policy`) depend on no I/O crate (sockets, runtimes,
//!   databases, HTTP, metrics).
//! - Every crate inherits the workspace lints, so `unsafe` is forbidden, except `gatehouse-heap`,
//!   which denies it and allows it at its allocator calls only.
//! - The sans-IO core (`proxy/src/core/`) names no I/O crate and no blocking std I/O (its unit
//!   tests, `core/tests.rs`, may).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest(crate_dir: &str) -> toml::Table {
    let path = root().join(crate_dir).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.parse()
        .unwrap_or_else(|e| panic!("{path:?} is not TOML: {e}"))
}

/// The names of a manifest's normal dependencies.
fn dependencies(crate_dir: &str) -> Vec<String> {
    manifest(crate_dir)
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every crate of the workspace: its directory.
const CRATES: &[&str] = &["sip", "auth", "policy", "proxy/heap", "proxy", "wgsip", "."];

/// Crates that do I/O or run it: none of them may appear under the protocol crates or the core.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio-rustls",
    "tokio-postgres-rustls",
    "hyper",
    "hyper-util",
    "rusqlite",
    "postgres",
    "prometheus",
    "hickory-resolver",
    "socket2",
    "nix",
];

#[test]
fn every_crate_is_listed_here() {
    let ws = manifest(".");
    let members: Vec<&str> = ws["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut listed: Vec<&str> = CRATES.to_vec();
    let mut members = members.clone();
    listed.sort_unstable();
    members.sort_unstable();
    assert_eq!(members, listed, "a new crate needs its rules here");
}

#[test]
fn crate_dependencies_point_one_way() {
    let ours = |deps: Vec<String>| -> Vec<String> {
        deps.into_iter()
            .filter(|d| d.starts_with("gatehouse") || d == "wgsip")
            .collect()
    };
    for leaf in ["sip", "auth", "policy", "proxy/heap"] {
        assert_eq!(
            ours(dependencies(leaf)),
            Vec::<String>::new(),
            "{leaf} depends on no other crate of the workspace"
        );
    }
    let mut proxy = ours(dependencies("proxy"));
    proxy.sort_unstable();
    assert_eq!(
        proxy,
        [
            "gatehouse-auth",
            "gatehouse-heap",
            "gatehouse-policy",
            "gatehouse-sip"
        ],
        "the gateway builds on the protocol crates and the heap only"
    );
    let wgsip = ours(dependencies("wgsip"));
    assert!(
        !wgsip.iter().any(|d| d == "gatehouse-proxy"),
        "wgsip speaks the protocol; it never links the gateway: {wgsip:?}"
    );
}

#[test]
fn protocol_crates_do_no_io() {
    for c in ["sip", "auth", "policy"] {
        let io: Vec<String> = dependencies(c)
            .into_iter()
            .filter(|d| IO_CRATES.contains(&d.as_str()))
            .collect();
        assert!(io.is_empty(), "{c} depends on I/O crates: {io:?}");
    }
}

#[test]
fn unsafe_is_forbidden_everywhere_but_the_heap() {
    let ws = manifest(".");
    assert_eq!(
        ws["workspace"]["lints"]["rust"]["unsafe_code"].as_str(),
        Some("forbid")
    );
    for c in CRATES.iter().filter(|c| **c != "proxy/heap") {
        let m = manifest(c);
        assert_eq!(
            m.get("lints")
                .and_then(|l| l.get("workspace"))
                .and_then(|w| w.as_bool()),
            Some(true),
            "{c} inherits the workspace lints"
        );
    }
    let heap = manifest("proxy/heap");
    assert_eq!(
        heap["lints"]["rust"]["unsafe_code"].as_str(),
        Some("deny"),
        "the heap crate denies unsafe and allows it per call"
    );
    // Each `unsafe` block of the heap crate is allowed on its own and argued.
    let src = std::fs::read_to_string(root().join("proxy/heap/src/lib.rs")).expect("heap source");
    let blocks = src.matches("unsafe {").count();
    assert!(blocks > 0);
    assert_eq!(src.matches("#[allow(unsafe_code)]").count(), blocks);
    assert_eq!(src.matches("// SAFETY:").count(), blocks);
}

/// Rust files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_core_is_sans_io() {
    let mut files = Vec::new();
    rust_files(&root().join("proxy/src/core"), &mut files);
    assert!(files.len() > 10, "the core's files: {files:?}");
    let forbidden: Vec<String> = IO_CRATES
        .iter()
        .map(|c| format!("{}::", c.replace('-', "_")))
        .chain(
            [
                "std::fs",
                "std::net::UdpSocket",
                "std::net::TcpStream",
                "std::net::TcpListener",
                "std::thread::sleep",
                "std::process",
            ]
            .map(String::from),
        )
        .collect();
    for f in files.iter().filter(|f| !f.ends_with("tests.rs")) {
        let text = std::fs::read_to_string(f).expect("source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in &forbidden {
                assert!(
                    !code.contains(word.as_str()),
                    "{}:{}: the core names `{word}`: {line}",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}
