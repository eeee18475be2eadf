//! `gatehouse-load`: SASL tunnel set-ups against a gateway at a target rate, with progress
//! and a latency summary (see `wgsip::load`).

// A command-line program reports on standard output by design.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use wgsip::load::{run, LoadOptions};

#[derive(Parser)]
#[command(
    name = "gatehouse-load",
    version,
    about = "Complete SASL (SCRAM-SHA-256) tunnel set-ups through a Gatehouse gateway at a target rate"
)]
struct Cli {
    /// The gateway's UDP address.
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
