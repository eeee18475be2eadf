//! Interface plumbing with `ip` (iproute2) and, on request, a userspace WireGuard daemon.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;

use crate::uapi::Interface;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // Re-adding what is there is not an error for us.
        if !err.contains("File exists") && !err.contains("already assigned") {
            bail!("ip {}: {}", args.join(" "), err.trim());
        }
    }
    Ok(())
}

/// Starts `wireguard-go -f IFNAME` when the interface's UAPI socket is missing, and waits for
/// the socket. Returns the daemon (the caller ends it).
pub fn ensure_daemon(iface: &Interface) -> anyhow::Result<Option<Child>> {
    if std::os::unix::net::UnixStream::connect(&iface.socket).is_ok() {
        return Ok(None); // a daemon already serves the interface
    }
    // A socket file nobody answers on is left over from a daemon that died: remove it.
    let _ = std::fs::remove_file(&iface.socket);
    let child = Command::new("wireguard-go")
        .args(["-f", &iface.name])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start wireguard-go")?;
    wait_for(&iface.socket)?;
    Ok(Some(child))
}

fn wait_for(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear", path.display());
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    Ok(())
}

/// Brings the interface up with its address (no DAD wait for IPv6).
pub fn interface_up(name: &str, address: Option<IpNet>) -> anyhow::Result<()> {
    if let Some(a) = address {
        let a = a.to_string();
        match address {
            Some(IpNet::V6(_)) => ip(&["-6", "addr", "add", &a, "dev", name, "nodad"])?,
            _ => ip(&["addr", "add", &a, "dev", name])?,
        }
    }
    ip(&["link", "set", name, "up"])
}

/// Routes a negotiated prefix into the tunnel.
pub fn route_add(name: &str, prefix: &IpNet) -> anyhow::Result<()> {
    ip(&["route", "replace", &prefix.to_string(), "dev", name])
}

/// Removes the route of a prefix (best effort).
pub fn route_del(name: &str, prefix: &IpNet) {
    let _ = ip(&["route", "del", &prefix.to_string(), "dev", name]);
}

/// Ends a daemon this program started: SIGTERM first (it removes its socket), then waits.
pub fn stop_daemon(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
