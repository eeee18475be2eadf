//! Interoperability with an independent SCRAM implementation (Python `scramp`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use base64::Engine;
use gatehouse_auth::scram::ScramClient;
use gatehouse_sip::flow::Transport;

use crate::harness::repo;
use crate::sasl::setup;

/// True when python3 with scramp is available (required in CI, where .ci/run installs it).
fn scramp() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import scramp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 scramp is required in CI"
        );
        eprintln!("SKIPPED: python3 scramp not installed (pip install scramp)");
    }
    ok
}

fn peer() -> String {
    repo()
        .join("tests/interop/scramp_peer.py")
        .display()
        .to_string()
}

#[test]
fn scramp_client_authenticates_through_raw_sip() {
    if !scramp() {
        return;
    }
    let s = setup("");
    let gw = s.gw.addr(Transport::Udp);
    let out = Command::new("python3")
        .args([
            &peer(),
            "invite",
            &gw.ip().to_string(),
            &gw.port().to_string(),
            "alice",
            "alice-secret",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "200");
    // And a wrong password through the same implementation is refused.
    let out = Command::new("python3")
        .args([
            &peer(),
            "invite",
            &gw.ip().to_string(),
            &gw.port().to_string(),
            "alice",
            "wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("403"));
}

#[test]
fn our_client_authenticates_against_scramp_server() {
    if !scramp() {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut child = Command::new("python3")
        .args([&peer(), "server", "alice", "pencil"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut client = ScramClient::new("alice", b"pencil", None);
    writeln!(input, "{}", b64.encode(client.client_first())).unwrap();
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    let server_first = b64.decode(line.trim()).unwrap();
    let client_final = client.client_final(&server_first).unwrap();
    writeln!(input, "{}", b64.encode(client_final)).unwrap();
    line.clear();
    output.read_line(&mut line).unwrap();
    client
        .verify_server_final(&b64.decode(line.trim()).unwrap())
        .expect("scramp's server-final verifies");
    assert!(child.wait().unwrap().success());
}
