//! What both roles set up first: secrets, the WireGuard interface (and its daemon when asked),
//! the SIP connection to the gateway, and the SIGINT/SIGTERM flag.

use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::config::{self, load_or_create_key, public_key, read_secret, Config};
use crate::net;
use crate::sipua::Ua;
use crate::uapi::Interface;

/// One side of a tunnel, ready to speak SIP and configure WireGuard.
pub struct Site {
    pub password: Zeroizing<String>,
    pub public: [u8; 32],
    pub iface: Interface,
    /// The connection to the gateway ([`Connect::Once`]); the endpoint's flows connect
    /// themselves ([`Site::connect`]).
    pub ua: Option<Ua>,
    stop: Arc<AtomicBool>,
    daemon: Option<Child>,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("iface", &self.iface.name)
            .finish_non_exhaustive()
    }
}

/// What to do when the gateway cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connect {
    /// Fail at once (`wgsip call`: the operator is waiting for an answer).
    Once,
    /// Not yet: each of the endpoint's flows connects with [`Site::connect`], trying again
    /// with a growing pause (0.5 s doubling to 10 s) until connected or stopped (a service
    /// that may start before a gateway, or outlive its restart).
    Later,
}

/// Longest pause between two connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(10);

impl Site {
    pub fn open(cfg: &Config, connect: Connect) -> anyhow::Result<Site> {
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        let password = read_secret(&cfg.sip.password_file)?;
        let private = load_or_create_key(&cfg.wireguard.private_key_file)?;
        let iface = Interface::new(&cfg.wireguard.interface);
        let daemon = if cfg.wireguard.start_daemon {
            net::ensure_daemon(&iface)?
        } else {
            None
        };
        iface.set(Some(&private), Some(cfg.wireguard.listen_port), None)?;
        net::interface_up(&iface.name, cfg.wireguard.interface_address)?;
        let ua = match connect {
            Connect::Once => Some(Ua::open(&cfg.sip).map_err(lost)?),
            Connect::Later => None,
        };
        Ok(Site {
            password,
            public: public_key(&private),
            iface,
            ua,
            stop,
            daemon,
        })
    }

    /// A connection to the (first) gateway of `sip`, retrying as [`Connect::Later`] says.
    pub fn connect(&self, sip: &config::Sip) -> anyhow::Result<Ua> {
        connect_retrying(sip, &self.stop)
    }

    /// Asks every part of the process to end (as SIGTERM does).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// True once SIGINT or SIGTERM arrived.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Connects to the gateway, pausing 0.5 s, 1 s, 2 s ... (at most [`RETRY_MAX`]) between
/// attempts; each failure is reported on standard error. Ends with an error when stopped.
fn connect_retrying(sip: &config::Sip, stop: &AtomicBool) -> anyhow::Result<Ua> {
    let mut pause = Duration::from_millis(500);
    loop {
        match Ua::open(sip) {
            Ok(ua) => return Ok(ua),
            Err(e) => eprintln!("wgsip: {e:#}; retrying in {:.1} s", pause.as_secs_f64()),
        }
        // Wake every 100 ms so SIGTERM is honoured during a long pause.
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                anyhow::bail!("stopped before the gateway could be reached");
            }
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Marks an error of the SIP connection to the gateway (see [`lost`]).
#[derive(Debug, thiserror::Error)]
#[error("the connection to the gateway failed")]
pub struct GatewayLost;

/// Marks `e`, an error of a SIP exchange with the gateway, as a lost connection when it came
/// from the socket or TLS (refused, reset, closed, silent), so connecting again may cure it;
/// anything else (a refusal by the gateway) stays final.
pub fn lost(e: anyhow::Error) -> anyhow::Error {
    if e.chain()
        .any(|c| c.is::<std::io::Error>() || c.is::<rustls::Error>())
    {
        e.context(GatewayLost)
    } else {
        e
    }
}

/// True for an error marked by [`lost`].
pub fn is_connection_error(e: &anyhow::Error) -> bool {
    e.is::<GatewayLost>()
}

impl Drop for Site {
    /// A daemon this site started ends with it.
    fn drop(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            net::stop_daemon(d);
        }
    }
}
