//! `gatehouse`: command line. Thin: parse arguments, load config, start the runtime.

// The command line prints its results on standard output by design.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gatehouse::config::{Config, LogFormat};
use gatehouse::transport::Bound;

/// Exit code for a configuration error (EX_USAGE, sysexits.h).
const EX_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "SASL-authenticating SIP edge proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (without --config: the embedded loopback default).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file; errors name the line and key (exit 64).
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Manage SIP users in the credentials store (passwords from a prompt or stdin, never argv).
    User {
        /// The SQLite store file (created when missing).
        #[arg(long, global = true)]
        store: Option<PathBuf>,
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user; the password is read from the terminal (twice) or from stdin.
    Add {
        username: String,
        /// A SIP AOR the user may present (repeatable), e.g. sip:alice@partner.example.
        #[arg(long = "aor", required = true)]
        aors: Vec<String>,
        /// Restrict the user to these mechanisms (repeatable).
        #[arg(long = "mech")]
        mechanisms: Vec<String>,
        /// PBKDF2 iterations of the SCRAM verifier.
        #[arg(long, default_value_t = 4096)]
        iterations: u32,
    },
    /// Set a new password.
    Passwd {
        username: String,
        #[arg(long, default_value_t = 4096)]
        iterations: u32,
    },
    /// Delete a user.
    Del { username: String },
    /// Disable a user (authentication fails as for a wrong password).
    Disable { username: String },
    /// Enable a user.
    Enable { username: String },
    /// List users.
    List,
    /// Show one user (never key material).
    Show { username: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::User { store, action } => match user(store, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::DefaultConfig => {
            print!("{}", gatehouse::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let cfg = match &config {
                Some(path) => match Config::load(path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EX_CONFIG);
                    }
                },
                None => Config::embedded(),
            };
            init_logging(&cfg);
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    // One thread: the driver owns the whole proxy state, so there is nothing to share, and
    // a single-threaded runtime avoids cross-thread wake-ups on every datagram.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let bound = Bound::bind(&cfg).await?;
        for (t, a) in &bound.addrs {
            tracing::info!(transport = %t, address = %a, "listening");
        }
        gatehouse::run(cfg, bound, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Reads a password: from the terminal without echo (asked twice when `confirm`), or the
/// first line of stdin when stdin is not a terminal.
fn read_password(confirm: bool) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = zeroize::Zeroizing::new(rpassword::prompt_password("Password: ")?);
        if confirm {
            let again = zeroize::Zeroizing::new(rpassword::prompt_password("Again: ")?);
            anyhow::ensure!(*first == *again, "the passwords differ");
        }
        first
    } else {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin().read_line(&mut line)?;
        let trimmed = zeroize::Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned());
        trimmed
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    Ok(password)
}

fn user(store: Option<PathBuf>, action: UserAction) -> anyhow::Result<()> {
    use gatehouse::store::Store;
    let path = store.context("--store FILE is required")?;
    let mut store =
        Store::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    match action {
        UserAction::Add {
            username,
            aors,
            mechanisms,
            iterations,
        } => {
            let mechs = mechanisms
                .iter()
                .map(|m| {
                    gatehouse_auth::Mechanism::from_name(m)
                        .with_context(|| format!("unknown mechanism {m}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let password = read_password(true)?;
            let mechs = (!mechs.is_empty()).then_some(mechs.as_slice());
            store.add_user(&username, password.as_bytes(), &aors, mechs, iterations)?;
            println!("added {username}");
        }
        UserAction::Passwd {
            username,
            iterations,
        } => {
            let password = read_password(true)?;
            store.set_password(&username, password.as_bytes(), iterations)?;
            println!("password of {username} changed");
        }
        UserAction::Del { username } => {
            store.delete_user(&username)?;
            println!("deleted {username}");
        }
        UserAction::Disable { username } => {
            store.set_enabled(&username, false)?;
            println!("disabled {username}");
        }
        UserAction::Enable { username } => {
            store.set_enabled(&username, true)?;
            println!("enabled {username}");
        }
        UserAction::List => {
            println!("{:<24} {:<8} {:<10} AORS", "USER", "ENABLED", "ITER");
            for u in store.list_users()? {
                println!(
                    "{:<24} {:<8} {:<10} {}",
                    u.username,
                    u.enabled,
                    u.iterations,
                    u.aors.join(" ")
                );
            }
        }
        UserAction::Show { username } => {
            let u = store
                .user(&username)?
                .with_context(|| format!("no user {username}"))?;
            println!("user:       {}", u.username);
            println!("enabled:    {}", u.enabled);
            println!("iterations: {}", u.iterations);
            println!("aors:       {}", u.aors.join(" "));
            println!(
                "mechanisms: {}",
                u.mechanisms.map_or("(any offered)".into(), |m| m.join(" "))
            );
        }
    }
    Ok(())
}
