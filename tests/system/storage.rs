//! Storage off the SIP loop (issue 10): another connection holding the store's write lock
//! stops no call, and the writes land once it lets go.

use std::sync::mpsc;
use std::time::Duration;

use gatehouse::store::{journal, Store};

use gatehouse_sip::flow::Transport;

use crate::client::SipClient;
use crate::harness::{free_port, tool, wait_until, Gateway, TempDir};
use crate::sipp::{config_for, run_through, successful, tail, Call};

/// Established tunnels in the store, read through a connection of its own.
fn established(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).expect("open store");
    c.query_row(
        "SELECT count(*) FROM tunnels WHERE state = 'established'",
        [],
        |r| r.get(0),
    )
    .expect("count tunnels")
}

/// Asserts that the gateway answers an OPTIONS to itself over UDP (it has started: its store
/// is open).
pub fn assert_answers(gw: &Gateway) {
    let mut ping = SipClient::udp(gw.addr(Transport::Udp));
    ping.send(&format!(
        "OPTIONS sip:org.example SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKready\r\nMax-Forwards: 70\r\n\
From: <sip:probe@org.example>;tag=p\r\nTo: <sip:org.example>\r\nCall-ID: ready@test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        l = ping.local
    ));
    assert_eq!(ping.recv().status(), Some(200), "the gateway runs");
}

/// Holds the write lock of `path` (`BEGIN IMMEDIATE`) until told to let go; says when it has it.
fn hold_write_lock(
    path: std::path::PathBuf,
) -> (
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (locked_tx, locked) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&path).expect("open store");
        c.execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        c.execute(
            "INSERT INTO keys (name, value) VALUES ('test-lock', x'00')",
            [],
        )
        .expect("write under the lock");
        locked_tx.send(()).expect("report");
        // Bounded: a test that never releases still ends.
        let _ = release_rx.recv_timeout(Duration::from_secs(120));
        c.execute_batch("ROLLBACK").expect("let go");
    });
    (locked, release, t)
}

/// 500 SIPp tunnel calls (WireGuard offers, held open: each leaves an established tunnel to
/// persist) run while another connection holds SQLite's write lock the whole time. Every call
/// completes while the lock is still held, so no 200 waited for the store; nothing is in the
/// store yet; once the lock goes, all 500 tunnels land (from the journal the worker kept).
#[test]
fn calls_go_on_while_another_connection_holds_the_write_lock() {
    if !tool("sipp") {
        return;
    }
    let _load = crate::harness::load_test();
    let dir = TempDir::new("write-lock");
    let path = dir.path().join("store.sqlite");
    drop(Store::open(&path).expect("create store"));
    let extra = format!("[auth]\nstore = \"{}\"\n", path.display());
    let call = Call {
        uac: "uac_hold.xml",
        uas: "uas_hold.xml",
        calls: 500,
        rate: 100,
        extra_config: &extra,
        ..Call::default()
    };
    let uas_port = free_port();
    let gw = Gateway::start(&config_for(&call, uas_port));
    // The gateway has opened its store once it answers (before that the lock would stop its
    // start, not its calls).
    assert_answers(&gw);

    let (locked, release, holder) = hold_write_lock(path.clone());
    locked
        .recv_timeout(Duration::from_secs(10))
        .expect("the lock is taken");
    let (uac, _) = run_through(&gw, uas_port, &call);
    assert_eq!(successful(&uac), 500, "{}", tail(&uac));
    // Still locked: nothing committed, everything journaled.
    assert_eq!(established(&path), 0, "no commit can have passed the lock");
    let journal = journal::path_for(&path);
    let lines = std::fs::read_to_string(&journal)
        .expect("the worker journaled the writes")
        .lines()
        .count();
    assert!(lines >= 500, "journal holds the writes: {lines} lines");

    release.send(()).expect("release");
    holder.join().expect("lock holder");
    wait_until(
        || established(&path) == 500,
        "all 500 tunnels committed after the lock went",
    );
    wait_until(
        || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0) == 0,
        "the journal emptied after the commit",
    );
    gw.stop();
}

/// A journal a previous run left behind (the lock was still held when it stopped) is applied
/// at the next start, once, in order.
#[test]
fn a_journal_left_behind_is_applied_at_start() {
    let dir = TempDir::new("journal-replay");
    let path = dir.path().join("store.sqlite");
    let mut store = Store::open(&path).expect("create store");
    let binding = |contact: &str| gatehouse::store::BindingRecord {
        aor: "sip:vpn@org.example".into(),
        contact: contact.into(),
        transport: "udp".into(),
        remote: "192.0.2.7:5060".into(),
        expires_at: u64::MAX / 4,
        instance: None,
        identity: "vpn".into(),
        reg_id: None,
        holder: None,
    };
    let mut j = journal::Journal::new(journal::path_for(&path));
    j.append(&[
        gatehouse::store::StoreWrite::SaveBinding(binding("sip:a@192.0.2.7")),
        gatehouse::store::StoreWrite::SaveBinding(binding("sip:b@192.0.2.7")),
        gatehouse::store::StoreWrite::RemoveBinding {
            aor: "sip:vpn@org.example".into(),
            contact: "sip:a@192.0.2.7".into(),
        },
    ])
    .expect("append");
    // A torn last line (the process died mid-append) is skipped.
    std::fs::OpenOptions::new()
        .append(true)
        .open(journal::path_for(&path))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"SaveBind"))
        .expect("torn line");
    let snap = store.snapshot(0).expect("snapshot");
    let contacts: Vec<_> = snap.bindings.iter().map(|b| b.contact.as_str()).collect();
    assert_eq!(contacts, ["sip:b@192.0.2.7"]);
    // Applied once: the journal is empty now, a second start sees the same.
    assert_eq!(
        std::fs::metadata(journal::path_for(&path)).unwrap().len(),
        0
    );
    assert_eq!(store.snapshot(0).expect("snapshot").bindings.len(), 1);
}

/// A user added by another process (as `gatehouse user add` does) reaches the running
/// gateway's credential snapshot without a restart, and authenticates.
#[test]
fn a_user_added_elsewhere_authenticates_without_a_restart() {
    use crate::client::SipClient;
    use crate::operations::http_get;
    use crate::sasl::{authenticated_invite, setup, Call};
    use gatehouse_auth::scram::ScramClient;

    let s = setup("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let metrics = s.gw.metrics.expect("metrics listener");
    let users = || {
        http_get(metrics, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix("gatehouse_auth_users "))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    wait_until(|| users() == Some(2), "the start snapshot (alice, vpn)");
    let added = std::time::Instant::now();
    Store::open(&s.dir.path().join("store.sqlite"))
        .expect("a second connection")
        .add_user(
            "carol",
            b"carol-secret",
            &["sip:alice@partner.example".into()],
            None,
            4096,
        )
        .expect("add carol");
    wait_until(|| users() == Some(3), "carol in the gateway's snapshot");
    eprintln!("credential change seen after {:?}", added.elapsed());
    let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
    let mut scram = ScramClient::new("carol", b"carol-secret", None);
    let ok = authenticated_invite(&mut client, &mut scram, &mut Call::new("carol"));
    assert_eq!(ok.status(), Some(200), "{ok:?}");
}
