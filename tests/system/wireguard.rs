//! The real thing: three network namespaces (partner site, gateway, organisation site) joined
//! by veth pairs with documentation addresses, userspace WireGuard (wireguard-go), the
//! `gatehouse` binary in the gateway namespace, `wgsip endpoint` inside, `wgsip call` outside.
//! Skipped (loudly) only where namespaces cannot be created; required in CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{bin, Proc, TempDir};

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Can this machine make namespaces and run userspace WireGuard?
pub(crate) fn available() -> bool {
    let root = sh(&["id", "-u"]).stdout == b"0\n";
    let tools = ["ip", "wireguard-go", "wg", "ping"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let probe = format!("ghprobe{}", std::process::id() % 100_000);
    let netns = root && sh(&["ip", "netns", "add", &probe]).status.success();
    if netns {
        let _ = sh(&["ip", "netns", "del", &probe]);
    }
    if !(netns && tools) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to run the WireGuard test (root, ip netns, wireguard-go)"
        );
        eprintln!("SKIPPED LOUDLY: the WireGuard end-to-end test needs root, `ip netns` and wireguard-go/wireguard-tools");
    }
    netns && tools
}

/// Namespaces, links and daemons of one test; everything is removed on drop, also on failure.
struct Topology {
    id: String,
    daemons: Vec<Proc>,
}

impl Topology {
    fn ns(&self, which: &str) -> String {
        format!("gh{which}{}", self.id)
    }

    fn exec(&self, which: &str, args: &[&str]) -> std::process::Output {
        let ns = self.ns(which);
        let mut full = vec!["ip", "netns", "exec", &ns];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `tag` tells apart the topologies of tests running at once (names of links, namespaces
    /// and WireGuard sockets are global).
    fn build(dir: &Path, tag: &str) -> Topology {
        let id = format!("{tag}{}", std::process::id() % 100_000);
        let mut t = Topology {
            id,
            daemons: Vec::new(),
        };
        let (p, g, o) = (t.ns("p"), t.ns("g"), t.ns("o"));
        for ns in [&p, &g, &o] {
            ok(&["ip", "netns", "add", ns]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let id = t.id.clone();
        let link = |a: &str, ans: &str, b: &str, bns: &str| {
            ok(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
            ok(&["ip", "link", "set", a, "netns", ans]);
            ok(&["ip", "link", "set", b, "netns", bns]);
        };
        let (vp, vgp, vo, vgo) = (
            format!("vp{id}"),
            format!("vgp{id}"),
            format!("vo{id}"),
            format!("vgo{id}"),
        );
        link(&vp, &p, &vgp, &g);
        link(&vo, &o, &vgo, &g);
        for (ns, dev, addr) in [
            (&p, &vp, "2001:db8:1::2/64"),
            (&g, &vgp, "2001:db8:1::1/64"),
            (&o, &vo, "2001:db8:2::2/64"),
            (&g, &vgo, "2001:db8:2::1/64"),
        ] {
            ok(&[
                "ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad",
            ]);
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        ok(&[
            "ip",
            "-n",
            &p,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:1::1",
        ]);
        ok(&[
            "ip",
            "-n",
            &o,
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8:2::1",
        ]);
        ok(&[
            "ip",
            "netns",
            "exec",
            &g,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        // Wait for the links (LOWER_UP) before the first packet.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, dev) in [(&p, &vp), (&g, &vgp), (&o, &vo), (&g, &vgo)] {
            while !String::from_utf8_lossy(&sh(&["ip", "-n", ns, "link", "show", dev]).stdout)
                .contains("LOWER_UP")
            {
                assert!(Instant::now() < deadline, "{dev} never came up");
                std::thread::yield_now();
            }
        }
        // Userspace WireGuard daemons, one per site, ended by PID at drop.
        for (which, iface) in [("p", format!("wgp{id}")), ("o", format!("wgo{id}"))] {
            let ns = t.ns(which);
            let d = Proc::spawn(
                &format!("wireguard-go-{which}"),
                Command::new("ip")
                    .args(["netns", "exec", &ns, "wireguard-go", "-f", &iface])
                    .env("WG_PROCESS_FOREGROUND", "1"),
                dir,
            );
            t.daemons.push(d);
            let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                assert!(
                    Instant::now() < deadline,
                    "{} never appeared",
                    sock.display()
                );
                std::thread::park_timeout(Duration::from_millis(20));
            }
        }
        t
    }

    /// The preshared key of the only peer of a site's interface (never printed).
    fn psk(&self, which: &str) -> Option<String> {
        let iface = format!("wg{which}{}", self.id);
        let out = self.exec(which, &["wg", "show", &iface, "preshared-keys"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .next()
            .and_then(|l| l.split('\t').nth(1))
            .map(str::to_owned)
    }

    fn peers(&self, which: &str) -> usize {
        let iface = format!("wg{which}{}", self.id);
        String::from_utf8_lossy(&self.exec(which, &["wg", "show", &iface, "peers"]).stdout)
            .lines()
            .count()
    }

    /// One ping from the partner site to the organisation's tunnel address.
    fn ping(&self, count: &str, wait: &str) -> bool {
        self.exec(
            "p",
            &[
                "ping",
                "-6",
                "-n",
                "-q",
                "-c",
                count,
                "-W",
                wait,
                "2001:db8:789:1::1",
            ],
        )
        .status
        .success()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut d in self.daemons.drain(..) {
            let _ = d.wait_or_end(Duration::ZERO);
        }
        for which in ["p", "g", "o"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(which)]);
        }
    }
}

fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn wait_for_line(p: &Proc, needle: &str, limit: Duration) -> bool {
    wait_for_lines(p, needle, 1, limit)
}

/// Waits until `needle` appears at least `count` times in the process's log.
fn wait_for_lines(p: &Proc, needle: &str, count: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if p.log_text().matches(needle).count() >= count {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

fn caller_config(
    dir: &Path,
    name: &str,
    id: &str,
    password_file: &str,
    prefix: &str,
    tls: bool,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let transport = if tls {
        "gateway = \"[2001:db8:1::1]:5061\"\ntransport = \"tls\"\ntls_ca = \"ca.pem\"\ntls_server_name = \"localhost\"\n"
    } else {
        "gateway = \"[2001:db8:1::1]:5060\"\ntransport = \"udp\"\n"
    };
    std::fs::write(
        &path,
        format!(
            "[sip]\n{transport}bind = \"[2001:db8:1::2]:0\"\naor = \"sip:alice@partner.example\"\n\
username = \"alice\"\npassword_file = \"{password_file}\"\n\
[wireguard]\ninterface = \"wgp{id}\"\nprivate_key_file = \"partner.key\"\nlisten_port = 51820\naddress = \"2001:db8:1::2\"\n\
prefix = \"{prefix}\"\ninterface_address = \"2001:db8:456:1::1/64\"\n[call]\npskmth = [\"scram\"]\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn sip_negotiated_wireguard_tunnel_with_sasl_psk() {
    if !available() {
        return;
    }
    let dir = TempDir::new("wg");
    let d = dir.path();
    let topo = Topology::build(d, "");
    let id = topo.id.clone();

    // The gateway: certificate, store, policy, configuration.
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(d.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(d.join("ca.pem"), key.cert.pem()).unwrap();
    std::fs::write(d.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let store = d.join("store.sqlite");
    // The same users as the other system tests: alice (sip:alice@partner.example) and vpn;
    // and bob, another partner, who will try to take alice's tunnel over.
    crate::sasl::seed(&store);
    gatehouse::store::Store::open(&store)
        .unwrap()
        .add_user(
            "bob",
            b"bob-secret",
            &["sip:bob@partner.example".into()],
            None,
            4096,
        )
        .unwrap();
    std::fs::write(
        d.join("policy.toml"),
        "org_prefixes = [\"2001:db8:789::/48\"]\n[[rule]]\nname = \"partners\"\nkind = \"tunnel\"\ncallers = [\"*@partner.example\"]\n\
targets = [\"sip:vpn@org.example\"]\npskmth = [\"scram\"]\nrequire_psk = true\nprefixes = [\"2001:db8:456::/48\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("gatehouse.toml"),
        format!(
            "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 500\n\
[[listen]]\ntransport = \"udp\"\naddress = \"[2001:db8:1::1]:5060\"\n[[listen]]\ntransport = \"udp\"\naddress = \"[2001:db8:2::1]:5060\"\n\
[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:1::1]:5061\"\n[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:2::1]:5061\"\n\
[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
[auth]\nstore = \"{}\"\nmechanisms = [\"SCRAM-SHA-256-PLUS\", \"SCRAM-SHA-256\"]\n[tunnels]\npolicy = \"policy.toml\"\ninternal_networks = [\"2001:db8:2::/64\"]\n[registrar]\nmin_expires_s = 2\n[log]\nlevel = \"info\"\n",
            store.display()
        ),
    )
    .unwrap();
    let gw_ns = topo.ns("g");
    let gateway = |name: &str| {
        Proc::spawn(
            name,
            Command::new("ip")
                .args(["netns", "exec", &gw_ns])
                .arg(bin("gatehouse"))
                .args(["run", "--config"])
                .arg(d.join("gatehouse.toml")),
            d,
        )
    };

    // The organisation's endpoint.
    write_secret(&d.join("vpn.password"), "vpn-secret\n");
    write_secret(&d.join("alice.password"), "alice-secret\n");
    write_secret(&d.join("bob.password"), "bob-secret\n");
    write_secret(&d.join("wrong.password"), "not-the-password\n");
    std::fs::write(
        d.join("endpoint.toml"),
        format!(
            "[sip]\ngateway = \"[2001:db8:2::1]:5061\"\ntransport = \"tls\"\ntls_ca = \"ca.pem\"\ntls_server_name = \"localhost\"\n\
bind = \"[2001:db8:2::2]:5062\"\naor = \"sip:vpn@org.example\"\nusername = \"vpn\"\nexpires = 4\n\
password_file = \"vpn.password\"\n[wireguard]\ninterface = \"wgo{id}\"\nprivate_key_file = \"org.key\"\nlisten_port = 51821\n\
address = \"2001:db8:2::2\"\nprefix = \"2001:db8:789:1::/64\"\ninterface_address = \"2001:db8:789:1::1/64\"\n\
[accept]\npskmth = [\"gateway\"]\nprefixes = [\"2001:db8:456::/48\"]\n"
        ),
    )
    .unwrap();
    let org_ns = topo.ns("o");
    let endpoint = Proc::spawn(
        "endpoint",
        Command::new("ip")
            .args(["netns", "exec", &org_ns])
            .arg(bin("wgsip"))
            .args(["endpoint", "--config"])
            .arg(d.join("endpoint.toml")),
        d,
    );
    // Started before the gateway, the endpoint keeps trying, and registers once it is up.
    assert!(
        wait_for_line(&endpoint, "retrying in", Duration::from_secs(20)),
        "endpoint:\n{}",
        endpoint.log_text()
    );
    let mut first = gateway("gatehouse-first");
    assert!(
        wait_for_lines(
            &endpoint,
            "registered sip:vpn@org.example",
            1,
            Duration::from_secs(40)
        ),
        "endpoint:\n{}\ngateway:\n{}",
        endpoint.log_text(),
        first.log_text()
    );
    // It refreshes the registration before it expires (at half the granted 4 s), on the same
    // connection.
    assert!(
        wait_for_lines(
            &endpoint,
            "registered sip:vpn@org.example",
            3,
            Duration::from_secs(20)
        ),
        "endpoint:\n{}\ngateway:\n{}",
        endpoint.log_text(),
        first.log_text()
    );
    assert!(!endpoint.log_text().contains("lost the gateway"));
    // The gateway dies (kill -9) and comes back: the endpoint connects again and re-registers
    // (the new gateway's registrar learns the new flow from the store and the REGISTER).
    let _ = Command::new("kill")
        .args(["-9", &first.pid().to_string()])
        .status();
    let _ = first.wait(Duration::from_secs(10));
    let gw = gateway("gatehouse");
    assert!(
        wait_for_lines(
            &endpoint,
            "registered sip:vpn@org.example",
            4,
            Duration::from_secs(60)
        ),
        "endpoint:\n{}\ngateway:\n{}",
        endpoint.log_text(),
        gw.log_text()
    );
    assert!(endpoint.log_text().contains("lost the gateway"));

    let partner_ns = topo.ns("p");
    let call = |name: &str, config: &Path, extra: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &partner_ns])
            .arg(bin("wgsip"))
            .arg("call")
            .arg("sip:vpn@org.example")
            .arg("--config")
            .arg(config)
            .args(extra);
        Proc::spawn(name, &mut c, d)
    };

    // Wrong password: refused, no tunnel.
    let mut wrong = call(
        "call-wrong",
        &caller_config(
            d,
            "wrong",
            &id,
            "wrong.password",
            "2001:db8:456:1::/64",
            false,
        ),
        &[],
    );
    let st = wrong.wait(Duration::from_secs(40));
    assert!(!st.success(), "{}", wrong.log_text());
    assert!(wrong.log_text().contains("403"), "{}", wrong.log_text());
    assert_eq!(topo.peers("o"), 0, "nothing configured inside");

    // Denied by policy (a prefix the rule does not allow): refused, no tunnel.
    let mut denied = call(
        "call-denied",
        &caller_config(
            d,
            "denied",
            &id,
            "alice.password",
            "2001:db8:999:1::/64",
            false,
        ),
        &[],
    );
    let st = denied.wait(Duration::from_secs(40));
    assert!(!st.success());
    assert!(denied.log_text().contains("403"), "{}", denied.log_text());
    assert_eq!(topo.peers("o"), 0);

    // The tunnel: SIP over TLS, SCRAM-SHA-256-PLUS bound to the connection.
    let good = caller_config(
        d,
        "good",
        &id,
        "alice.password",
        "2001:db8:456:1::/64",
        true,
    );
    let started = Instant::now();
    let pid_file = d.join("call.pid");
    let mut caller = call("call", &good, &["--pid-file", pid_file.to_str().unwrap()]);
    assert!(
        wait_for_line(&caller, "tunnel up", Duration::from_secs(40)),
        "caller:\n{}\nendpoint:\n{}",
        caller.log_text(),
        endpoint.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !topo.ping("1", "1") {
        assert!(Instant::now() < deadline, "no ping through the tunnel");
    }
    let to_first_ping = started.elapsed();
    eprintln!("time from `wgsip call` to the first successful ping: {to_first_ping:?}");
    assert!(topo.ping("3", "2"), "ping -6 crosses the tunnel");
    let (psk_p, psk_o) = (topo.psk("p"), topo.psk("o"));
    assert!(
        psk_p.as_deref().is_some_and(|k| k != "(none)"),
        "the caller uses a PSK"
    );
    assert!(psk_p == psk_o, "both sides use the same PSK (not printed)");
    assert!(caller.log_text().contains("psk yes (scram)"));
    assert!(
        caller.log_text().contains("SCRAM-SHA-256-PLUS"),
        "{}",
        caller.log_text()
    );

    // Issue 18, item 3: bob, another partner identity, tries to take alice's live tunnel over
    // — a /48 around her /64 (WireGuard would move her allowed-ip to his peer), then her public
    // key (her peer's PSK and endpoint would become his). Both are refused; her tunnel, its
    // peer and its PSK are unharmed.
    let bob_config = |name: &str, prefix: &str, key: &str| {
        let path = caller_config(d, name, &id, "bob.password", prefix, false);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("sip:alice@partner.example", "sip:bob@partner.example")
            .replace("username = \"alice\"", "username = \"bob\"")
            .replace(
                &format!("interface = \"wgp{id}\""),
                &format!("interface = \"wgb{id}\""),
            )
            .replace(
                "private_key_file = \"partner.key\"",
                &format!("private_key_file = \"{key}\""),
            )
            .replace(
                "listen_port = 51820",
                "listen_port = 51830\nstart_daemon = true",
            )
            .replace(
                "interface_address = \"2001:db8:456:1::1/64\"",
                "interface_address = \"2001:db8:456:2::1/64\"",
            );
        std::fs::write(&path, text).unwrap();
        path
    };
    for (name, prefix, key) in [
        ("bob-prefix", "2001:db8:456::/48", "bob.key"),
        ("bob-key", "2001:db8:456:2::/64", "partner.key"),
    ] {
        let mut bob = call(name, &bob_config(name, prefix, key), &[]);
        let st = bob.wait(Duration::from_secs(40));
        assert!(!st.success(), "{name}: {}", bob.log_text());
        assert!(bob.log_text().contains("403"), "{name}: {}", bob.log_text());
        assert_eq!(
            topo.peers("o"),
            1,
            "{name}: the endpoint still has alice's peer only"
        );
        assert!(
            topo.psk("o") == psk_o,
            "{name}: her peer's PSK is unchanged"
        );
        assert!(
            topo.ping("1", "2"),
            "{name}: her tunnel still carries traffic"
        );
    }

    // Hang up: BYE through the gateway, the endpoint removes the peer, the ping fails.
    let _ = Command::new("kill")
        .args(["-TERM", &caller_pid(&caller)])
        .status();
    let st = caller.wait(Duration::from_secs(40));
    assert!(st.success(), "{}", caller.log_text());
    assert!(
        wait_for_line(&endpoint, "tunnel down", Duration::from_secs(20)),
        "{}",
        endpoint.log_text()
    );
    assert!(!topo.ping("2", "1"), "no ping after BYE");

    // Deliberately mismatched PSK (test hook): the SIP side succeeds, WireGuard stays dark.
    let udp = caller_config(
        d,
        "udp",
        &id,
        "alice.password",
        "2001:db8:456:1::/64",
        false,
    );
    let mut bad = call("call-badpsk", &udp, &["--corrupt-psk"]);
    assert!(
        wait_for_line(&bad, "tunnel up", Duration::from_secs(40)),
        "{}",
        bad.log_text()
    );
    assert!(!topo.ping("3", "1"), "a PSK mismatch must block the tunnel");
    let _ = Command::new("kill")
        .args(["-TERM", &caller_pid(&bad)])
        .status();
    let _ = bad.wait(Duration::from_secs(40));
}

fn caller_pid(p: &Proc) -> String {
    // `ip netns exec` execs the program, so the child's PID is wgsip's.
    p.pid().to_string()
}

/// A gateway or wgsip process run in one of the topology's namespaces:
/// `program ARGS... --config CONFIG`.
fn spawn_in(
    topo: &Topology,
    which: &str,
    name: &str,
    program: &str,
    args: &[&str],
    config: &Path,
    dir: &Path,
) -> Proc {
    Proc::spawn(
        name,
        Command::new("ip")
            .args(["netns", "exec", &topo.ns(which)])
            .arg(bin(program))
            .args(args)
            .arg("--config")
            .arg(config),
        dir,
    )
}

/// `gatehouse xover-key FILE`: a home's key pair written, its public key returned.
fn xover_key(file: &Path) -> String {
    let out = Command::new(bin("gatehouse"))
        .arg("xover-key")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A store at `path` holding `user` (password `USER-secret`) with the AOR `sip:USER@DOMAIN`.
fn store_with_user(path: &Path, user: &str, domain: &str) {
    gatehouse::store::Store::open(path)
        .unwrap()
        .add_user(
            user,
            format!("{user}-secret").as_bytes(),
            &[format!("sip:{user}@{domain}")],
            None,
            4096,
        )
        .unwrap();
}

/// A wgsip configuration: `role` is `endpoint` (registers `aor`, accepts `accept_prefixes`
/// with a PSK from the gateway) or `call` (offers `prefix` with `pskmth=xover`, sealed to
/// `home_key`); the site's WireGuard interface is `wg{site}{id}`.
struct Wgsip<'a> {
    gateway: &'a str,
    server_name: &'a str,
    bind: &'a str,
    user: &'a str,
    domain: &'a str,
    site: &'a str,
    listen_port: u16,
    address: &'a str,
    prefix: &'a str,
    interface_address: &'a str,
    role: &'a str,
}

impl Wgsip<'_> {
    fn write(&self, dir: &Path, id: &str) -> std::path::PathBuf {
        let Wgsip {
            gateway,
            server_name,
            bind,
            user,
            domain,
            site,
            listen_port,
            address,
            prefix,
            interface_address,
            role,
        } = self;
        write_secret(
            &dir.join(format!("{user}.password")),
            &format!("{user}-secret\n"),
        );
        let tail = match *role {
            "endpoint" => "[accept]\npskmth = [\"gateway\"]\nprefixes = [\"2001:db8:789::/48\", \"2001:db8:456::/48\"]\n".to_owned(),
            home_key => format!("[call]\npskmth = [\"xover\"]\nhome_key = \"{home_key}\"\n"),
        };
        let file = dir.join(format!("{user}-{site}.toml"));
        std::fs::write(
            &file,
            format!(
                "[sip]\ngateway = \"{gateway}\"\ntransport = \"tls\"\ntls_ca = \"ca.pem\"\ntls_server_name = \"{server_name}\"\n\
bind = \"{bind}\"\naor = \"sip:{user}@{domain}\"\nusername = \"{user}\"\npassword_file = \"{user}.password\"\n\
[wireguard]\ninterface = \"wg{site}{id}\"\nprivate_key_file = \"{user}-wg.key\"\nlisten_port = {listen_port}\n\
address = \"{address}\"\nprefix = \"{prefix}\"\ninterface_address = \"{interface_address}\"\n{tail}"
            ),
        )
        .unwrap();
        file
    }
}

/// What both crossover tunnels end with: pings cross, both ends hold the same PSK (never
/// printed), the caller says who vouched for it; then the caller hangs up and the endpoint
/// takes the tunnel down.
fn tunnel_up_and_down(
    topo: &Topology,
    caller: &mut Proc,
    endpoint: &Proc,
    vouched: &str,
    explain: &dyn Fn() -> String,
) {
    assert!(
        wait_for_line(caller, "tunnel up", Duration::from_secs(40)),
        "{}",
        explain()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !topo.ping("1", "1") {
        assert!(Instant::now() < deadline, "no ping through the tunnel");
    }
    assert!(topo.ping("3", "2"), "ping -6 crosses the tunnel");
    let (psk_p, psk_o) = (topo.psk("p"), topo.psk("o"));
    assert!(
        psk_p.as_deref().is_some_and(|k| k != "(none)"),
        "the tunnel has a PSK"
    );
    assert!(psk_p == psk_o, "both sides use the same PSK (not printed)");
    let log = caller.log_text();
    assert!(log.contains("psk yes (xover)"), "{log}");
    assert!(log.contains(vouched), "{log}");
    let _ = Command::new("kill")
        .args(["-TERM", &caller_pid(caller)])
        .status();
    let st = caller.wait(Duration::from_secs(40));
    assert!(st.success(), "{}", caller.log_text());
    assert!(
        wait_for_line(endpoint, "tunnel down", Duration::from_secs(20)),
        "{}",
        explain()
    );
}

/// Issue 19 (a): bob exists only at partner.example. His home's crossover service runs on the
/// partner site; org.example's gateway relays his SXOVER-PLUS rounds to it over mutual TLS
/// (certificates from a test CA), admits him as bob@partner.example by crossover, and hands
/// the key his home released to the internal endpoint. Real `wgsip call`, `wgsip endpoint`,
/// wireguard-go: the tunnel carries pings, both ends hold the same PSK, and the foreign
/// gateway's debug log holds no SCRAM message in clear.
#[test]
fn tunnel_by_realm_crossover() {
    if !available() {
        return;
    }
    let dir = TempDir::new("wgx");
    let d = dir.path();
    let topo = Topology::build(d, "x");
    let id = topo.id.clone();
    let pki = crate::crossover::Pki::new();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    pki.issue(d, "org", &["org.example"]);
    pki.issue(d, "partner", &["partner.example"]);
    let home_public = xover_key(&d.join("home.key"));

    // partner.example's gateway, bob's home, on the partner site.
    let home_store = d.join("home.sqlite");
    store_with_user(&home_store, "bob", "partner.example");
    std::fs::write(
        d.join("home.toml"),
        format!(
            "[sip]\ndomains = [\"partner.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"udp\"\naddress = \"[2001:db8:1::2]:5070\"\n\
[tls]\ncertificate = \"partner.pem\"\nprivate_key = \"partner.key\"\n\
[auth]\nstore = \"{}\"\n[crossover]\ntrusted_cas = \"ca.pem\"\n\
[crossover.home]\nlisten = \"[2001:db8:1::2]:8443\"\nkey_file = \"home.key\"\nforeign_domains = [\"org.example\"]\n\
[log]\nlevel = \"info\"\n",
            home_store.display()
        ),
    )
    .unwrap();
    let home = spawn_in(
        &topo,
        "p",
        "gatehouse-home",
        "gatehouse",
        &["run"],
        &d.join("home.toml"),
        d,
    );

    // org.example's gateway: crossover on; bob has no account in its store.
    let store = d.join("org.sqlite");
    crate::sasl::seed(&store);
    std::fs::write(
        d.join("policy.toml"),
        "org_prefixes = [\"2001:db8:789::/48\"]\n[[rule]]\nname = \"partners-by-crossover\"\nkind = \"tunnel\"\n\
callers = [\"*@partner.example\"]\ncrossover = [\"partner.example\"]\ntargets = [\"sip:vpn@org.example\"]\n\
pskmth = [\"xover\"]\nrequire_psk = true\nprefixes = [\"2001:db8:456::/48\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("gatehouse.toml"),
        format!(
            "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 500\n\
[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:1::1]:5061\"\n[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:2::1]:5061\"\n\
[tls]\ncertificate = \"org.pem\"\nprivate_key = \"org.key\"\n\
[auth]\nstore = \"{}\"\n[tunnels]\npolicy = \"policy.toml\"\ninternal_networks = [\"2001:db8:2::/64\"]\n\
[crossover]\nenabled = true\ncertificate = \"org.pem\"\nprivate_key = \"org.key\"\ntrusted_cas = \"ca.pem\"\n\
[crossover.homes]\n\"partner.example\" = \"[2001:db8:1::2]:8443\"\n[log]\nlevel = \"debug\"\n",
            store.display()
        ),
    )
    .unwrap();
    let gw = spawn_in(
        &topo,
        "g",
        "gatehouse-org",
        "gatehouse",
        &["run"],
        &d.join("gatehouse.toml"),
        d,
    );

    let endpoint_config = Wgsip {
        gateway: "[2001:db8:2::1]:5061",
        server_name: "org.example",
        bind: "[2001:db8:2::2]:5062",
        user: "vpn",
        domain: "org.example",
        site: "o",
        listen_port: 51821,
        address: "2001:db8:2::2",
        prefix: "2001:db8:789:1::/64",
        interface_address: "2001:db8:789:1::1/64",
        role: "endpoint",
    }
    .write(d, &id);
    let endpoint = spawn_in(
        &topo,
        "o",
        "endpoint",
        "wgsip",
        &["endpoint"],
        &endpoint_config,
        d,
    );
    assert!(
        wait_for_line(
            &endpoint,
            "registered sip:vpn@org.example",
            Duration::from_secs(40)
        ),
        "endpoint:\n{}\ngateway:\n{}",
        endpoint.log_text(),
        gw.log_text()
    );

    let bob_config = Wgsip {
        gateway: "[2001:db8:1::1]:5061",
        server_name: "org.example",
        bind: "[2001:db8:1::2]:0",
        user: "bob",
        domain: "partner.example",
        site: "p",
        listen_port: 51820,
        address: "2001:db8:1::2",
        prefix: "2001:db8:456:1::/64",
        interface_address: "2001:db8:456:1::1/64",
        role: &home_public,
    }
    .write(d, &id);
    let mut caller = spawn_in(
        &topo,
        "p",
        "call",
        "wgsip",
        &["call", "sip:vpn@org.example"],
        &bob_config,
        d,
    );
    let explain = || {
        format!(
            "caller:\n{}\nendpoint:\n{}\norg gateway:\n{}\nhome:\n{}",
            caller_log(d, "call"),
            endpoint.log_text(),
            gw.log_text(),
            home.log_text()
        )
    };
    tunnel_up_and_down(
        &topo,
        &mut caller,
        &endpoint,
        "authenticated as bob@partner.example by its home with SXOVER-PLUS, key released to org.example",
        &explain,
    );
    // The home logged the release (foreign domain, user, a hash of the Call-ID).
    assert!(
        home.log_text().contains("tunnel key released"),
        "{}",
        home.log_text()
    );
    // The foreign gateway saw only ciphertext: no SCRAM message in its debug log.
    let gw_log = gw.log_text();
    for clear in ["n=bob", "c=biws", "n=bob,r=", ",p="] {
        assert!(
            !gw_log.contains(clear),
            "`{clear}` in the foreign gateway's log"
        );
    }
    assert!(
        gw_log.contains("authenticated by its home (crossover)"),
        "{gw_log}"
    );
}

/// The log of the process `name` started in `dir` (for messages while it is borrowed).
fn caller_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Issue 19 (b), federation: alice, an internal caller of org.example (organisation site),
/// opens a tunnel to `sip:vpn@partner.example`, whose endpoint sits behind partner.example's
/// own gateway on the partner site. Her gateway authenticates her (SCRAM-SHA-256-PLUS), lets
/// her out by policy, locates partner.example through DNS (dnsmasq in the gateway's namespace)
/// and checks its certificate; the partner's gateway challenges with SXOVER-PLUS and relays
/// her sealed rounds to her home — org.example's crossover service, which recognises the call
/// it sent out and her channel with it. Real `wgsip call` and `wgsip endpoint`, wireguard-go:
/// pings cross, both ends hold the same PSK, and the partner's log holds no SCRAM message of
/// her exchange in clear.
#[test]
fn tunnel_by_federation() {
    if !available() {
        return;
    }
    let dir = TempDir::new("wgf");
    let d = dir.path();
    let topo = Topology::build(d, "f");
    let id = topo.id.clone();
    let pki = crate::crossover::Pki::new();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    pki.issue(d, "org", &["org.example"]);
    pki.issue(d, "partner", &["partner.example"]);
    let home_public = xover_key(&d.join("org-home.key"));

    // DNS for org.example's gateway: partner.example's address.
    let dns = Proc::spawn(
        "dnsmasq",
        Command::new("ip").args([
            "netns",
            "exec",
            &topo.ns("g"),
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--port=5353",
            "--pid-file=",
            "--log-facility=-",
            "--local=/partner.example/",
            "--host-record=partner.example,2001:db8:1::2",
        ]),
        d,
    );
    assert!(
        wait_for_line(&dns, "started", Duration::from_secs(20)),
        "{}",
        dns.log_text()
    );

    // partner.example's gateway on the partner site: crossover on (foreign side for alice),
    // its own vpn endpoint registered from the inside (the same host).
    let partner_store = d.join("partner.sqlite");
    store_with_user(&partner_store, "vpn", "partner.example");
    std::fs::write(
        d.join("partner-policy.toml"),
        "[[rule]]\nname = \"org-staff-by-crossover\"\nkind = \"tunnel\"\ncallers = [\"*@org.example\"]\n\
crossover = [\"org.example\"]\ntargets = [\"sip:vpn@partner.example\"]\npskmth = [\"xover\"]\nrequire_psk = true\n\
prefixes = [\"2001:db8:789::/48\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("partner.toml"),
        format!(
            "[sip]\ndomains = [\"partner.example\"]\nshutdown_grace_ms = 200\n\
[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:1::2]:5061\"\n\
[tls]\ncertificate = \"partner.pem\"\nprivate_key = \"partner.key\"\nclient_ca = \"ca.pem\"\n\
[auth]\nstore = \"{}\"\n[tunnels]\npolicy = \"partner-policy.toml\"\ninternal_networks = [\"2001:db8:1::2/128\"]\n\
[crossover]\nenabled = true\ncertificate = \"partner.pem\"\nprivate_key = \"partner.key\"\ntrusted_cas = \"ca.pem\"\n\
[crossover.homes]\n\"org.example\" = \"[2001:db8:1::1]:8443\"\n[log]\nlevel = \"debug\"\n",
            partner_store.display()
        ),
    )
    .unwrap();
    let partner = spawn_in(
        &topo,
        "p",
        "gatehouse-partner",
        "gatehouse",
        &["run"],
        &d.join("partner.toml"),
        d,
    );

    // org.example's gateway: alice's, and her home's crossover service.
    let org_store = d.join("org.sqlite");
    store_with_user(&org_store, "alice", "org.example");
    std::fs::write(
        d.join("org-policy.toml"),
        "org_prefixes = [\"2001:db8:789::/48\"]\n[[rule]]\nname = \"staff-to-partners\"\nkind = \"tunnel\"\n\
callers = [\"sip:alice@org.example\"]\ntargets = [\"*@partner.example\"]\npskmth = [\"xover\"]\nrequire_psk = true\n\
prefixes = [\"2001:db8:789::/48\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("org.toml"),
        format!(
            "[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 500\n\
[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:2::1]:5061\"\n[[listen]]\ntransport = \"tls\"\naddress = \"[2001:db8:1::1]:5061\"\n\
[tls]\ncertificate = \"org.pem\"\nprivate_key = \"org.key\"\nca = \"ca.pem\"\n\
[auth]\nstore = \"{}\"\n[tunnels]\npolicy = \"org-policy.toml\"\n\
[crossover]\ntrusted_cas = \"ca.pem\"\n\
[crossover.home]\nlisten = \"[2001:db8:1::1]:8443\"\nkey_file = \"org-home.key\"\nforeign_domains = [\"partner.example\"]\n\
[dns]\nservers = [\"127.0.0.1:5353\"]\ntimeout_ms = 2000\n\
[[route]]\ndomain = \"partner.example\"\ntarget = \"sip:partner.example:5061;transport=tls\"\n[log]\nlevel = \"debug\"\n",
            org_store.display()
        ),
    )
    .unwrap();
    let gw = spawn_in(
        &topo,
        "g",
        "gatehouse-org",
        "gatehouse",
        &["run"],
        &d.join("org.toml"),
        d,
    );

    let endpoint_config = Wgsip {
        gateway: "[2001:db8:1::2]:5061",
        server_name: "partner.example",
        bind: "[2001:db8:1::2]:5062",
        user: "vpn",
        domain: "partner.example",
        site: "p",
        listen_port: 51820,
        address: "2001:db8:1::2",
        prefix: "2001:db8:456:1::/64",
        interface_address: "2001:db8:456:1::1/64",
        role: "endpoint",
    }
    .write(d, &id);
    let endpoint = spawn_in(
        &topo,
        "p",
        "endpoint",
        "wgsip",
        &["endpoint"],
        &endpoint_config,
        d,
    );
    assert!(
        wait_for_line(
            &endpoint,
            "registered sip:vpn@partner.example",
            Duration::from_secs(40)
        ),
        "endpoint:\n{}\npartner gateway:\n{}",
        endpoint.log_text(),
        partner.log_text()
    );

    let alice_config = Wgsip {
        gateway: "[2001:db8:2::1]:5061",
        server_name: "org.example",
        bind: "[2001:db8:2::2]:0",
        user: "alice",
        domain: "org.example",
        site: "o",
        listen_port: 51821,
        address: "2001:db8:2::2",
        prefix: "2001:db8:789:1::/64",
        interface_address: "2001:db8:789:1::1/64",
        role: &home_public,
    }
    .write(d, &id);
    let mut caller = spawn_in(
        &topo,
        "o",
        "call",
        "wgsip",
        &["call", "sip:vpn@partner.example"],
        &alice_config,
        d,
    );
    let explain = || {
        format!(
            "caller:\n{}\nendpoint:\n{}\norg gateway:\n{}\npartner gateway:\n{}",
            caller_log(d, "call"),
            endpoint.log_text(),
            gw.log_text(),
            partner.log_text()
        )
    };
    tunnel_up_and_down(
        &topo,
        &mut caller,
        &endpoint,
        "authenticated as alice@org.example by its home with SXOVER-PLUS, key released to partner.example",
        &explain,
    );
    // Her home logged the release; the partner admitted her by crossover and saw only
    // ciphertext of her exchange.
    let gw_log = gw.log_text();
    assert!(gw_log.contains("tunnel key released"), "{gw_log}");
    let partner_log = partner.log_text();
    assert!(
        partner_log.contains("authenticated by its home (crossover)"),
        "{partner_log}"
    );
    for clear in ["n=alice", "c=biws", "n=alice,r=", ",p="] {
        assert!(
            !partner_log.contains(clear),
            "`{clear}` in the partner gateway's log"
        );
    }
}
