//! `gatehouse-load`: SASL tunnel set-ups against a gateway at a target rate, with progress
//! and a latency summary (see `wgsip::load`).

// A command-line program reports on standard output by design.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use wgsip::load::{run, CrossoverCaller, LoadOptions, TlsTarget};

#[derive(Parser)]
#[command(
    name = "gatehouse-load",
    version,
    about = "Complete SASL tunnel set-ups (SCRAM-SHA-256, -PLUS over TLS, or realm crossover) through a Gatehouse gateway at a target rate"
)]
struct Cli {
    /// The gateway's address (UDP; its TLS listener with --tls-ca).
    #[arg(long, default_value = "127.0.0.1:5060")]
    gateway: SocketAddr,
    /// Local address to send from.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// The AOR called.
    #[arg(long, default_value = "sip:vpn@org.example")]
    target: String,
    /// The SASL username.
    #[arg(long, default_value = "alice")]
    user: String,
    /// A file holding the password (first line); the environment variable
    /// GATEHOUSE_LOAD_PASSWORD otherwise. Never on the command line.
    #[arg(long)]
    password_file: Option<std::path::PathBuf>,
    /// The From AOR (one of the user's AORs).
    #[arg(long, default_value = "sip:alice@partner.example")]
    from: String,
    /// Set-ups started per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Set-ups in all.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Set-ups in flight at most.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// A set-up not finished in this many milliseconds fails.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// No progress lines, only the summary.
    #[arg(long)]
    quiet: bool,
    /// Leave the tunnels up: no BYE after the ACK (to fill a gateway's table, or a cluster's).
    #[arg(long)]
    hold: bool,
    /// Over one TLS connection (the gateway's TLS address in --gateway), verified against
    /// this CA (PEM): SCRAM-SHA-256-PLUS bound to the connection.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the gateway's certificate must carry (default: its address).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Realm crossover: the caller's home's public key (base64; `gatehouse xover-key` prints
    /// it). The gateway does not know the caller: SXOVER-PLUS through it to the home. Needs
    /// --tls-ca.
    #[arg(long, requires_all = ["tls_ca", "identity"])]
    home_key: Option<String>,
    /// The caller's identity at its home, `user@realm` (with --home-key).
    #[arg(long, requires = "home_key")]
    identity: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let password = match &cli.password_file {
        Some(p) => std::fs::read_to_string(p)
            .map(|s| s.lines().next().unwrap_or("").to_owned())
            .map_err(|e| format!("cannot read {}: {e}", p.display())),
        None => std::env::var("GATEHOUSE_LOAD_PASSWORD")
            .map_err(|_| "give --password-file FILE or GATEHOUSE_LOAD_PASSWORD".to_owned()),
    };
    let password = match password {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gatehouse-load: {e}");
            return ExitCode::from(64);
        }
    };
    let crossover = match (&cli.home_key, &cli.identity) {
        (Some(key), Some(identity)) => {
            use base64::Engine;
            let key = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok());
            let Some(home_key) = key else {
                eprintln!("gatehouse-load: --home-key: base64 of a 32-byte key");
                return ExitCode::from(64);
            };
            Some(CrossoverCaller {
                home_key,
                identity: identity.clone(),
            })
        }
        _ => None,
    };
    let opts = LoadOptions {
        gateway: cli.gateway,
        local: cli.local,
        target: cli.target,
        username: cli.user,
        password,
        from: cli.from,
        rate: cli.rate,
        count: cli.count,
        concurrency: cli.concurrency,
        timeout: Duration::from_millis(cli.timeout_ms),
        progress: !cli.quiet,
        hold: cli.hold,
        tls: cli.tls_ca.map(|ca| TlsTarget {
            ca,
            server_name: cli.tls_server_name,
        }),
        crossover,
    };
    match run(&opts) {
        Ok(report) => {
            print!("{}", report.summary());
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("gatehouse-load: {e:#}");
            ExitCode::from(2)
        }
    }
}
