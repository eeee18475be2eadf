//! Three gateway processes on their own loopback addresses behind Kamailio's dispatcher
//! (`deploy/cluster/kamailio.cfg`, unchanged), sharing a PostgreSQL database the test starts:
//! the project's SASL load client drives complete tunnel set-ups through the balancer, one
//! gateway dies by `kill -9` in the middle, and the survivors carry on (issue 11).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gatehouse::admin::client::AdminClient;
use gatehouse::store::Store;
use wgsip::load::{run, LoadOptions, LoadReport};

use crate::harness::{bin, free_port, repo, tool, wait_or_explain, wait_until, Proc, TempDir};
use crate::postgres::Postgres;
use crate::sasl::{seed, Uas};

/// The balancer's address; the gateways are .11, .12, .13 (all of 127/8 is loopback), each
/// on the same SIP and metrics ports (free on 127.0.0.1 when the test starts).
const BALANCER: &str = "127.0.0.10";

/// A `gatehouse run` process. The load client is one caller at one address sending about
/// 400 requests a second, so its per-source rate limit is raised: what the balancer relays is
/// counted per client, and the default (100 a second) would ban it — the balancer itself never.
struct Node {
    proc: Proc,
    sip: SocketAddr,
    metrics: SocketAddr,
    admin: SocketAddr,
}

impl Node {
    fn start(dir: &Path, n: u8, ports: (u16, u16, u16), store: &str, uas: SocketAddr) -> Node {
        let ip = format!("127.0.0.{}", 10 + n);
        let route =
            format!("[[route]]\naor = \"sip:vpn@org.example\"\ntarget = \"sip:vpn@{uas}\"\n");
        Node::start_at(dir, n, &ip, ports, store, &route)
    }

    /// Gateway `n` on address `ip`, announcing itself to the others as `sip:ip:port`
    /// (`[cluster] peer_uri`), with `extra` configuration.
    fn start_at(
        dir: &Path,
        n: u8,
        ip: &str,
        ports: (u16, u16, u16),
        store: &str,
        extra: &str,
    ) -> Node {
        let sip: SocketAddr = format!("{ip}:{}", ports.0).parse().unwrap();
        // Operators' listeners on loopback (plain HTTP is refused elsewhere).
        let metrics: SocketAddr = format!("127.0.0.{}:{}", 10 + n, ports.1).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.{}:{}", 10 + n, ports.2).parse().unwrap();
        let config = dir.join(format!("gateway{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"{sip}\"\n\
[auth]\nstore = \"{store}\"\nmechanisms = [\"SCRAM-SHA-256-PLUS\", \"SCRAM-SHA-256\"]\n\
[tunnels]\npolicy = \"policy.toml\"\ninternal_networks = [\"127.0.0.0/8\", \"198.51.100.0/24\", \"203.0.113.0/24\"]\n\
[cluster]\nbalancers = [\"{BALANCER}\"]\npeer_uri = \"sip:{sip}\"\n\
[metrics]\nlisten = \"{metrics}\"\n[admin]\nlisten = \"{admin}\"\n\
[rate_limit]\nrequests = 5000\n{extra}"
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            &format!("gateway{n}"),
            Command::new(bin("gatehouse"))
                .args(["run", "--config"])
                .arg(&config),
            dir,
        );
        let mut node = Node {
            proc,
            sip,
            metrics,
            admin,
        };
        wait_until(
            || {
                node.proc.assert_running();
                TcpStream::connect_timeout(&node.metrics, Duration::from_millis(200)).is_ok()
            },
            &format!("gateway {n} serving metrics at {metrics}"),
        );
        node
    }

    /// The sum of a metric's series whose line contains `filter` (`None` when the gateway
    /// does not answer).
    fn metric(&self, name: &str, filter: &str) -> Option<u64> {
        let (status, body) = crate::operations::http_get(self.metrics, "/metrics");
        (status == 200).then(|| {
            body.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                        && l.contains(filter)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        })
    }

    /// Successful SASL exchanges so far.
    fn successes(&self) -> Option<u64> {
        self.metric("gatehouse_auth_attempts_total", "outcome=\"success\"")
    }

    /// Tunnels in this gateway's own table.
    fn tunnels(&self) -> Option<u64> {
        self.metric("gatehouse_tunnel_active", "")
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(self.admin, "root", "root-secret")
    }

    fn kill9(&mut self) {
        let status = Command::new("kill")
            .args(["-9", &self.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.proc.wait_or_end(Duration::from_secs(10));
    }
}

/// Kamailio, ended with SIGTERM so that its main process ends its children too (SIGKILL
/// would leave them running, probing and holding the port).
struct Balancer(Proc);

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.pid().to_string()).status();
        let _ = self.0.wait_or_end(Duration::from_secs(10));
    }
}

/// Kamailio with the shipped configuration; its own runtime folder.
fn balancer(dir: &Path, port: u16, nodes: &[&Node]) -> Balancer {
    let list = dir.join("dispatcher.list");
    let lines: String = nodes.iter().map(|n| format!("1 sip:{}\n", n.sip)).collect();
    std::fs::write(&list, lines).unwrap();
    let run_dir = dir.join("kamailio");
    std::fs::create_dir_all(&run_dir).unwrap();
    let cfg: PathBuf = repo().join("deploy/cluster/kamailio.cfg");
    let mut kamailio = Proc::spawn(
        "kamailio",
        Command::new("kamailio")
            .arg("-f")
            .arg(&cfg)
            .args(["-DD", "-E", "-n", "2", "-m", "64", "-M", "8"])
            .args(["-l", &format!("udp:{BALANCER}:{port}")])
            .arg("-A")
            .arg(format!("DISPATCHER_LIST=\"{}\"", list.display()))
            .args(["-A", "PING_INTERVAL=1", "-A", "FR_TIMER_MS=1000"])
            .arg("-P")
            .arg(run_dir.join("kamailio.pid"))
            .arg("-Y")
            .arg(&run_dir),
        dir,
    );
    let local = format!("0A00007F:{port:04X}");
    wait_until(
        || {
            kamailio.assert_running();
            std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
            })
        },
        "kamailio listening",
    );
    Balancer(kamailio)
}

fn load(port: u16, count: u32, rate: u32) -> LoadOptions {
    held(port, count, rate, None)
}

/// Set-ups from `local` (any port when `None`) that stay up when `local` is given.
fn held(port: u16, count: u32, rate: u32, local: Option<u16>) -> LoadOptions {
    LoadOptions {
        gateway: format!("{BALANCER}:{port}").parse().unwrap(),
        local: SocketAddr::from(([127, 0, 0, 1], local.unwrap_or(0))),
        target: "sip:vpn@org.example".into(),
        username: "alice".into(),
        password: "alice-secret".into(),
        from: "sip:alice@partner.example".into(),
        rate,
        count,
        concurrency: 20,
        timeout: Duration::from_secs(10),
        progress: false,
        hold: local.is_some(),
        tls: None,
        crossover: None,
    }
}

/// Set-ups through the balancer spread over all three gateways and succeed; `kill -9` of one
/// in the middle of a run costs at most the set-ups in flight on it (the load client's
/// concurrency bounds them), every other set-up succeeds on the survivors, and the dispatcher's
/// probing takes the dead gateway out.
#[test]
fn three_gateways_behind_kamailio_dispatcher_survive_kill_9() {
    if !tool("kamailio") {
        return;
    }
    let _load = crate::harness::load_test();
    let pg = Postgres::start();
    let url = pg.url();
    seed(Path::new(&url));
    let dir = TempDir::new("dispatcher");
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rule]]\nname = \"partners\"\nkind = \"any\"\ncallers = [\"*@partner.example\"]\n",
    )
    .unwrap();
    let uas = Uas::start();
    let ports = (free_port(), free_port(), free_port());
    let mut nodes: Vec<Node> = (1..=3)
        .map(|n| Node::start(dir.path(), n, ports, &url, uas.addr))
        .collect();
    let port = free_port();
    let kamailio = balancer(dir.path(), port, &nodes.iter().collect::<Vec<_>>());
    // Spread: 90 set-ups, every one succeeds, every gateway served some.
    let report = run(&load(port, 90, 60)).expect("load run");
    assert_eq!(
        report.succeeded,
        90,
        "{}\nkamailio:\n{}",
        report.summary(),
        kamailio.0.log_text()
    );
    let served = || -> Vec<u64> { nodes.iter().map(|n| n.successes().unwrap()).collect() };
    // (The metrics follow the core at the gateway's next tick.)
    wait_until(
        || served().iter().sum::<u64>() == 90,
        "90 successes in the gateways' metrics",
    );
    let served = served();
    eprintln!("set-ups per gateway through the dispatcher: {served:?}");
    assert!(served.iter().all(|&s| s > 0), "{served:?}");

    // Tunnels held on every gateway: the caller is at a port of the test's own choosing, which
    // the test takes over afterwards to see the gateways' BYEs arrive through the balancer.
    let caller_port = free_port();
    let report = run(&held(port, 30, 30, Some(caller_port))).expect("load run");
    assert_eq!(report.succeeded, 30, "{}", report.summary());
    let caller = std::net::UdpSocket::bind(("127.0.0.1", caller_port)).unwrap();
    let held = || {
        nodes
            .iter()
            .map(|n| n.tunnels().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    wait_until(
        || held().iter().sum::<u64>() == 30,
        "the 30 held tunnels in the gateways' metrics",
    );
    assert!(
        held().iter().all(|&t| t > 0),
        "held on every gateway: {:?}",
        held()
    );
    let on_dead = nodes[1].tunnels().unwrap();

    // A user added through the first gateway's admin API authenticates at the third within a
    // second (NOTIFY gatehouse_users), with set-ups sent to it directly.
    let r = nodes[0]
        .admin()
        .request(
            "POST",
            "/api/v1/users",
            Some(&serde_json::json!({
                "username": "bob",
                "password": "bob-secret",
                "aors": ["sip:bob@partner.example"]
            })),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let added = std::time::Instant::now();
    let bob = LoadOptions {
        gateway: nodes[2].sip,
        username: "bob".into(),
        password: "bob-secret".into(),
        from: "sip:bob@partner.example".into(),
        ..load(port, 1, 100)
    };
    while run(&bob).expect("load run").succeeded == 0 {
        assert!(
            added.elapsed() < Duration::from_secs(1),
            "bob not known at the third gateway a second after"
        );
    }
    eprintln!(
        "a user added through one gateway's admin API authenticated at another after {:?}",
        added.elapsed()
    );

    // Failover: gateway 2 dies in the middle of a run.
    let before = nodes[1].successes().unwrap();
    let count = 300;
    let runner = std::thread::spawn(move || run(&load(port, count, 60)).expect("load run"));
    wait_until(
        || nodes[1].successes().is_some_and(|s| s >= before + 15),
        "gateway 2 serving the second run",
    );
    nodes[1].kill9();
    let report: LoadReport = runner.join().unwrap();
    eprintln!(
        "kill -9 of one of three gateways mid-run: {}",
        report.summary()
    );
    let in_flight = load(port, 0, 0).concurrency as u32;
    assert!(
        report.failed <= in_flight,
        "at most the set-ups in flight on the dead gateway fail: {}",
        report.summary()
    );
    assert_eq!(report.succeeded + report.failed, count);
    // Every BYE was answered: one the balancer could not deliver to the dead gateway went to a
    // survivor, which verified the dead gateway's signed Record-Route and carried it on.
    assert_eq!(report.byes_unanswered, 0, "{}", report.summary());
    // Afterwards the dead gateway is out of the set: everything succeeds on the survivors.
    let report = run(&load(port, 60, 60)).expect("load run");
    assert_eq!(report.succeeded, 60, "{}", report.summary());

    // Every survivor lists every held tunnel, the dead gateway's too (from the database).
    let (first, third) = (&nodes[0], &nodes[2]);
    let rows = |node: &Node| -> Vec<serde_json::Value> {
        let r = node
            .admin()
            .request("GET", "/api/v1/tunnels?limit=1000", None)
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let rows: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        rows.as_array().unwrap().clone()
    };
    let listed = |node: &Node| -> Vec<String> {
        rows(node)
            .iter()
            .map(|t| t["call_id"].as_str().unwrap().to_owned())
            .collect()
    };
    // (The last run's tunnels leave the survivors' tables with their BYEs, and their rows
    // just after, through the storage workers: wait for that to settle.)
    wait_until(
        || first.tunnels().unwrap_or(0) + third.tunnels().unwrap_or(0) == 30 - on_dead,
        "only the held tunnels in the survivors' tables",
    );

    // In-dialog failover: the caller ends ten held tunnels with BYEs whose route set names the
    // dead gateway (as the Record-Route of a tunnel it set up does). The balancer gets no
    // answer from it, hands each BYE to a survivor, which verifies the dead gateway's
    // signature with the cluster's key and carries the BYE to the endpoint; the rows go.
    let key = Store::open(Path::new(&url))
        .unwrap()
        .key("dialog-mac")
        .unwrap();
    let held_rows: Vec<gatehouse::tunnel::Tunnel> = Store::open(Path::new(&url))
        .unwrap()
        .tunnels()
        .unwrap()
        .into_iter()
        .filter(|t| {
            t.caller
                .as_ref()
                .is_some_and(|p| p.contact.contains(&format!(":{caller_port}")))
        })
        .collect();
    assert_eq!(held_rows.len(), 30);
    let ended: Vec<&gatehouse::tunnel::Tunnel> = held_rows.iter().take(10).collect();
    for (i, t) in ended.iter().enumerate() {
        let callee = t.callee.as_ref().expect("established");
        // The caller's route set entry for the dead gateway: the endpoint's side (its
        // Contact and tag), signed with the cluster's key (readable: no topology hiding).
        let token = gatehouse::core::admission::hop_token(
            &gatehouse::core::topology::TopologyKey::derive(&key),
            &callee.contact,
            Some(&callee.tag),
            false,
        );
        let mac = gatehouse::core::admission::dialog_mac(
            &gatehouse::core::admission::MacKey::new(&key),
            &t.call_id,
            &t.caller_tag,
            &token,
        );
        let bye = format!(
            "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{caller_port};branch=z9hG4bKfo{i}x{};rport\r\n\
Max-Forwards: 70\r\nRoute: <sip:{BALANCER}:{port};lr>, <sip:{};lr;gh={mac};gd={token}>\r\n\
From: <{}>;tag={}\r\nTo: <{}>;tag={}\r\nCall-ID: {}\r\nCSeq: 10 BYE\r\nContent-Length: 0\r\n\r\n",
            callee.contact,
            std::process::id(),
            nodes[1].sip,
            t.from,
            t.caller_tag,
            t.to,
            callee.tag,
            t.call_id
        );
        caller.send_to(bye.as_bytes(), (BALANCER, port)).unwrap();
    }
    caller
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answered = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; 65_536];
    while answered.len() < ended.len() {
        let (n, _) = caller
            .recv_from(&mut buf)
            .expect("an answer to every BYE routed through the dead gateway");
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.starts_with("SIP/2.0 200") && text.contains(" BYE\r\n") {
            if let Some(id) = text.lines().find_map(|l| l.strip_prefix("Call-ID: ")) {
                answered.insert(id.to_owned());
            }
        }
    }
    eprintln!("10 BYEs routed through the dead gateway answered by survivors");
    for t in &ended {
        wait_until(
            || {
                Store::open(Path::new(&url))
                    .unwrap()
                    .tunnel(&t.call_id)
                    .unwrap()
                    .is_none()
            },
            "the ended tunnel's row gone",
        );
    }
    let remaining = 20;
    let mut ids = Vec::new();
    wait_until(
        || {
            ids = listed(first);
            ids.len() >= remaining && listed(third) == ids
        },
        "both survivors list the same tunnels, the 20 still held among them",
    );
    // Rows beyond the 30 held: what the dead gateway wrote and could not remove (a set-up it
    // proposed and never answered, a removal still deferred when it died).
    eprintln!(
        "{on_dead} of the 30 held tunnels were on the killed gateway; {} rows it left",
        ids.len() - remaining
    );
    // One survivor tears every one down, the dead gateway's included: BYE to the endpoint
    // and, through the balancer's Route, to the caller.
    let mut admin = first.admin();
    for id in &ids {
        let r = admin
            .request("DELETE", &format!("/api/v1/tunnels/{id}"), None)
            .unwrap();
        // 404 only for a row that went meanwhile (a set-up of the last run ended by its BYE).
        let gone = || {
            Store::open(Path::new(&url))
                .unwrap()
                .tunnel(id)
                .unwrap()
                .is_none()
        };
        assert!(
            r.status == 200 || (r.status == 404 && gone()),
            "{id}: {} {}",
            r.status,
            r.body
        );
    }
    // (The rows leave through the first gateway's storage worker, just after its answers.)
    wait_until(
        || listed(third).is_empty(),
        "no tunnel listed at the third gateway",
    );
    // The third gateway held some of them: NOTIFY gatehouse_tunnels empties its table too.
    wait_until(
        || third.tunnels() == Some(0) && first.tunnels() == Some(0),
        "the survivors' own tables empty",
    );
    let mut byes = std::collections::BTreeSet::new();
    while byes.len() < remaining {
        let (n, _) = caller
            .recv_from(&mut buf)
            .expect("a BYE for every held tunnel");
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.starts_with("BYE ") {
            let call_id = text
                .lines()
                .find_map(|l| l.strip_prefix("Call-ID: "))
                .unwrap_or("")
                .to_owned();
            byes.insert(call_id);
        }
    }
    assert!(byes.iter().all(|id| ids.contains(id)), "{byes:?}");
    drop(Store::open(Path::new(&url)).expect("database still there"));
}

/// A network namespace for the organisation's endpoint, joined to this one by a veth pair:
/// the gateways listen on documentation addresses of this side (.11 to .13 of a /24 this
/// machine does not use: local here, so the balancer and PostgreSQL on loopback reach them
/// too), the endpoint is .2 on the other, with its userspace WireGuard daemon. Everything goes
/// at drop.
struct EndpointNet {
    ns: String,
    iface: String,
    /// The first three octets of the /24.
    net: &'static str,
    daemon: Option<Proc>,
}

impl EndpointNet {
    fn gateway(&self, n: u8) -> String {
        format!("{}.{}", self.net, 10 + n)
    }

    fn endpoint(&self) -> String {
        format!("{}.2", self.net)
    }

    fn build(dir: &Path) -> EndpointNet {
        let id = std::process::id() % 100_000;
        let ok = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // A documentation /24 the machine's own interfaces do not use (some hosts number
        // their real network in one: a second route to it would break theirs).
        let used = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "route"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        let net = ["198.51.100", "203.0.113"]
            .into_iter()
            .find(|n| !used.contains(&format!("{n}.")))
            .expect("a documentation /24 free on this machine");
        let mut net = EndpointNet {
            ns: format!("ghd{id}"),
            iface: format!("ghdw{id}"),
            net,
            daemon: None,
        };
        let (outer, inner) = (format!("ghdr{id}"), format!("ghde{id}"));
        ok(&["ip", "netns", "add", &net.ns]);
        ok(&["ip", "-n", &net.ns, "link", "set", "lo", "up"]);
        ok(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ok(&["ip", "link", "set", &inner, "netns", &net.ns]);
        for n in 1..=3 {
            let cidr = format!("{}/{}", net.gateway(n), if n == 1 { 24 } else { 32 });
            ok(&["ip", "addr", "add", &cidr, "dev", &outer]);
        }
        let inner_addr = format!("{}/24", net.endpoint());
        ok(&[
            "ip",
            "-n",
            &net.ns,
            "addr",
            "add",
            &inner_addr,
            "dev",
            &inner,
        ]);
        ok(&["ip", "link", "set", &outer, "up"]);
        ok(&["ip", "-n", &net.ns, "link", "set", &inner, "up"]);
        let up = |args: &[&str]| {
            String::from_utf8_lossy(&Command::new("ip").args(args).output().unwrap().stdout)
                .contains("LOWER_UP")
        };
        wait_until(
            || up(&["link", "show", &outer]) && up(&["-n", &net.ns, "link", "show", &inner]),
            "the veth pair up",
        );
        let daemon = Proc::spawn(
            "wireguard-go-endpoint",
            Command::new("ip")
                .args(["netns", "exec", &net.ns, "wireguard-go", "-f", &net.iface])
                .env("WG_PROCESS_FOREGROUND", "1"),
            dir,
        );
        net.daemon = Some(daemon);
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", net.iface));
        wait_until(|| sock.exists(), "the endpoint's WireGuard daemon");
        net
    }
}

impl Drop for EndpointNet {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.wait_or_end(Duration::ZERO);
        }
        // The veth pair (and the addresses on this side) go with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// RFC 5626 across the cluster: `wgsip endpoint` registers through two of the three gateways
/// (one flow each, same instance, reg-id 1 and 2). Set-ups through the balancer reach it from
/// all three: the third, holding no flow, sends them through a gateway that does (a Route
/// naming the flow, signed with the cluster's key), which stays in the dialog so that the BYE
/// follows. When one of the two dies (`kill -9`), the others pass its flow over as soon as the
/// database shows its connection gone, and every set-up reaches the endpoint through the other.
#[test]
fn an_endpoint_registered_through_two_gateways_is_reached_through_any() {
    if !tool("kamailio") || !crate::wireguard::available() {
        return;
    }
    let _load = crate::harness::load_test();
    let pg = Postgres::start();
    let url = pg.url();
    seed(Path::new(&url));
    let dir = TempDir::new("dispatcher-endpoint");
    let d = dir.path();
    let net = EndpointNet::build(d);
    std::fs::write(
        d.join("policy.toml"),
        "org_prefixes = [\"2001:db8:789::/48\"]\n[[rule]]\nname = \"partners\"\nkind = \"tunnel\"\n\
callers = [\"*@partner.example\"]\ntargets = [\"sip:vpn@org.example\"]\npskmth = [\"scram\"]\n\
require_psk = true\nprefixes = [\"2001:db8:456::/48\"]\n",
    )
    .unwrap();
    // The endpoint's flows are TLS connections it opens (wgsip's default): nothing else can
    // reach it, so the third gateway must go through a gateway holding one.
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(d.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(d.join("ca.pem"), key.cert.pem()).unwrap();
    std::fs::write(d.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let tls_port = free_port();
    let ports = (free_port(), free_port(), free_port());
    let mut nodes: Vec<Node> = (1..=3)
        .map(|n| {
            let tls = format!(
                "[[listen]]\ntransport = \"tls\"\naddress = \"{}:{tls_port}\"\n\
[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n",
                net.gateway(n)
            );
            Node::start_at(d, n, &net.gateway(n), ports, &url, &tls)
        })
        .collect();
    let tls_at = |n: usize| format!("{}:{tls_port}", net.gateway(n as u8 + 1));
    let port = free_port();
    let _kamailio = balancer(d, port, &nodes.iter().collect::<Vec<_>>());

    // The endpoint, through gateways 1 and 2.
    {
        use std::os::unix::fs::PermissionsExt;
        let secret = d.join("vpn.password");
        std::fs::write(&secret, "vpn-secret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(
        d.join("endpoint.toml"),
        format!(
            "[sip]\ngateways = [\"{}\", \"{}\"]\ntransport = \"tls\"\ntls_ca = \"ca.pem\"\n\
tls_server_name = \"localhost\"\nbind = \"{}:0\"\n\
aor = \"sip:vpn@org.example\"\nusername = \"vpn\"\npassword_file = \"vpn.password\"\nexpires = 600\n\
[wireguard]\ninterface = \"{}\"\nprivate_key_file = \"org.key\"\nlisten_port = 51830\naddress = \"{}\"\n\
prefix = \"2001:db8:789:1::/64\"\n[accept]\npskmth = [\"gateway\"]\nprefixes = [\"2001:db8:456::/48\"]\n",
            tls_at(0),
            tls_at(1),
            net.endpoint(),
            net.iface,
            net.endpoint()
        ),
    )
    .unwrap();
    let endpoint = Proc::spawn(
        "endpoint",
        Command::new("ip")
            .args(["netns", "exec", &net.ns])
            .arg(bin("wgsip"))
            .args(["endpoint", "--config"])
            .arg(d.join("endpoint.toml")),
        d,
    );
    for (n, node) in nodes[..2].iter().enumerate() {
        let line = format!(
            "registered sip:vpn@org.example for 600 s through {}",
            tls_at(n)
        );
        wait_or_explain(
            || endpoint.log_text().contains(&line),
            &line,
            || {
                format!(
                    "endpoint:\n{}\ngateway:\n{}",
                    endpoint.log_text(),
                    node.proc.log_text()
                )
            },
        );
    }
    // Every gateway learns both flows, and who holds each, from the store (NOTIFY).
    let holders = |node: &Node| -> Vec<String> {
        let r = node
            .admin()
            .request("GET", "/api/v1/registrations", None)
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let rows: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let mut h: Vec<String> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["holder"].as_str().unwrap_or("here").to_owned())
            .collect();
        h.sort();
        h
    };
    let (sip1, sip2) = (
        format!("sip:{}", nodes[0].sip),
        format!("sip:{}", nodes[1].sip),
    );
    wait_until(
        || holders(&nodes[2]) == [sip1.clone(), sip2.clone()],
        "the third gateway knows both flows and their holders",
    );
    assert_eq!(holders(&nodes[0]), ["here".to_owned(), sip2.clone()]);
    let live = |node: &Node| node.metric("gatehouse_cluster_peers", "");
    wait_until(
        || nodes.iter().all(|n| live(n) == Some(3)),
        "every gateway sees the three connected",
    );

    // Set-ups through the balancer: every one reaches the endpoint, from every gateway.
    let through = |count: u32| LoadOptions {
        local: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..load(port, count, 20)
    };
    let report = run(&through(60)).expect("load run");
    assert_eq!(
        (report.succeeded, report.byes_unanswered),
        (60, 0),
        "{}\nendpoint:\n{}\ngateway 3:\n{}",
        report.summary(),
        endpoint.log_text(),
        nodes[2].proc.log_text()
    );
    let served: Vec<u64> = nodes.iter().map(|n| n.successes().unwrap()).collect();
    eprintln!(
        "set-ups to an endpoint registered through gateways 1 and 2, per gateway: {served:?}"
    );
    assert!(served[2] > 0, "the third gateway served some: {served:?}");

    // Gateway 2 dies: the others see its connection gone and use the flow through gateway 1.
    nodes[1].kill9();
    let died = std::time::Instant::now();
    wait_until(
        || live(&nodes[0]) == Some(2) && live(&nodes[2]) == Some(2),
        "the survivors see gateway 2 gone",
    );
    eprintln!(
        "the flow through a killed gateway passed over after {:?}",
        died.elapsed()
    );
    let report = run(&through(60)).expect("load run");
    assert_eq!(
        (report.succeeded, report.byes_unanswered),
        (60, 0),
        "{}\nendpoint:\n{}",
        report.summary(),
        endpoint.log_text()
    );
    drop(endpoint);
}
