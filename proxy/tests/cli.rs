//! The `gatehouse` binary: arguments, configuration errors, and a real run with the
//! embedded default and with deploy/examples/bench.toml (SIPp calls through it).

// Runs the binary for real: real clocks, real files.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn version_and_help() {
    let out = bin().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("gatehouse 0."));
    let out = bin().arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("run") && text.contains("check-config"),
        "{text}"
    );
    assert!(
        text.contains("Common tasks:") && text.contains("Exit codes:"),
        "{text}"
    );
}

#[test]
fn check_config_accepts_examples_and_names_line_and_key_of_errors() {
    for f in [
        "examples/bench.toml",
        "examples/edge.toml",
        "cluster/gateway.toml",
    ] {
        let out = bin()
            .arg("check-config")
            .arg(repo().join("deploy").join(f))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = std::env::temp_dir().join(format!("gatehouse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[sip]\ndomains = [\"org.example\"]\n\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n\n[trust]\nsources = [\"10.0.0.300/8\"]\n",
    )
    .expect("write");
    let out = bin().arg("check-config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:9: trust.sources[0]:"), "{err}");
    std::fs::write(
        &bad,
        "[sip]\ndomains = [\"org.example\"]\nlisten_everywhere = true\n",
    )
    .expect("write");
    let out = bin().arg("check-config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3: sip.listen_everywhere:"), "{err}");
    // `run` refuses the same file with the same code, before binding anything.
    let out = bin()
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gatehouse run --config CONFIG` with its standard error in `log`.
fn run_logged(config: &std::path::Path, log: &std::path::Path) -> Child {
    bin()
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("start")
}

/// Sends OPTIONS to the gateway until it answers (it is up) or the time limit passes.
fn ping(addr: &str) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let msg = format!(
            "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKping{n};rport\r\nMax-Forwards: 70\r\n\
From: <sip:probe@org.example>;tag=p\r\nTo: <sip:{addr}>\r\nCall-ID: ping-{n}@probe\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n",
            local = sock.local_addr().expect("addr")
        );
        sock.send_to(msg.as_bytes(), addr).expect("send");
        let mut buf = [0u8; 4096];
        if let Ok(len) = sock.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..len]).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "gateway at {addr} never answered"
        );
    }
}

fn terminate(mut child: Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{tool} is required in CI");
        eprintln!("SKIPPED: {tool} not installed");
    }
    ok
}

/// Both runs use the fixed ports of the embedded default and bench.toml, so they share
/// one test and run one after the other.
#[test]
fn run_embedded_default_then_bench_config_with_sipp() {
    let child = bin()
        .arg("run")
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let answer = ping("127.0.0.1:5060");
    assert!(answer.starts_with("SIP/2.0 200 OK\r\n"), "{answer}");
    terminate(child);

    if !have("sipp") {
        return;
    }
    let child = bin()
        .args(["run", "--config"])
        .arg(repo().join("deploy/examples/bench.toml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    ping("127.0.0.1:5060");
    let dir = std::env::temp_dir().join(format!("gatehouse-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sipp = |args: &[&str]| {
        Command::new("sipp")
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp")
    };
    let uas_xml = repo().join("tests/sipp/uas.xml");
    let uac_xml = repo().join("tests/sipp/uac.xml");
    let mut uas = sipp(&[
        "-sf",
        uas_xml.to_str().unwrap_or(""),
        "-i",
        "127.0.0.1",
        "-p",
        "5070",
        "-m",
        "200",
        "-nostdin",
        "-timeout",
        "60",
        "-default_behaviors",
        "all,-abortunexp",
    ]);
    // SIPp retransmits the INVITE, so an answerer that is a moment late costs no call.
    let mut uac = sipp(&[
        "127.0.0.1:5060",
        "-sf",
        uac_xml.to_str().unwrap_or(""),
        "-s",
        "vpn",
        "-i",
        "127.0.0.1",
        "-p",
        "0",
        "-m",
        "200",
        "-r",
        "200",
        "-nostdin",
        "-timeout",
        "60",
        "-timeout_error",
        "-default_behaviors",
        "all,-abortunexp",
    ]);
    assert!(
        uac.wait().expect("uac").success(),
        "200 calls through bench.toml"
    );
    assert!(uas.wait().expect("uas").success());
    let _ = std::fs::remove_dir_all(&dir);
    terminate(child);
}

fn user_cmd(store: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = bin()
        .arg("user")
        .args(args)
        .arg("--store")
        .arg(store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).expect("write");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

#[test]
fn user_commands_round_trip_and_never_store_the_password() {
    let dir = std::env::temp_dir().join(format!("gatehouse-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let store = dir.join("store.sqlite");
    let _ = std::fs::remove_file(&store);
    let out = user_cmd(
        &store,
        &["add", "alice", "--aor", "sip:alice@partner.example"],
        Some("Unique-Pa55word-XYZ\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = user_cmd(
        &store,
        &["add", "alice", "--aor", "sip:alice@partner.example"],
        Some("x\n"),
    );
    assert!(!out.status.success(), "duplicate refused");
    let out = user_cmd(&store, &["add", "bob", "--aor", "not-an-aor"], Some("x\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a sip:user@domain AOR"));
    let out = user_cmd(&store, &["list"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alice") && text.contains("sip:alice@partner.example"),
        "{text}"
    );
    let out = user_cmd(&store, &["passwd", "alice"], Some("Second-Pa55word-XYZ\n"));
    assert!(out.status.success());
    let s = gatehouse::store::Store::open(&store).expect("open");
    let c = s.credential("alice").expect("query").expect("user");
    assert!(c.verifier.check_password(b"Second-Pa55word-XYZ"));
    assert!(!c.verifier.check_password(b"Unique-Pa55word-XYZ"));
    drop(s);
    let out = user_cmd(&store, &["show", "alice"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("enabled:    true"), "{text}");
    for f in ["store.sqlite", "store.sqlite-wal"] {
        let bytes = std::fs::read(dir.join(f)).unwrap_or_default();
        for pw in [b"Unique-Pa55word-XYZ".as_slice(), b"Second-Pa55word-XYZ"] {
            assert!(
                !bytes.windows(pw.len()).any(|w| w == pw),
                "password found in {f}"
            );
        }
    }
    let out = user_cmd(&store, &["del", "alice"], None);
    assert!(out.status.success());
    let out = user_cmd(&store, &["show", "alice"], None);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gatehouse user|admin-user --config FILE` take the store and the verifiers' iterations from
/// the gateway's configuration; `--store` overrides the store; without either, one clear error.
#[test]
fn user_commands_take_the_store_and_iterations_from_the_configuration() {
    let dir = std::env::temp_dir().join(format!("gatehouse-users-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("gatehouse.toml");
    std::fs::write(
        &config,
        "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n\
[auth]\nstore = \"users.sqlite\"\niterations = 8192\n",
    )
    .expect("write");
    let run = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = bin()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write");
        child.wait_with_output().expect("wait")
    };
    let cfg = config.to_str().unwrap();
    let out = run(
        &[
            "user",
            "add",
            "alice",
            "--aor",
            "sip:alice@partner.example",
            "--config",
            cfg,
        ],
        "alice-secret\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The store named by the configuration (relative to it), with its iterations.
    let out = run(&["user", "show", "alice", "-c", cfg], "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("iterations: 8192"), "{text}");
    assert!(dir.join("users.sqlite").exists());
    let out = run(
        &["admin-user", "add", "root", "--config", cfg],
        "root-secret\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --store wins over the configuration's.
    let other = dir.join("other.sqlite");
    let out = run(
        &[
            "user",
            "list",
            "--config",
            cfg,
            "--store",
            other.to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("alice"));
    let out = run(&["user", "list"], "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "error: --store FILE|URL or --config FILE is required",
        "one line"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check-config` touches no network: a route to a name that does not resolve is checked for
/// its form only; `--resolve` resolves names as `run` does (here one /etc/hosts answers).
#[test]
fn check_config_resolves_names_only_when_asked() {
    let dir = std::env::temp_dir().join(format!("gatehouse-resolve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let base = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";
    let offline = dir.join("offline.toml");
    std::fs::write(
        &offline,
        format!("{base}[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@gateway.invalid:5070\"\n"),
    )
    .expect("write");
    let out = bin()
        .arg("check-config")
        .arg(&offline)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = dir.join("local.toml");
    std::fs::write(
        &local,
        format!(
            "{base}[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@localhost:5070\"\n"
        ),
    )
    .expect("write");
    let out = bin()
        .args(["check-config", "--resolve"])
        .arg(&local)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP applies what can change at run time — here the log level, which shows at once — and
/// names, as warnings, the changed keys that need a restart (a listener, the metrics address,
/// the store), at every reload until the restart.
#[test]
fn reload_applies_the_log_level_and_names_what_needs_a_restart() {
    let dir = std::env::temp_dir().join(format!("gatehouse-reload-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let gw = format!("127.0.0.1:{port}");
    let config = dir.join("gatehouse.toml");
    let text = format!(
        "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"{gw}\"\n\
[trust]\nsources = [\"127.0.0.0/8\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\n\
[registrar]\nmin_expires_s = 60\n[auth]\nfailures_before_lockout = 5\n[timers]\ntimer_c_ms = 180000\n"
    );
    std::fs::write(&config, &text).expect("write");
    let log = dir.join("gatehouse.log");
    let child = run_logged(&config, &log);
    ping(&gw);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_for = |needle: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "never logged: {needle}\n{}",
                log_text()
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    };
    assert!(!log_text().contains("DEBUG"));
    // Run-time keys only: applied, no restart named.
    std::fs::write(
        &config,
        text.replace("level = \"info\"", "level = \"debug\"")
            .replace("min_expires_s = 60", "min_expires_s = 120")
            .replace("failures_before_lockout = 5", "failures_before_lockout = 3")
            .replace("timer_c_ms = 180000", "timer_c_ms = 90000"),
    )
    .expect("write");
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill");
    };
    hup();
    wait_for("reloaded what=configuration and policy", 1);
    wait_for("log level changed level=debug", 1);
    // A refused request is logged at debug level: now it shows.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let refused = format!(
        "OPTIONS tel:+15551234 SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKtel1\r\nMax-Forwards: 70\r\n\
From: <sip:probe@org.example>;tag=p\r\nTo: <tel:+15551234>\r\nCall-ID: tel-1@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        sock.local_addr().expect("addr")
    );
    sock.send_to(refused.as_bytes(), gw.as_str()).expect("send");
    wait_for("DEBUG", 1);
    assert!(!log_text().contains("restart"), "{}", log_text());
    // Keys that need a restart: each named, in a warning and in the outcome.
    let restart = text
        .replace("level = \"info\"", "level = \"debug\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        + "[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:0\"\n";
    std::fs::write(&config, &restart).expect("write");
    hup();
    wait_for("restart needed for: listen, metrics.listen", 1);
    let t = log_text();
    assert!(
        t.contains("WARN") && t.contains("key=\"listen\"") && t.contains("key=\"metrics.listen\""),
        "{t}"
    );
    // The running listener is unchanged: the gateway still answers where it did.
    ping(&gw);
    terminate(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UDP responder that answers every request 200 (copying the dialog headers).
fn responder() -> std::net::SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut resp = String::from("SIP/2.0 200 OK\r\n");
            for line in text.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
                let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                    resp.push_str(line);
                    resp.push_str("\r\n");
                }
            }
            resp.push_str("Content-Length: 0\r\n\r\n");
            let _ = sock.send_to(resp.as_bytes(), from);
        }
    });
    addr
}

/// OPTIONS to a user of the domain; returns the status line.
fn options_status(gw: &str, n: u32) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let msg = format!(
        "OPTIONS sip:someone@org.example SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKreload{n}\r\nMax-Forwards: 70\r\n\
From: <sip:probe@org.example>;tag=p\r\nTo: <sip:someone@org.example>\r\nCall-ID: reload-{n}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        l = sock.local_addr().expect("addr")
    );
    sock.send_to(msg.as_bytes(), gw).expect("send");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("answer");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn sighup_reloads_a_valid_policy_and_keeps_the_old_one_on_errors() {
    let dir = std::env::temp_dir().join(format!("gatehouse-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"nobody\"\nkind = \"any\"\naction = \"deny\"\ncallers = [\"trusted\"]\n",
    )
    .expect("write");
    let target = responder();
    let port = UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let gw = format!("127.0.0.1:{port}");
    let config = dir.join("gatehouse.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"{gw}\"\n[trust]\nsources = [\"127.0.0.0/8\"]\n\
[tunnels]\npolicy = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[[route]]\ndomain = \"org.example\"\ntarget = \"sip:{target}\"\n",
            policy.display()
        ),
    )
    .expect("write");
    let log = dir.join("gatehouse.log");
    let child = run_logged(&config, &log);
    ping(&gw);
    let mut n = 0;
    let mut status = || {
        n += 1;
        options_status(&gw, n)
    };
    assert_eq!(status(), "SIP/2.0 403 Forbidden", "policy v1 denies");
    let hup = |child: &Child| {
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill");
    };
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"infra\"\nkind = \"any\"\ncallers = [\"trusted\"]\n",
    )
    .expect("write");
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while status() != "SIP/2.0 200 OK" {
        assert!(Instant::now() < deadline, "policy v2 never took effect");
    }
    std::fs::write(&policy, "[[rule]]\nname = = broken\n").expect("write");
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reload refused")
    {
        assert!(Instant::now() < deadline, "no refusal logged");
        std::thread::yield_now();
    }
    assert_eq!(
        status(),
        "SIP/2.0 200 OK",
        "the previous policy stays in force"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("policy.toml:2"),
        "the error names the line: {text}"
    );
    // A log file gets no colour codes, and names every listener (issue 12, item 4).
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI escapes in a file: {text}"
    );
    assert!(
        text.contains(&format!("listening transport=UDP address={gw}"))
            && text.contains("metrics listening (/metrics, /healthz, /readyz) address=127.0.0.1:"),
        "{text}"
    );

    // The configuration itself: a new domain and route take effect on SIGHUP ...
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"infra\"\nkind = \"any\"\ncallers = [\"trusted\"]\n",
    )
    .expect("write");
    let good = std::fs::read_to_string(&config).expect("read");
    let other = |n: u32| {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let msg = format!(
            "OPTIONS sip:someone@other.example SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKother{n}\r\nMax-Forwards: 70\r\n\
From: <sip:probe@org.example>;tag=p\r\nTo: <sip:someone@other.example>\r\nCall-ID: other-{n}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            l = sock.local_addr().expect("addr")
        );
        sock.send_to(msg.as_bytes(), gw.as_str()).expect("send");
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("answer");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(other(1), "SIP/2.0 403 Forbidden (relaying denied)");
    let extended =
        good.replace(
            "domains = [\"org.example\"]",
            "domains = [\"org.example\", \"other.example\"]",
        ) + &format!("[[route]]\ndomain = \"other.example\"\ntarget = \"sip:{target}\"\n");
    std::fs::write(&config, &extended).expect("write");
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 1;
    while {
        n += 1;
        other(n) != "SIP/2.0 200 OK"
    } {
        assert!(Instant::now() < deadline, "the new route never took effect");
    }
    // ... and a broken one is refused with its line while the running one stays.
    std::fs::write(
        &config,
        extended.replacen("[trust]", "[trust]\nbogus_key = 1", 1),
    )
    .expect("write");
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("reload refused")
        .count();
    hup(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("reload refused")
        .count()
        == before
    {
        assert!(Instant::now() < deadline, "no refusal logged");
        std::thread::yield_now();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("gatehouse.toml:") && text.contains("bogus_key"),
        "{text}"
    );
    assert_eq!(
        other(99),
        "SIP/2.0 200 OK",
        "the configuration in force stays"
    );
    terminate(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UDP answerer: 200 (with a To tag and a Contact) to every INVITE.
fn answerer() -> std::net::SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.starts_with("INVITE ") {
                continue;
            }
            let mut resp = String::from("SIP/2.0 200 OK\r\n");
            for line in text.lines() {
                let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                match name.as_str() {
                    "via" | "from" | "call-id" | "cseq" | "record-route" => {
                        resp.push_str(line);
                        resp.push_str("\r\n");
                    }
                    "to" => resp.push_str(&format!("{line};tag=uas\r\n")),
                    _ => {}
                }
            }
            resp.push_str(&format!(
                "Contact: <sip:vpn@{addr}>\r\nContent-Length: 0\r\n\r\n"
            ));
            let _ = sock.send_to(resp.as_bytes(), from);
        }
    });
    addr
}

/// Issue 9, item 7: `kill -9` while tunnels are being set up; every tunnel whose 200 the
/// caller received is in the store of the restarted gateway, established.
#[test]
fn kill_9_under_load_loses_no_tunnel_whose_200_was_relayed() {
    let dir = std::env::temp_dir().join(format!("gatehouse-kill9-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uas = answerer();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
[trust]\nsources = [\"127.0.0.0/8\"]\n[[route]]\ndomain = \"org.example\"\ntarget = \"sip:{uas}\"\ntransport = \"udp\"\n\
[auth]\nstore = \"store.sqlite\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let mut gw = bin()
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let target = format!("127.0.0.1:{port}");
    ping(&target);

    // A caller sending tunnel INVITEs as fast as it can; a receiver counting the 200s.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let rx = sock.try_clone().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (ok_tx, ok_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65535];
        while let Ok(n) = rx.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("SIP/2.0 200 ") && text.contains(" INVITE\r\n") {
                let call_id = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Call-ID: "))
                    .unwrap_or("")
                    .to_owned();
                if ok_tx.send(call_id).is_err() {
                    return;
                }
            }
        }
    });
    let offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=none\r\n";
    let sender = std::thread::spawn(move || {
        for n in 0..2000 {
            let msg = format!(
                "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKkill{n};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:alice@partner.example>;tag=k{n}\r\nTo: <sip:vpn@org.example>\r\n\
Call-ID: kill-{n}@partner.example\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{local}>\r\n\
Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
                offer.len()
            );
            if sock.send_to(msg.as_bytes(), port_addr(port)).is_err() {
                return;
            }
            if n % 50 == 49 {
                std::thread::yield_now();
            }
        }
    });
    // Kill the gateway once 200 tunnels are up, while the rest are still arriving.
    let mut relayed = std::collections::HashSet::new();
    while relayed.len() < 200 {
        relayed.insert(
            ok_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("200s through the gateway"),
        );
    }
    Command::new("kill")
        .args(["-KILL", &gw.id().to_string()])
        .status()
        .unwrap();
    gw.wait().unwrap();
    // 200s already on their way are counted too (the receiver stops after 500 ms of silence).
    while let Ok(call_id) = ok_rx.recv_timeout(Duration::from_secs(5)) {
        relayed.insert(call_id);
    }
    let _ = sender.join();

    let store = gatehouse::store::Store::open(&dir.join("store.sqlite")).unwrap();
    let established: std::collections::HashSet<String> = store
        .tunnels()
        .unwrap()
        .into_iter()
        .filter(|t| t.state == gatehouse::tunnel::TunnelState::Established)
        .map(|t| t.call_id)
        .collect();
    let lost: Vec<&String> = relayed.difference(&established).collect();
    eprintln!(
        "kill -9: {} 200s relayed, {} tunnels established in the store, {} lost",
        relayed.len(),
        established.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "tunnels lost: {lost:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn port_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
