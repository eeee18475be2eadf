//! Several gateways sharing their state in PostgreSQL (issue 11), on a PostgreSQL server the
//! test starts itself ([`crate::postgres`]), and the same store behaviour on both backends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse::store::{BindingRecord, Role, Store, StoreError, StoreWrite};
use gatehouse::tunnel::{Tunnel, TunnelState};

use crate::harness::{wait_until, TempDir};
use crate::postgres::Postgres;

fn tunnel(call_id: &str) -> Tunnel {
    Tunnel {
        call_id: call_id.into(),
        caller_tag: "c".into(),
        callee_tag: Some("e".into()),
        identity: "alice".into(),
        from: "sip:alice@partner.example".into(),
        to: "sip:vpn@org.example".into(),
        prefixes: "2001:db8:456:1::/64".into(),
        pubkey: String::new(),
        pskmth: "scram".into(),
        created_unix: 1_700_000_000,
        state: TunnelState::Established,
        caller: None,
        callee: None,
    }
}

/// Every operation of the store, as the gateway, the CLI and the admin API use them.
fn store_behaviour(s: &mut Store) {
    // Users: added once, never a password, refused twice, disabled, re-keyed, deleted.
    s.add_user(
        "alice",
        b"alice-secret",
        &["sip:alice@partner.example".into()],
        None,
        4096,
    )
    .unwrap();
    assert!(matches!(
        s.add_user("alice", b"x", &[], None, 4096),
        Err(StoreError::Exists(_))
    ));
    assert!(matches!(
        s.add_user("bob", b"x", &["not-an-aor".into()], None, 4096),
        Err(StoreError::Invalid(_))
    ));
    let g0 = s.users_generation().unwrap();
    s.set_enabled("alice", false).unwrap();
    assert!(
        s.users_generation().unwrap() > g0,
        "a change moves the generation"
    );
    let c = s.credential("alice").unwrap().unwrap();
    assert!(!c.enabled);
    assert_eq!(c.aors, ["sip:alice@partner.example"]);
    s.set_password("alice", b"new-secret", 4096).unwrap();
    assert_ne!(s.credential("alice").unwrap().unwrap().verifier, c.verifier);
    assert!(matches!(
        s.set_enabled("nobody", true),
        Err(StoreError::NoUser(_))
    ));
    assert_eq!(s.list_users().unwrap().len(), 1);
    assert_eq!(s.credentials().unwrap().len(), 1);
    // Keys: created once, then the same.
    let k = s.key("dialog-mac").unwrap();
    assert_eq!(s.key("dialog-mac").unwrap(), k);
    assert_ne!(s.key("fake-verifier").unwrap(), k);
    // Bindings and tunnels through the core's writes; expired bindings leave.
    let binding = |contact: &str, expires_at: u64| BindingRecord {
        aor: "sip:vpn@org.example".into(),
        contact: contact.into(),
        transport: "udp".into(),
        remote: "192.0.2.7:5060".into(),
        expires_at,
        instance: Some("<urn:uuid:1>".into()),
        identity: "vpn".into(),
        reg_id: Some(1),
        holder: Some("sip:192.0.2.11:5060".into()),
    };
    s.apply(&[
        StoreWrite::SaveBinding(binding("sip:a@192.0.2.7", 2000)),
        StoreWrite::SaveBinding(binding("sip:b@192.0.2.7", 500)),
        StoreWrite::SaveBinding(binding("sip:a@192.0.2.7", 3000)),
        StoreWrite::SaveTunnel(Box::new(tunnel("t1"))),
        StoreWrite::SaveTunnel(Box::new(tunnel("t2"))),
        StoreWrite::DeleteTunnel {
            call_id: "t2".into(),
            caller_tag: "c".into(),
        },
    ])
    .unwrap();
    let snap = s.snapshot(1000).unwrap();
    assert_eq!(snap.bindings, vec![binding("sip:a@192.0.2.7", 3000)]);
    // One AOR's bindings, as a gateway reloads them when another announces a change.
    assert_eq!(
        s.bindings_of("sip:vpn@org.example", 1000).unwrap(),
        vec![binding("sip:a@192.0.2.7", 3000)]
    );
    assert!(s
        .bindings_of("sip:vpn@org.example", 3000)
        .unwrap()
        .is_empty());
    assert!(s
        .bindings_of("sip:other@org.example", 1000)
        .unwrap()
        .is_empty());
    assert_eq!(snap.tunnels, vec![tunnel("t1")]);
    assert_eq!(snap.credentials.len(), 1);
    s.apply(&[StoreWrite::RemoveBinding {
        aor: "sip:vpn@org.example".into(),
        contact: "sip:a@192.0.2.7".into(),
    }])
    .unwrap();
    assert!(s.live_bindings(1000).unwrap().is_empty());
    // Tunnel pages in Call-ID order from a cursor, one tunnel by Call-ID; a route set towards
    // a party survives the round trip.
    let mut routed = tunnel("t0");
    routed.caller = Some(gatehouse::tunnel::Party {
        contact: "sip:alice@192.0.2.1:5062".into(),
        transport: gatehouse::flow::Transport::Udp,
        addr: "192.0.2.10:5060".parse().unwrap(),
        aor: "sip:alice@partner.example".into(),
        tag: "c".into(),
        route: "<sip:192.0.2.10;lr;ftag=c>".into(),
    });
    s.apply(&[
        StoreWrite::SaveTunnel(Box::new(tunnel("t3"))),
        StoreWrite::SaveTunnel(Box::new(routed.clone())),
    ])
    .unwrap();
    let (page, next) = s.tunnel_page(None, 2).unwrap();
    let ids: Vec<&str> = page.iter().map(|t| t.call_id.as_str()).collect();
    assert_eq!((ids, next.as_deref()), (vec!["t0", "t1"], Some("t1")));
    let (page, next) = s.tunnel_page(Some("t1"), 2).unwrap();
    assert_eq!((page, next), (vec![tunnel("t3")], None));
    assert_eq!(s.tunnel("t0").unwrap(), Some(routed));
    assert_eq!(s.tunnel("t2").unwrap(), None);
    // Admins.
    s.add_admin("root", b"root-secret", Role::Admin).unwrap();
    assert_eq!(
        s.admins().unwrap(),
        vec![("root".into(), Role::Admin, true)]
    );
    assert_eq!(s.admin_credential("root").unwrap().unwrap().1, Role::Admin);
    s.delete_admin("root").unwrap();
    assert!(s.admin_credential("root").unwrap().is_none());
    s.delete_user("alice").unwrap();
    assert!(s.credential("alice").unwrap().is_none());
}

/// Tunnel limits hold across gateways without races: four connections (four gateways)
/// propose 25 tunnels each for one identity at once, each in its own transaction with the
/// tunnel's row and its reservation; with a limit of 7 per identity exactly 7 are granted,
/// every refused row is gone, and the counters match the rows. Ending a tunnel frees a place.
#[test]
fn cluster_tunnel_limits_hold_under_concurrent_set_ups() {
    let pg = Postgres::start();
    let url = pg.url();
    let reserve = |call_id: &str| StoreWrite::ReserveTunnel {
        call_id: call_id.into(),
        caller_tag: "c".into(),
        identity: "alice".into(),
        to: "sip:vpn@org.example".into(),
        max_total: Some(1000),
        max_per_identity: Some(7),
        max_per_target: None,
        wait_until_unix: u64::MAX / 4,
    };
    let granted: usize = std::thread::scope(|s| {
        let gateways: Vec<_> = (0..4)
            .map(|g| {
                let url = url.clone();
                s.spawn(move || {
                    let mut store = Store::open(Path::new(&url)).unwrap();
                    let mut granted = 0;
                    for n in 0..25 {
                        let id = format!("g{g}-{n}");
                        let applied = store
                            .apply(&[StoreWrite::SaveTunnel(Box::new(tunnel(&id))), reserve(&id)])
                            .unwrap();
                        assert_eq!(applied.reservations.len(), 1);
                        if applied.reservations[0].refused.is_none() {
                            granted += 1;
                        } else {
                            assert_eq!(
                                applied.reservations[0].refused,
                                Some(gatehouse_policy::Denied::LimitIdentity)
                            );
                        }
                    }
                    granted
                })
            })
            .collect();
        gateways.into_iter().map(|g| g.join().unwrap()).sum()
    });
    assert_eq!(granted, 7);
    let store = Store::open(Path::new(&url)).unwrap();
    assert_eq!(store.tunnels().unwrap().len(), 7, "refused rows are gone");
    let counts = pg.sql("SELECT kind || '=' || n FROM tunnel_counts ORDER BY kind");
    assert_eq!(counts.trim(), "identity=7\ntarget=7\ntotal=7", "{counts}");
    // One ends: the next set-up gets its place, the one after does not.
    let mut store = store;
    let gone = store.tunnels().unwrap()[0].call_id.clone();
    store
        .apply(&[StoreWrite::DeleteTunnel {
            call_id: gone,
            caller_tag: "c".into(),
        }])
        .unwrap();
    for (id, ok) in [("late-1", true), ("late-2", false)] {
        let applied = store
            .apply(&[StoreWrite::SaveTunnel(Box::new(tunnel(id))), reserve(id)])
            .unwrap();
        assert_eq!(applied.reservations[0].refused.is_none(), ok, "{id}");
    }
}

#[test]
fn the_same_store_behaviour_on_sqlite_and_postgres() {
    let dir = TempDir::new("both-backends");
    let mut sqlite = Store::open(&dir.path().join("store.sqlite")).unwrap();
    assert_eq!(sqlite.backend(), "sqlite");
    store_behaviour(&mut sqlite);
    let pg = Postgres::start();
    let url = PathBuf::from(pg.url());
    let mut postgres = Store::open(&url).unwrap();
    assert_eq!(postgres.backend(), "postgres");
    store_behaviour(&mut postgres);
    // A second connection migrates nothing and sees the same keys.
    let again = Store::open(&url).unwrap();
    assert_eq!(
        again.key("dialog-mac").unwrap(),
        postgres.key("dialog-mac").unwrap()
    );
}

fn users_at(metrics: std::net::SocketAddr) -> Option<u32> {
    crate::operations::http_get(metrics, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse_auth_users "))
        .and_then(|v| v.trim().parse::<u32>().ok())
}

fn cli_user_add(store: &Path, name: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(crate::harness::bin("gatehouse"))
        .args([
            "user",
            "add",
            name,
            "--aor",
            "sip:alice@partner.example",
            "--store",
        ])
        .arg(store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "gatehouse user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two gateways on one PostgreSQL database: both start from the same users and keys; a user
/// added with the CLI through the database reaches both within a second (the users
/// generation, moved by triggers) and authenticates at either; a tunnel's row written by one
/// is in the database for the other.
#[test]
fn gateways_share_users_and_keys_through_postgres() {
    use crate::client::SipClient;
    use crate::sasl::{authenticated_invite, setup_on, Call};
    use gatehouse::flow::Transport;
    use gatehouse_auth::scram::ScramClient;

    let pg = Postgres::start();
    let url = PathBuf::from(pg.url());
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let a = setup_on(Some(&url), extra, |_| {});
    let b = setup_on(Some(&url), extra, |_| {});
    let (ma, mb) = (a.gw.metrics.unwrap(), b.gw.metrics.unwrap());
    wait_until(
        || users_at(ma) == Some(2) && users_at(mb) == Some(2),
        "both gateways' start snapshots (alice, vpn)",
    );
    let added = Instant::now();
    cli_user_add(&url, "carol", "carol-secret");
    wait_until(
        || users_at(ma) == Some(3) && users_at(mb) == Some(3),
        "carol in both snapshots",
    );
    let seen = added.elapsed();
    eprintln!("a user added through PostgreSQL reached both gateways after {seen:?}");
    assert!(seen < Duration::from_secs(1), "took {seen:?}");
    for s in [&a, &b] {
        let mut client = SipClient::udp(s.gw.addr(Transport::Udp));
        let mut scram = ScramClient::new("carol", b"carol-secret", None);
        let ok = authenticated_invite(&mut client, &mut scram, &mut Call::new("carol"));
        assert_eq!(ok.status(), Some(200), "{ok:?}");
    }
    // The other gateway's admin API authenticates its admin from the database and lists the
    // user the CLI added (the store calls run off the gateway's loop).
    let mut admin = gatehouse::admin::client::AdminClient::new(
        b.gw.admin.expect("admin listener"),
        "root",
        "root-secret",
    );
    let users = admin.request("GET", "/api/v1/users", None).unwrap();
    assert_eq!(users.status, 200, "{}", users.body);
    assert!(users.body.contains("\"carol\""), "{}", users.body);
    // One dialog key for the cluster: a Record-Route one gateway signs, another verifies.
    let store = Store::open(&url).unwrap();
    assert_eq!(
        store.key("dialog-mac").unwrap(),
        Store::open(&url).unwrap().key("dialog-mac").unwrap()
    );

    // A lockout earned at one gateway holds at the other: five wrong guesses for carol at A
    // (the default `failures_before_lockout`), then carol's right password at B is refused.
    let lockouts = |m| {
        crate::operations::http_get(m, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix("gatehouse_auth_lockouts_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut guesser = SipClient::udp(a.gw.addr(Transport::Udp));
    for _ in 0..5 {
        let mut guess = ScramClient::new("carol", b"not-her-password", None);
        let r = authenticated_invite(&mut guesser, &mut guess, &mut Call::new("carol"));
        assert_eq!(r.status(), Some(403), "{r:?}");
    }
    let shared = Instant::now();
    wait_until(|| lockouts(mb) >= 1, "the lockout at the other gateway");
    eprintln!(
        "five failures at one gateway locked the other after {:?}",
        shared.elapsed()
    );
    let mut client = SipClient::udp(b.gw.addr(Transport::Udp));
    let scram = ScramClient::new("carol", b"carol-secret", None);
    let mut call = Call::new("carol");
    client.send(&call.invite(&client, None));
    assert_eq!(client.recv_final_or_challenge().status(), Some(407));
    let first = gatehouse_auth::SaslParams {
        realm: Some("org.example".into()),
        mech: Some("SCRAM-SHA-256".into()),
        c2s: Some(scram.client_first()),
        ..gatehouse_auth::SaslParams::default()
    };
    client.send(&call.invite(&client, Some(&first)));
    let r = client.recv_final_or_challenge();
    assert_eq!(r.status(), Some(403), "locked at B too: {r:?}");
}

/// TLS to the database: with `sslmode=require&sslrootcert=CA` the store connects over TLS
/// (PostgreSQL says so for the session) to a server that accepts nothing else; a CA that did not
/// sign the server's certificate is refused, as are TLS without a CA to verify with and
/// libpq's `prefer` (TLS that silently falls back).
#[test]
fn the_store_connects_to_postgres_over_verified_tls() {
    let (pg, ca) = Postgres::start_tls();
    let dir = TempDir::new("pg-tls");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let url = |q: &str| PathBuf::from(format!("{}?{q}", pg.url()));
    // Plain TCP is refused by the server (hostssl only).
    assert!(Store::open(&PathBuf::from(pg.url())).is_err());
    let store = Store::open(&url(&format!(
        "sslmode=require&sslrootcert={}",
        ca_file.display()
    )))
    .expect("TLS connection");
    assert_eq!(store.key("dialog-mac").unwrap().len(), 32);
    // Another CA: the handshake fails.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let refused = Store::open(&url(&format!(
        "sslmode=require&sslrootcert={}",
        other_file.display()
    )));
    assert!(refused.is_err(), "a certificate the CA did not sign");
    for (q, says) in [
        ("sslmode=require", "needs sslrootcert"),
        ("sslmode=prefer", "sslmode=prefer"),
    ] {
        let e = Store::open(&url(q)).unwrap_err().to_string();
        assert!(e.contains(says), "{q}: {e}");
    }
}

/// A notification lost while the gateway's listener was disconnected: a tunnel row deleted
/// without `NOTIFY` (the trigger disabled for the statement) stays in the gateway's table until
/// the listener connects again, which resynchronises the table with the database.
#[test]
fn a_reconnected_listener_resynchronises_the_tunnel_table() {
    use crate::sasl::setup_on;
    use gatehouse::flow::Transport;

    let pg = Postgres::start();
    let url = PathBuf::from(pg.url());
    // The answerer on loopback is inside (the scram PSK may go to it).
    let s = setup_on(
        Some(&url),
        "internal_networks = [\"127.0.0.0/8\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        |_| {},
    );
    let metrics = s.gw.metrics.unwrap();
    let active = || {
        crate::operations::http_get(metrics, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix("gatehouse_tunnel_active "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // One tunnel, held (no BYE), through the project's load client.
    let report = wgsip::load::run(&wgsip::load::LoadOptions {
        gateway: s.gw.addr(Transport::Udp),
        local: "127.0.0.1:0".parse().unwrap(),
        target: "sip:vpn@org.example".into(),
        username: "alice".into(),
        password: "alice-secret".into(),
        from: "sip:alice@partner.example".into(),
        rate: 10,
        count: 1,
        concurrency: 1,
        timeout: Duration::from_secs(10),
        progress: false,
        hold: true,
        tls: None,
        crossover: None,
    })
    .expect("load run");
    assert_eq!(report.succeeded, 1, "{}", report.summary());
    wait_until(|| established_in(&url) == 1, "the tunnel's row");
    wait_until(|| active() == Some(1), "the tunnel in the gateway's table");
    let created_unix = Store::open(&url).unwrap().tunnels().unwrap()[0].created_unix;
    // Ended elsewhere, unannounced; the table keeps it (nothing told the gateway).
    pg.sql(
        "ALTER TABLE tunnels DISABLE TRIGGER tunnel_gone; DELETE FROM tunnels; \
         ALTER TABLE tunnels ENABLE TRIGGER tunnel_gone;",
    );
    assert_eq!(active(), Some(1));
    // A resynchronisation leaves tunnels younger than a second before its read alone (their
    // rows may still be on the way): the condition is the tunnel's age, not a pause.
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    wait_until(
        || unix() >= created_unix + 2,
        "the tunnel older than the resynchronisation margin",
    );
    // The listener's connection breaks; it connects again and the gateway catches up.
    let ended = pg.sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    );
    assert_eq!(ended.trim(), "1", "the gateway's listener");
    wait_until(|| active() == Some(0), "the table resynchronised");
}

/// Established tunnels in the database, through a connection of the test's own.
fn established_in(url: &Path) -> usize {
    Store::open(url)
        .map(|s| {
            s.tunnels()
                .map(|t| {
                    t.iter()
                        .filter(|t| t.state == TunnelState::Established)
                        .count()
                })
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// PostgreSQL stops while calls run: 300 SIPp tunnel calls over five seconds (each leaves an
/// established tunnel to persist) all complete with the database down — the storage worker acknowledges their
/// writes from its in-memory queue — nothing reaches the database meanwhile, and once it is
/// back the worker connects again and every tunnel lands.
#[test]
fn calls_go_on_while_postgres_is_down_and_the_writes_land_after() {
    use crate::harness::{free_port, tool, Gateway};
    use crate::sipp::{config_for, run_through, successful, tail, Call};

    if !tool("sipp") {
        return;
    }
    let _load = crate::harness::load_test();
    let pg = Postgres::start();
    let url = PathBuf::from(pg.url());
    drop(Store::open(&url).expect("migrate"));
    let extra = format!(
        "[auth]\nstore = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        pg.url()
    );
    let call = Call {
        uac: "uac_hold.xml",
        uas: "uas_hold.xml",
        calls: 300,
        rate: 60,
        extra_config: &extra,
        ..Call::default()
    };
    let uas_port = free_port();
    let gw = Gateway::start(&config_for(&call, uas_port));
    crate::storage::assert_answers(&gw);

    pg.stop();
    let down = Instant::now();
    let (uac, _) = run_through(&gw, uas_port, &call);
    assert_eq!(successful(&uac), 300, "{}", tail(&uac));
    assert!(
        pg.pid().is_none(),
        "the database stayed down during the calls"
    );
    // The gateway says so: still ready (it serves calls), the store unavailable.
    let metrics = gw.metrics.expect("metrics listener");
    let readyz = || crate::operations::http_get(metrics, "/readyz");
    let available = || {
        crate::operations::http_get(metrics, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix("gatehouse_store_available "))
            .map(|v| v.trim() == "1")
    };
    wait_until(|| available() == Some(false), "gatehouse_store_available 0");
    let (status, body) = readyz();
    assert_eq!(status, 200);
    assert!(body.contains("store unavailable"), "{body}");
    eprintln!(
        "300 tunnel calls with PostgreSQL down for {:?}",
        down.elapsed()
    );
    pg.run();
    // Each probe opens a database connection: probe every 200 ms (not every 10 ms, which
    // competes with the gateway's own reconnect), and allow for PostgreSQL's restart under
    // the whole suite's load; say how far the writes got if they never all land.
    let deadline = Instant::now() + 3 * crate::harness::WAIT;
    let mut landed = established_in(&url);
    while landed < 300 {
        assert!(
            Instant::now() < deadline,
            "only {landed} of the 300 queued tunnels written once PostgreSQL is back; store available: {:?}",
            available()
        );
        std::thread::park_timeout(Duration::from_millis(200));
        landed = established_in(&url);
    }
    assert_eq!(landed, 300);
    wait_until(|| available() == Some(true), "gatehouse_store_available 1");
    assert_eq!(readyz().1, "ready\n");
    gw.stop();
}
