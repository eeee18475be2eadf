//! `wgsip`: the Gatehouse endpoint and caller.

// A command-line program reports on standard output by design.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgsip::config::Config;

#[derive(Parser)]
#[command(
    name = "wgsip",
    version,
    about = "WireGuard tunnels negotiated by SIP through Gatehouse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an internal endpoint: register the AOR and answer tunnel INVITEs.
    Endpoint {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Call an AOR and keep the tunnel until SIGINT/SIGTERM.
    Call {
        /// The AOR to call, e.g. sip:vpn@org.example.
        uri: String,
        #[arg(long, short)]
        config: PathBuf,
        /// Test hook: configure a wrong PSK locally (the tunnel must stay dark).
        #[arg(long, hide = true)]
        corrupt_psk: bool,
        /// Write this process's PID here (for `wgsip hangup`).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Hang up a running `wgsip call` (it sends BYE and removes its peer).
    Hangup {
        #[arg(long)]
        pid_file: PathBuf,
    },
    /// Print the public key of a private key file (base64, like `wg pubkey`).
    Pubkey { key_file: PathBuf },
}

/// SIGTERM to the `wgsip call` whose PID is in `pid_file`.
fn hangup(pid_file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let pid: u32 = std::fs::read_to_string(pid_file)
        .with_context(|| format!("no call running ({} missing)", pid_file.display()))?
        .trim()
        .parse()
        .context("the PID file does not hold a PID")?;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(st.success(), "kill {pid} failed");
    println!("hangup sent to {pid}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Endpoint { config } => Config::load(&config).and_then(wgsip::endpoint::run),
        Command::Call {
            uri,
            config,
            corrupt_psk,
            pid_file,
        } => {
            if let Some(p) = &pid_file {
                if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
                    eprintln!("wgsip: cannot write {}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
            }
            let r = Config::load(&config).and_then(|c| {
                wgsip::caller::run(c, &uri, &wgsip::caller::CallOptions { corrupt_psk })
            });
            if let Some(p) = &pid_file {
                let _ = std::fs::remove_file(p);
            }
            r
        }
        Command::Hangup { pid_file } => hangup(&pid_file),
        Command::Pubkey { key_file } => wgsip::config::load_or_create_key(&key_file).map(|k| {
            use base64::Engine;
            println!(
                "{}",
                base64::engine::general_purpose::STANDARD.encode(wgsip::config::public_key(&k))
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgsip: {e:#}");
            ExitCode::FAILURE
        }
    }
}
