//! The admin API with HTTP-SASL: the exchange, session reuse and expiry, failures, roles,
//! every endpoint, -PLUS over TLS, the `gatehouse admin` CLI, and Python scramp as client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use gatehouse::admin::client::{http, AdminClient, HttpResponse};
use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use serde_json::json;

use crate::harness::repo;
use crate::sasl::setup;

/// Listings page with a cursor: five tunnels (from the store) in pages of two, joined by
/// following `Link: rel="next"`, each once and in Call-ID order; a bad `limit` is a 400.
#[test]
fn listings_page_with_a_link_to_the_next_page() {
    use gatehouse::store::{Store, StoreWrite};
    use gatehouse::tunnel::{Tunnel, TunnelState};
    let ids = ["t-a@x", "t-b@x", "t c@x", "t-d@x", "t/e@x"];
    let s = crate::sasl::setup_with("[admin]\nlisten = \"127.0.0.1:0\"\n", |path| {
        let writes: Vec<StoreWrite> = ids
            .iter()
            .map(|id| {
                StoreWrite::SaveTunnel(Box::new(Tunnel {
                    call_id: (*id).into(),
                    caller_tag: "c".into(),
                    callee_tag: Some("e".into()),
                    identity: "alice".into(),
                    from: "sip:alice@partner.example".into(),
                    to: "sip:vpn@org.example".into(),
                    prefixes: "2001:db8:456:1::/64".into(),
                    pubkey: String::new(),
                    pskmth: "scram".into(),
                    created_unix: 1,
                    state: TunnelState::Established,
                    caller: None,
                    callee: None,
                }))
            })
            .collect();
        Store::open(path).unwrap().apply(&writes).unwrap();
    });
    let addr = s.gw.admin.expect("admin listener");
    let mut c = AdminClient::new(addr, "root", "root-secret");
    let mut path = "/api/v1/tunnels?limit=2".to_owned();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = c.request("GET", &path, None).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let rows = r.json();
        let rows = rows.as_array().unwrap();
        assert!(rows.len() <= 2);
        seen.extend(
            rows.iter()
                .map(|t| t["call_id"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match r.next_page() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    let mut expected: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    for bad in ["limit=0", "limit=10001", "limit=x", "colour=red"] {
        let r = c
            .request("GET", &format!("/api/v1/tunnels?{bad}"), None)
            .unwrap();
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.json()["error"].is_string());
    }
    let r = c
        .request("GET", "/api/v1/registrations?limit=1", None)
        .unwrap();
    assert_eq!((r.status, r.next_page()), (200, None));
}

pub fn admin_setup(extra: &str) -> (crate::sasl::Setup, SocketAddr) {
    let s = setup(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"));
    let a = s.gw.admin.expect("admin listener");
    (s, a)
}

#[test]
fn http_sasl_exchange_and_session_reuse() {
    let (_s, addr) = admin_setup("");
    let r = http(addr, "GET", "/api/v1/status", None, None).unwrap();
    assert_eq!(r.status, 401);
    let challenge = SaslParams::parse(r.header("www-authenticate").unwrap()).unwrap();
    assert_eq!(challenge.realm.as_deref(), Some("admin.org.example"));
    assert_eq!(
        challenge.mech.as_deref(),
        Some("SCRAM-SHA-256"),
        "no -PLUS over plain HTTP"
    );
    let mut c = AdminClient::new(addr, "root", "root-secret");
    let r = c.request("GET", "/api/v1/status", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tunnels"], 0);
    let session = c.session().unwrap().to_owned();
    // The session alone is enough now, without a new exchange.
    let auth = SaslParams {
        s2s: Some(session.clone()),
        ..SaslParams::default()
    }
    .emit();
    let r = http(addr, "GET", "/api/v1/tunnels", Some(&auth), None).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.json().is_array());
    // A forged session gets a fresh challenge.
    let forged = SaslParams {
        s2s: Some("forged".into()),
        ..SaslParams::default()
    }
    .emit();
    assert_eq!(
        http(addr, "GET", "/api/v1/status", Some(&forged), None)
            .unwrap()
            .status,
        401
    );
}

#[test]
fn sessions_expire_after_the_idle_time() {
    let (_s, addr) = admin_setup("session_idle_s = 1\n");
    let mut c = AdminClient::new(addr, "root", "root-secret");
    assert_eq!(
        c.request("GET", "/api/v1/status", None).unwrap().status,
        200
    );
    let auth = SaslParams {
        s2s: c.session().map(str::to_owned),
        ..SaslParams::default()
    }
    .emit();
    // The idle timeout is what is under test: let one second pass without using the session.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        http(addr, "GET", "/api/v1/status", Some(&auth), None)
            .unwrap()
            .status,
        401
    );
}

#[test]
fn failures_malformed_headers_and_roles() {
    let (_s, addr) = admin_setup("");
    let err = AdminClient::new(addr, "root", "wrong")
        .request("GET", "/api/v1/status", None)
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let r = http(
        addr,
        "GET",
        "/api/v1/status",
        Some("SASL realm=\"a\", realm=\"b\""),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let mut viewer = AdminClient::new(addr, "viewer", "viewer-secret");
    assert_eq!(
        viewer
            .request("GET", "/api/v1/status", None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        viewer
            .request("GET", "/api/v1/registrations", None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        viewer
            .request("POST", "/api/v1/reload", None)
            .unwrap()
            .status,
        403
    );
    assert_eq!(
        viewer.request("GET", "/api/v1/users", None).unwrap().status,
        403
    );
    assert_eq!(
        viewer
            .request("DELETE", "/api/v1/tunnels/x", None)
            .unwrap()
            .status,
        403
    );
    // SIP users are not admins, even with their right password.
    assert!(AdminClient::new(addr, "alice", "alice-secret")
        .request("GET", "/api/v1/status", None)
        .is_err());
}

#[test]
fn every_endpoint_as_admin() {
    let (_s, addr) = admin_setup("");
    let mut c = AdminClient::new(addr, "root", "root-secret");
    let mut call = |m: &str, p: &str, b: Option<serde_json::Value>| -> HttpResponse {
        c.request(m, p, b.as_ref()).unwrap()
    };
    let users = call("GET", "/api/v1/users", None);
    assert_eq!(users.status, 200);
    assert!(
        users.body.contains("sip:alice@partner.example") && !users.body.contains("stored"),
        "{}",
        users.body
    );
    let add = json!({"username": "carol", "password": "carol-secret", "aors": ["sip:carol@partner.example"]});
    assert_eq!(call("POST", "/api/v1/users", Some(add.clone())).status, 201);
    assert_eq!(
        call("POST", "/api/v1/users", Some(add)).status,
        400,
        "duplicate"
    );
    assert_eq!(
        call("POST", "/api/v1/users/carol/disable", None).status,
        200
    );
    assert!(call("GET", "/api/v1/users", None)
        .body
        .contains("\"enabled\":false"));
    assert_eq!(call("POST", "/api/v1/users/carol/enable", None).status, 200);
    assert_eq!(
        call(
            "PUT",
            "/api/v1/users/carol/password",
            Some(json!({"password": "new-secret"}))
        )
        .status,
        200
    );
    assert_eq!(call("DELETE", "/api/v1/users/carol", None).status, 200);
    assert_eq!(call("DELETE", "/api/v1/users/carol", None).status, 404);
    assert_eq!(call("GET", "/api/v1/registrations", None).status, 200);
    assert_eq!(
        call(
            "DELETE",
            "/api/v1/registrations/sip%3Anobody%40org.example",
            None
        )
        .status,
        404
    );
    assert_eq!(call("GET", "/api/v1/tunnels", None).status, 200);
    assert_eq!(
        call("DELETE", "/api/v1/tunnels/unknown-call-id", None).status,
        404
    );
    assert_eq!(
        call("POST", "/api/v1/reload", None).status,
        200,
        "the setup's policy file reloads"
    );
    assert_eq!(
        call("PUT", "/api/v1/log-level", Some(json!({"level": "loud"}))).status,
        400
    );
    assert_eq!(
        call("PUT", "/api/v1/log-level", Some(json!({"level": "debug"}))).status,
        501,
        "no log control in tests"
    );
    assert_eq!(call("GET", "/api/v1/nothing", None).status, 404);
}

/// One HTTP request over a TLS connection (the admin API with `tls = true`).
fn https(
    stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    auth: Option<&str>,
) -> (u16, Option<String>, Option<String>) {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /api/v1/status HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    stream.flush().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read one response (headers, then Content-Length bytes).
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let h = |name: &str| {
                    head.lines().find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_owned())
                    })
                };
                return (status, h("www-authenticate"), h("authentication-info"));
            }
        }
    }
}

#[test]
fn scram_plus_over_tls() {
    let (s, addr) = admin_setup("tls = true\n");
    let conn = crate::client::tls_connection(s.ca.clone());
    let mut stream = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    let mut cb = vec![0u8; 32];
    stream
        .conn
        .export_keying_material(&mut cb[..], b"EXPORTER-Channel-Binding", None)
        .unwrap();
    let (status, challenge, _) = https(&mut stream, None);
    assert_eq!(status, 401);
    let offered = SaslParams::parse(&challenge.unwrap())
        .unwrap()
        .mech
        .unwrap();
    assert!(offered.starts_with("SCRAM-SHA-256-PLUS"), "{offered}");
    let mut scram = ScramClient::new("root", b"root-secret", Some(cb));
    let p = SaslParams {
        mech: Some("SCRAM-SHA-256-PLUS".into()),
        c2s: Some(scram.client_first()),
        ..SaslParams::default()
    };
    let (status, challenge, _) = https(&mut stream, Some(&p.emit()));
    assert_eq!(status, 401);
    let c = SaslParams::parse(&challenge.unwrap()).unwrap();
    let cf = scram.client_final(c.s2c.as_deref().unwrap()).unwrap();
    let p = SaslParams {
        s2s: c.s2s,
        c2s: Some(cf),
        ..SaslParams::default()
    };
    let (status, _, info) = https(&mut stream, Some(&p.emit()));
    assert_eq!(status, 200);
    // RFC 7615's form: auth-params without a scheme.
    let info = info.unwrap();
    assert!(!info.to_ascii_uppercase().starts_with("SASL"), "{info}");
    let info = SaslParams::parse_info(&info).unwrap();
    scram
        .verify_server_final(info.s2c.as_deref().unwrap())
        .unwrap();
    assert!(info.s2s.is_some(), "a session handle for reuse");
}

/// The `gatehouse` binary next to the test's, and root's password in a 0600 file.
fn cli(s: &crate::sasl::Setup) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("gatehouse");
    let pw = s.dir.path().join("root.password");
    secret_file(&pw, "root-secret\n");
    (bin, pw)
}

fn secret_file(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn gatehouse_admin_cli() {
    let (s, addr) = admin_setup("");
    let (bin, pw) = cli(&s);
    let out = Command::new(&bin)
        .args([
            "admin",
            "--url",
            &addr.to_string(),
            "--user",
            "root",
            "--password-file",
        ])
        .arg(&pw)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tunnels") && text.contains("registrations"),
        "{text}"
    );
    let out = Command::new(&bin)
        .args([
            "admin",
            "--url",
            &addr.to_string(),
            "--user",
            "root",
            "--json",
            "--password-file",
        ])
        .arg(&pw)
        .arg("users")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "alice"));

    // Tables, like `wg show`: a header in a meaningful order, aligned columns, no JSON.
    let admin = |url: &str, args: &[&str]| {
        Command::new(&bin)
            .args(["admin", "--url", url, "--user", "root", "--password-file"])
            .arg(&pw)
            .args(args)
            .output()
            .unwrap()
    };
    let url = format!("http://{addr}");
    let out = admin(&url, &["users"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("USER  "), "{text}");
    assert!(
        header.find("ENABLED") < header.find("AORS")
            && header.find("AORS") < header.find("MECHANISMS"),
        "{text}"
    );
    let alice = lines.find(|l| l.starts_with("alice ")).unwrap();
    assert!(
        alice.contains("yes")
            && alice.contains("sip:alice@partner.example")
            && !alice.contains('[')
            && !alice.contains('"'),
        "{text}"
    );
    // Columns line up: the AORS column starts at the same place in every row.
    let at = header.find("AORS").unwrap();
    assert_eq!(alice.find("sip:alice@"), Some(at), "{text}");
    let out = admin(&url, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("version:"), "{text}");
    assert!(!text.contains('{'), "{text}");
    let out = admin(&url, &["tunnels"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "(none)\n");

    // Exit codes, one error line each: the API refused (1), bad --url (2), unreachable (3),
    // authentication failed (4).
    let out = admin(&url, &["teardown", "no-such-call"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: the gateway answered 404"), "{err}");
    let out = admin("ftp://127.0.0.1:1", &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = admin(&format!("http://{closed}"), &["status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().count(),
        1,
        "connection refused said once: {err}"
    );
    assert!(err.contains("cannot connect to http://127.0.0.1:"), "{err}");
    let wrong = s.dir.path().join("wrong.password");
    secret_file(&wrong, "not-it\n");
    let out = Command::new(&bin)
        .args(["admin", "--url", &url, "--user", "root", "--password-file"])
        .arg(&wrong)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: authentication failed"));
}

/// `gatehouse admin --url https://... --ca FILE`: the certificate verified against the CA,
/// SCRAM-SHA-256-PLUS bound to the connection; without the right CA, exit 3 and nothing sent.
#[test]
fn gatehouse_admin_cli_over_https() {
    let (s, addr) = admin_setup("tls = true\n");
    let (bin, pw) = cli(&s);
    let url = format!("https://localhost:{}", addr.port());
    // The gateway's self-signed certificate is its own CA.
    let ca = s.dir.path().join("cert.pem");
    let out = Command::new(&bin)
        .args(["admin", "--url", &url, "--ca"])
        .arg(&ca)
        .args(["--user", "root", "--password-file"])
        .arg(&pw)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tunnels:"));
    // The library client says how it authenticated.
    let mut c = gatehouse::admin::client::AdminClient::connect(
        &gatehouse::admin::client::AdminUrl::parse(&url).unwrap(),
        Some(ca.as_path()),
        "root",
        "root-secret",
    )
    .unwrap();
    assert_eq!(
        c.request("GET", "/api/v1/status", None).unwrap().status,
        200
    );
    assert_eq!(c.mechanism(), "SCRAM-SHA-256-PLUS");
    // Another CA: the certificate is not trusted.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other_ca = s.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let out = Command::new(&bin)
        .args(["admin", "--url", &url, "--ca"])
        .arg(&other_ca)
        .args(["--user", "root", "--password-file"])
        .arg(&pw)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: TLS with https://localhost:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scramp_authenticates_against_the_admin_api() {
    let ok = Command::new("python3")
        .args(["-c", "import scramp"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "scramp is required in CI");
        eprintln!("SKIPPED: python3 scramp not installed");
        return;
    }
    let (_s, addr) = admin_setup("");
    let out = Command::new("python3")
        .arg(repo().join("tests/interop/scramp_peer.py"))
        .args([
            "http",
            &addr.ip().to_string(),
            &addr.port().to_string(),
            "root",
            "root-secret",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Instant::now();
}
