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
    },
    /// Print the public key of a private key file (base64, like `wg pubkey`).
    Pubkey { key_file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Endpoint { config } => Config::load(&config).and_then(wgsip::endpoint::run),
        Command::Call {
            uri,
            config,
            corrupt_psk,
        } => Config::load(&config)
            .and_then(|c| wgsip::caller::run(c, &uri, &wgsip::caller::CallOptions { corrupt_psk })),
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
