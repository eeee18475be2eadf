//! The `wgsip` binary's own behaviour that needs no network: help, key handling, refusal of
//! secrets files others can read. (Cargo also builds the binary for the workspace's
//! end-to-end WireGuard test because of this test target.)

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wgsip"))
}

fn temp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("wgsip-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_lists_the_roles() {
    let out = bin().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("endpoint") && text.contains("call") && text.contains("hangup"),
        "{text}"
    );
}

#[test]
fn pubkey_creates_a_private_key_file_0600_and_derives_the_public_key() {
    let d = temp("key");
    let key = d.join("site.key");
    let _ = std::fs::remove_file(&key);
    let out = bin().arg("pubkey").arg(&key).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let again = bin().arg("pubkey").arg(&key).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        first,
        "stable for the same key"
    );
    // Same derivation as wg(8): compare with the library.
    let private = wgsip::config::load_or_create_key(&key).unwrap();
    use base64::Engine;
    assert_eq!(
        first,
        base64::engine::general_purpose::STANDARD.encode(wgsip::config::public_key(&private))
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn secrets_readable_by_others_are_refused() {
    let d = temp("perm");
    let pw = d.join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = wgsip::config::read_secret(&pw).unwrap_err().to_string();
    assert!(err.contains("0600"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(wgsip::config::read_secret(&pw).unwrap().as_str(), "secret");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn config_errors_name_the_line() {
    let d = temp("cfg");
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, "[sip]\ntransport = \"udp\"\ngateway = \"[2001:db8::1]:5060\"\nbind = \"[2001:db8::2]:0\"\naor = \"sip:a@b\"\nusername = \"a\"\npassword_file = \"pw\"\nsurprise = 1\n").unwrap();
    let err = wgsip::config::Config::load(&cfg).unwrap_err().to_string();
    assert!(err.contains("c.toml:8"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
