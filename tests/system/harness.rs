//! Shared test harness: fixtures, a gateway on ephemeral loopback ports, child processes
//! that are waited on with time limits and ended by PID, and external tools that are
//! required in CI and skipped loudly elsewhere.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gatehouse::config::Config;
use gatehouse::transport::Bound;
use gatehouse_sip::flow::Transport;

/// Root of the repository.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Bytes of a file under tests/fixtures.
pub fn fixture(rel: &str) -> Vec<u8> {
    let p = repo().join("tests/fixtures").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A binary of this workspace (`gatehouse`, `wgsip`, ...), built beside the test binary by
/// `cargo test --workspace` (or `cargo build --bins`).
pub fn bin(name: &str) -> PathBuf {
    // target/debug/deps/system-HASH -> target/debug/NAME
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target folder")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo test --workspace`",
        p.display()
    );
    p
}

/// Path of a SIPp scenario under tests/sipp.
pub fn scenario(name: &str) -> String {
    repo().join("tests/sipp").join(name).display().to_string()
}

/// Default time limit for waiting on an event in a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// True when an external tool is installed. In CI a missing tool fails the test; on a
/// developer machine the test says loudly that it is skipped.
pub fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed; run .ci/run or install it to run this test");
    }
    found
}

/// A port that was free a moment ago on loopback for both UDP and TCP.
pub fn free_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until the process binds the UDP port. The probe reads the kernel's socket table
/// instead of trying to bind the port itself: a probe that binds, however briefly, can take
/// the port at the instant the process binds it, and the process then exits with "address in
/// use". A process that exits before binding fails the wait at once, with its log.
pub fn wait_udp_bound(proc: &mut Proc, port: u16) {
    let what = format!("udp port {port} bound by {}", proc.name);
    wait_until(
        || {
            proc.assert_running();
            udp_port_bound(port)
        },
        &what,
    );
}

/// True when a UDP socket (IPv4 or IPv6) is bound to the local port, from /proc/net/udp*.
fn udp_port_bound(port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                line.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| local.ends_with(&wanted))
            })
        })
    })
}

/// Waits until a TCP listener accepts on the port.
pub fn wait_tcp_listening(port: u16) {
    wait_until(
        || {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(200),
            )
            .is_ok()
        },
        &format!("tcp port {port} listening"),
    );
}

/// Polls a condition (each probe is a real check of the event) until it holds or WAIT passes.
pub fn wait_until(cond: impl FnMut() -> bool, what: &str) {
    wait_or_explain(cond, what, String::new);
}

/// [`wait_until`], with `explain()` (the logs of the processes involved) in the failure.
pub fn wait_or_explain(
    mut cond: impl FnMut() -> bool,
    what: &str,
    explain: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", explain());
        }
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Held by the load tests (SIPp runs of 1000 calls, the INVITE flood) so that they do not
/// run at the same time and measure each other: each is a real load on a 2-core machine.
pub fn load_test() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gatehouse-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// A child process started by a test; killed by its PID if still running at drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.into(),
            log,
        }
    }

    /// The process ID (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Waits for exit up to `limit` (a waiter thread, no polling).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("not yet waited");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        let waiter = std::thread::spawn(move || {
            let st = child.wait();
            let _ = tx.send(());
            (child, st)
        });
        if rx.recv_timeout(limit).is_err() {
            // Still running: end it by its PID, then report.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let _ = waiter.join();
            panic!(
                "{} did not finish within {limit:?}; log:\n{}",
                self.name,
                self.log_text()
            );
        }
        let (_, st) = waiter.join().expect("waiter");
        st.expect("wait")
    }

    /// Waits up to `limit`; a process still running then is ended by its PID (`None`).
    pub fn wait_or_end(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("not yet waited");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let st = child.wait();
            let _ = tx.send(());
            st
        });
        let finished = rx.recv_timeout(limit).is_ok();
        if !finished {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let st = waiter.join().expect("waiter").ok();
        if finished {
            st
        } else {
            None
        }
    }

    /// Panics with the log when the process has already exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "{} exited early ({st}); log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gateway running in this process on its own runtime thread.
pub struct Gateway {
    pub addrs: Vec<(Transport, SocketAddr)>,
    /// The metrics listener, when configured.
    pub metrics: Option<SocketAddr>,
    /// The admin API listener, when configured.
    pub admin: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway from configuration text (listen on port 0 to get ephemeral ports).
    pub fn start(config: &str) -> Gateway {
        let cfg = Config::parse(config, "<test>").unwrap_or_else(|e| panic!("test config: {e}"));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let bound = Bound::bind(&cfg).await.expect("bind");
                let metrics = bound.metrics.as_ref().and_then(|l| l.local_addr().ok());
                addr_tx
                    .send((
                        bound.addrs.clone(),
                        metrics,
                        bound.admin.as_ref().and_then(|l| l.local_addr().ok()),
                    ))
                    .expect("report addresses");
                gatehouse::run(cfg, bound, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("gateway run");
            });
        });
        let (addrs, metrics, admin) = addr_rx.recv_timeout(WAIT).expect("gateway started");
        Gateway {
            addrs,
            metrics,
            admin,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self, transport: Transport) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(t, _)| *t == transport)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {transport} listener"))
    }

    /// Stops and waits for the drain to finish.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// A minimal gateway configuration: loopback listeners on ephemeral ports, loopback trusted,
/// `extra` appended (routes, timers).
pub fn gateway_config(transports: &[&str], extra: &str) -> String {
    let mut s = String::from("[sip]\ndomains = [\"org.example\"]\nshutdown_grace_ms = 500\n");
    for t in transports {
        s.push_str(&format!(
            "[[listen]]\ntransport = \"{t}\"\naddress = \"127.0.0.1:0\"\n"
        ));
    }
    s.push_str("[trust]\nsources = [\"127.0.0.0/8\"]\n");
    s.push_str(extra);
    s
}
