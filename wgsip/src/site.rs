//! What both roles set up first: secrets, the WireGuard interface (and its daemon when asked),
//! the SIP connection to the gateway, and the SIGINT/SIGTERM flag.

use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::config::{load_or_create_key, public_key, read_secret, Config};
use crate::net;
use crate::sipua::Ua;
use crate::uapi::Interface;

/// One side of a tunnel, ready to speak SIP and configure WireGuard.
pub struct Site {
    pub password: Zeroizing<String>,
    pub public: [u8; 32],
    pub iface: Interface,
    pub ua: Ua,
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

impl Site {
    pub fn open(cfg: &Config) -> anyhow::Result<Site> {
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
        let ua = Ua::open(&cfg.sip)?;
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        Ok(Site {
            password,
            public: public_key(&private),
            iface,
            ua,
            stop,
            daemon,
        })
    }

    /// True once SIGINT or SIGTERM arrived.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

impl Drop for Site {
    /// A daemon this site started ends with it.
    fn drop(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            net::stop_daemon(d);
        }
    }
}
