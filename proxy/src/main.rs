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

/// Shown under `gatehouse --help`.
const COMMON_TASKS: &str = "\
Common tasks:
  gatehouse run                                   try it: the embedded default on loopback
  gatehouse check-config /etc/gatehouse/gatehouse.toml
  gatehouse run --config /etc/gatehouse/gatehouse.toml
  gatehouse user add alice --aor sip:alice@partner.example --config /etc/gatehouse/gatehouse.toml
  gatehouse admin-user add root --config /etc/gatehouse/gatehouse.toml
  gatehouse admin --user root tunnels             what is up, like `wg show`
  kill -HUP $(pidof gatehouse)                    reload configuration and policy

Exit codes: 0 success; 1 failure (one `error:` line; for `admin`: the gateway refused the request);
2 invalid arguments; 3 `admin`: the gateway cannot be reached (connection, TLS); 4 `admin`:
authentication failed; 64 invalid configuration.";

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "SASL-authenticating SIP edge proxy",
    after_help = COMMON_TASKS
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
    /// Validate a configuration file without touching the network; errors name the line and
    /// key (exit 64).
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
        /// Also locate route targets named by host through DNS (RFC 3263: NAPTR, SRV, A/AAAA,
        /// with `[dns]`'s name servers) and print the addresses each would be tried at, in
        /// order; a name without any address fails the check.
        #[arg(long)]
        resolve: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Realm crossover: create the home's HPKE key file when it does not exist (mode 0600), and
    /// print its public key, which this realm's users put in their wgsip configuration
    /// (`[call] home_key`). Rotation: move the old file to `previous_key_file`, make a new one,
    /// reload.
    XoverKey {
        /// The key file (`[crossover.home] key_file`).
        file: PathBuf,
    },
    /// Manage admin identities (admin API) in the store.
    AdminUser {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        action: AdminUserAction,
    },
    /// Talk to a running gateway's admin API (HTTP-SASL).
    Admin {
        /// The admin API: http://host:port, or https://host:port (the certificate verified
        /// against --ca or the system's roots; SCRAM-SHA-256-PLUS bound to the connection).
        #[arg(long, default_value = "http://127.0.0.1:9465")]
        url: String,
        /// Trust anchors (PEM) for an https:// admin API (default: the system's).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Admin identity (`gatehouse admin-user add`).
        #[arg(long)]
        user: String,
        /// Password file (mode 0600); otherwise a prompt or stdin.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the API's JSON as returned (for scripts) instead of tables.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Manage SIP users in the credentials store (passwords from a prompt or stdin, never argv).
    User {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        action: UserAction,
    },
}

/// Where `gatehouse user` and `gatehouse admin-user` find the store.
#[derive(clap::Args)]
struct StoreArgs {
    /// The store: an SQLite file (created when missing) or a postgres:// URL; overrides the
    /// configuration's.
    #[arg(long, global = true, value_name = "FILE|URL")]
    store: Option<PathBuf>,
    /// The gateway's configuration file: its `[auth] store`, and `auth.iterations` for new
    /// verifiers.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl StoreArgs {
    /// The store to open and the PBKDF2 iterations for new verifiers (the configuration's, or
    /// 4096).
    fn resolve(&self) -> anyhow::Result<(PathBuf, u32)> {
        let cfg = self
            .config
            .as_ref()
            .map(|p| Config::load(p).map_err(|e| anyhow::anyhow!("{e}")))
            .transpose()?;
        let iterations = cfg.as_ref().map_or(4096, |c| c.auth.iterations);
        let store = match (&self.store, &cfg) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => c.auth.store.clone().with_context(|| {
                format!(
                    "{} has no [auth] store (the gateway keeps users in memory)",
                    self.config
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string())
                )
            })?,
            (None, None) => anyhow::bail!("--store FILE|URL or --config FILE is required"),
        };
        Ok((store, iterations))
    }
}

#[derive(Subcommand)]
enum AdminUserAction {
    /// Add an admin identity (password from a prompt or stdin).
    Add {
        /// The identity's name.
        username: String,
        /// `admin` (every call) or `read-only` (listings and status).
        #[arg(long, default_value = "admin")]
        role: String,
    },
    /// Delete an admin identity.
    Del {
        /// The identity's name.
        username: String,
    },
    /// List admin identities and their roles.
    List,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Counts: transactions, tunnels, registrations, pending SASL exchanges, connections.
    Status,
    /// Tunnels (every gateway's on a shared store).
    Tunnels,
    /// Tear a tunnel down (BYE both ways).
    Teardown {
        /// The tunnel's Call-ID (from `tunnels`).
        call_id: String,
    },
    /// Registered internal endpoints (live bindings).
    Registrations,
    /// Remove an AOR's bindings.
    Unregister {
        /// The AOR, e.g. sip:vpn@org.example.
        aor: String,
    },
    /// SIP users in the store.
    Users,
    /// Add a SIP user (password from a prompt or stdin).
    UserAdd {
        /// The user's name.
        username: String,
        /// A SIP AOR the user may present (repeatable).
        #[arg(long = "aor", required = true)]
        aors: Vec<String>,
    },
    /// Disable a SIP user (authentication fails as for a wrong password).
    UserDisable {
        /// The user's name.
        username: String,
    },
    /// Enable a SIP user.
    UserEnable {
        /// The user's name.
        username: String,
    },
    /// Delete a SIP user.
    UserDel {
        /// The user's name.
        username: String,
    },
    /// Set a SIP user's password (from a prompt or stdin).
    UserPasswd {
        /// The user's name.
        username: String,
    },
    /// Reload the configuration and the policy file (as SIGHUP does).
    Reload,
    /// Change the log filter at run time.
    LogLevel {
        /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a tracing filter.
        level: String,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user; the password is read from the terminal (twice) or from stdin.
    Add {
        /// The user's name (the SASL authentication identity).
        username: String,
        /// A SIP AOR the user may present (repeatable), e.g. sip:alice@partner.example.
        #[arg(long = "aor", required = true)]
        aors: Vec<String>,
        /// Restrict the user to these mechanisms (repeatable).
        #[arg(long = "mech")]
        mechanisms: Vec<String>,
        /// PBKDF2 iterations of the SCRAM verifier (default: the configuration's
        /// auth.iterations, else 4096).
        #[arg(long)]
        iterations: Option<u32>,
    },
    /// Set a new password.
    Passwd {
        /// The user's name.
        username: String,
        /// PBKDF2 iterations of the new verifier (default as for `add`).
        #[arg(long)]
        iterations: Option<u32>,
    },
    /// Delete a user.
    Del {
        /// The user's name.
        username: String,
    },
    /// Disable a user (authentication fails as for a wrong password).
    Disable {
        /// The user's name.
        username: String,
    },
    /// Enable a user.
    Enable {
        /// The user's name.
        username: String,
    },
    /// List users.
    List,
    /// Show one user (never key material).
    Show {
        /// The user's name.
        username: String,
    },
}

/// mimalloc: size-segregated pages that are given back when empty, so a table of long-lived
/// tunnel records does not pin the memory of the short-lived transactions around it (glibc's
/// allocator kept the peak of a load burst resident; docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, resolve } => match Config::load(&file) {
            Ok(cfg) => {
                if resolve {
                    if let Err(e) = locate_routes(&cfg) {
                        eprintln!("error: {}: {e}", file.display());
                        return ExitCode::from(EX_CONFIG);
                    }
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::AdminUser { store, action } => match admin_user(store, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Admin {
            url,
            ca,
            user,
            password_file,
            json,
            action,
        } => match admin(&url, ca.as_deref(), &user, password_file, json, action) {
            Ok(()) => ExitCode::SUCCESS,
            // One line: what failed, and the exit code says which kind of failure.
            Err(e) => {
                eprintln!("error: {}", e.message);
                ExitCode::from(e.code)
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
        Command::XoverKey { file } => match xover_key(&file) {
            Ok(public) => {
                println!("{public}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
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
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("GATEHOUSE_LOG").unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        // Colour only for a person at a terminal: a journal or a file gets plain text.
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if result.is_ok() {
        let control: gatehouse::admin::LogControl = std::sync::Arc::new(move |level: &str| {
            handle
                .modify(|f| *f = EnvFilter::new(level))
                .map_err(|e| e.to_string())
        });
        let _ = gatehouse::LOG_CONTROL.set(control);
    }
}

fn admin_user(store: StoreArgs, action: AdminUserAction) -> anyhow::Result<()> {
    use gatehouse::store::{Role, Store};
    let (path, _) = store.resolve()?;
    let mut store =
        Store::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    match action {
        AdminUserAction::Add { username, role } => {
            let role = Role::parse(&role).context("role is admin or read-only")?;
            let password = read_password(true)?;
            store.add_admin(&username, password.as_bytes(), role)?;
            println!("added admin {username} ({})", role.as_str());
        }
        AdminUserAction::Del { username } => {
            store.delete_admin(&username)?;
            println!("deleted admin {username}");
        }
        AdminUserAction::List => {
            for (u, r, e) in store.admins()? {
                println!("{u:<24} {:<10} enabled={e}", r.as_str());
            }
        }
    }
    Ok(())
}

/// Why `gatehouse admin` failed: one line, and its exit code (README "Operations").
struct AdminFailure {
    message: String,
    code: u8,
}

impl From<gatehouse::admin::client::ClientError> for AdminFailure {
    fn from(e: gatehouse::admin::client::ClientError) -> Self {
        AdminFailure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for AdminFailure {
    fn from(e: anyhow::Error) -> Self {
        AdminFailure {
            message: e.to_string(),
            code: 1,
        }
    }
}

/// One admin API call; prints a table (or the JSON with `--json`).
fn admin(
    url: &str,
    ca: Option<&std::path::Path>,
    user: &str,
    password_file: Option<PathBuf>,
    json: bool,
    action: AdminAction,
) -> Result<(), AdminFailure> {
    use gatehouse::admin::client::{AdminClient, AdminUrl};
    use serde_json::json;
    let url = AdminUrl::parse(url)?;
    let password = match password_file {
        Some(p) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(anyhow::anyhow!("{} must be mode 0600", p.display()).into());
            }
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            );
            zeroize::Zeroizing::new(text.trim_end().to_owned())
        }
        None => read_password(false)?,
    };
    let mut client = AdminClient::connect(&url, ca, user, &password)?;
    let enc = gatehouse::admin::percent_encode;
    let (method, path, body) = match &action {
        AdminAction::Status => ("GET", "/api/v1/status".to_owned(), None),
        AdminAction::Tunnels => ("GET", "/api/v1/tunnels".to_owned(), None),
        AdminAction::Teardown { call_id } => {
            ("DELETE", format!("/api/v1/tunnels/{}", enc(call_id)), None)
        }
        AdminAction::Registrations => ("GET", "/api/v1/registrations".to_owned(), None),
        AdminAction::Unregister { aor } => (
            "DELETE",
            format!("/api/v1/registrations/{}", enc(aor)),
            None,
        ),
        AdminAction::Users => ("GET", "/api/v1/users".to_owned(), None),
        AdminAction::UserAdd { username, aors } => {
            let pw = read_password(true)?;
            (
                "POST",
                "/api/v1/users".to_owned(),
                Some(json!({"username": username, "aors": aors, "password": pw.as_str()})),
            )
        }
        AdminAction::UserDisable { username } => (
            "POST",
            format!("/api/v1/users/{}/disable", enc(username)),
            None,
        ),
        AdminAction::UserEnable { username } => (
            "POST",
            format!("/api/v1/users/{}/enable", enc(username)),
            None,
        ),
        AdminAction::UserDel { username } => {
            ("DELETE", format!("/api/v1/users/{}", enc(username)), None)
        }
        AdminAction::UserPasswd { username } => {
            let pw = read_password(true)?;
            (
                "PUT",
                format!("/api/v1/users/{}/password", enc(username)),
                Some(json!({"password": pw.as_str()})),
            )
        }
        AdminAction::Reload => ("POST", "/api/v1/reload".to_owned(), None),
        AdminAction::LogLevel { level } => (
            "PUT",
            "/api/v1/log-level".to_owned(),
            Some(json!({"level": level})),
        ),
    };
    let mut r = client.request(method, &path, body.as_ref())?;
    let mut value = r.json();
    // A listing comes in pages: follow `Link: rel="next"` and join them.
    while let (Some(next), serde_json::Value::Array(rows)) = (r.next_page(), &mut value) {
        let next = next.to_owned();
        r = client.request("GET", &next, None)?;
        match r.json() {
            serde_json::Value::Array(more) if (200..300).contains(&r.status) => rows.extend(more),
            _ => break,
        }
    }
    if !(200..300).contains(&r.status) {
        let why = value["error"].as_str().unwrap_or("").to_owned();
        return Err(AdminFailure {
            message: format!("the gateway answered {}: {why}", r.status),
            code: 1,
        });
    }
    if json {
        println!("{value}");
    } else {
        #[allow(clippy::disallowed_methods)] // the CLI: ages of tunnels are shown against the clock
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", render(&action, &value, now));
    }
    Ok(())
}

/// A duration the way people read one: `45s`, `3m12s`, `2h05m`, `3d04h`.
fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A JSON value as a table cell: text as it is, lists joined, nothing as `-`.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) if items.is_empty() => "-".into(),
        serde_json::Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        serde_json::Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// Rows under a header, columns aligned (two spaces apart), like `wg show` and `ss`.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "(none)\n".into();
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(c);
            if i < last {
                out.push_str(&" ".repeat(w - c.chars().count() + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// What `gatehouse admin ACTION` prints for the API's answer `v` (`now`: Unix seconds).
fn render(action: &AdminAction, v: &serde_json::Value, now: u64) -> String {
    let rows = |cols: &dyn Fn(&serde_json::Value) -> Vec<String>| -> Vec<Vec<String>> {
        v.as_array()
            .map_or_else(Vec::new, |a| a.iter().map(cols).collect())
    };
    match action {
        AdminAction::Tunnels => table(
            &[
                "CALL-ID", "IDENTITY", "FROM", "TO", "PREFIXES", "PSKMTH", "STATE", "UP", "ORIGIN",
            ],
            &rows(&|t| {
                let up = t["created"]
                    .as_u64()
                    .map_or("-".into(), |c| human(now.saturating_sub(c)));
                [
                    "call_id", "identity", "from", "to", "prefixes", "pskmth", "state",
                ]
                .iter()
                .map(|k| cell(&t[*k]))
                .chain([up, cell(&t["origin"])])
                .collect()
            }),
        ),
        AdminAction::Registrations => table(
            &[
                "AOR",
                "CONTACT",
                "TRANSPORT",
                "SOURCE",
                "EXPIRES",
                "VIA GATEWAY",
            ],
            &rows(&|b| {
                let expires = b["expires_in"]
                    .as_u64()
                    .map_or("-".into(), |s| format!("in {}", human(s)));
                vec![
                    cell(&b["aor"]),
                    cell(&b["contact"]),
                    cell(&b["transport"]).to_ascii_lowercase(),
                    cell(&b["source"]),
                    expires,
                    cell(&b["holder"]),
                ]
            }),
        ),
        AdminAction::Users => table(
            &["USER", "ENABLED", "AORS", "MECHANISMS"],
            &rows(&|u| {
                let mechs = match &u["mechanisms"] {
                    serde_json::Value::Null => "(any offered)".into(),
                    m => cell(m),
                };
                vec![
                    cell(&u["username"]),
                    cell(&u["enabled"]),
                    cell(&u["aors"]),
                    mechs,
                ]
            }),
        ),
        AdminAction::Status => {
            let order = [
                "version",
                "transactions",
                "tunnels",
                "registrations",
                "pending_sasl",
                "connections",
            ];
            let mut out = String::new();
            let mut keys: Vec<&String> = Vec::new();
            if let Some(map) = v.as_object() {
                keys.extend(
                    order
                        .iter()
                        .filter_map(|k| map.get_key_value(*k).map(|(k, _)| k)),
                );
                keys.extend(map.keys().filter(|k| !order.contains(&k.as_str())));
            }
            for k in keys {
                out.push_str(&format!(
                    "{:<14} {}\n",
                    format!("{k}:"),
                    cell(&v[k.as_str()])
                ));
            }
            out
        }
        AdminAction::Teardown { call_id } => format!("tunnel {call_id} torn down\n"),
        AdminAction::Unregister { aor } => {
            format!("{} binding(s) of {aor} removed\n", cell(&v["removed"]))
        }
        AdminAction::Reload => format!("reloaded: {}\n", cell(&v["reloaded"])),
        AdminAction::LogLevel { .. } => format!("log level: {}\n", cell(&v["level"])),
        AdminAction::UserAdd { username, .. } => format!("added {username}\n"),
        AdminAction::UserDisable { username } => format!("disabled {username}\n"),
        AdminAction::UserEnable { username } => format!("enabled {username}\n"),
        AdminAction::UserDel { username } => format!("deleted {username}\n"),
        AdminAction::UserPasswd { username } => format!("password of {username} changed\n"),
    }
}

/// `check-config --resolve`: every route target named by host, located as the gateway would
/// locate it for a request (RFC 3263), printed with the addresses in the order they would be
/// tried. An error names every target without an address.
fn locate_routes(cfg: &Config) -> anyhow::Result<()> {
    use gatehouse::flow::Destination;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut usable: Vec<_> = cfg.listen.iter().map(|l| l.transport).collect();
    usable.dedup();
    let mut targets: Vec<_> = cfg
        .routes
        .targets()
        .filter_map(|t| t.dest.query().map(|q| (t.dest.clone(), q)))
        .collect();
    targets.sort_by(|a, b| a.1.host.cmp(&b.1.host));
    targets.dedup_by(|a, b| a.0 == b.0);
    let mut failed = Vec::new();
    runtime.block_on(async {
        let locator = gatehouse::transport::dns::Locator::new(&cfg.dns, usable);
        for (_, q) in &targets {
            match locator.locate(q).await {
                Ok(hops) => {
                    let list: Vec<String> = hops
                        .iter()
                        .filter_map(|h| match h {
                            Destination::Addr {
                                transport, addr, ..
                            } => Some(format!("{} {addr}", transport.token())),
                            _ => None,
                        })
                        .collect();
                    println!("{}: {}", q.host, list.join(", "));
                }
                Err(e) => failed.push(format!("{}: not found in DNS ({})", q.host, e.0)),
            }
        }
    });
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("route targets without an address: {}", failed.join("; "))
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    // Connections, listeners, the store and its journal share one descriptor table: take
    // what the hard limit allows (the systemd unit sets it).
    match gatehouse::http_guard::raise_descriptor_limit() {
        Some(limit) => tracing::info!(limit, "open descriptors allowed"),
        None => tracing::warn!("cannot read or raise the open-descriptor limit"),
    }
    // Before the first message: the heap the load will use is resident, and what is freed
    // stays (a page fault cost 3-4 ms on this project's virtual machines; issue 20).
    let warmed = gatehouse_heap::keep_warm(cfg.memory_reserve);
    tracing::info!(
        reserve_mib = warmed.reserved >> 20,
        "heap kept warm (freed memory is not given back)"
    );
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
        if let Some(address) = bound.metrics.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!(%address, "metrics listening (/metrics, /healthz, /readyz)");
        }
        if let (Some(address), Some(admin)) = (
            bound.admin.as_ref().and_then(|l| l.local_addr().ok()),
            cfg.admin.as_ref(),
        ) {
            tracing::info!(%address, tls = admin.tls, "admin API listening");
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

fn user(store: StoreArgs, action: UserAction) -> anyhow::Result<()> {
    use gatehouse::store::Store;
    let (path, configured) = store.resolve()?;
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
            let iterations = iterations.unwrap_or(configured);
            store.add_user(&username, password.as_bytes(), &aors, mechs, iterations)?;
            println!("added {username}");
        }
        UserAction::Passwd {
            username,
            iterations,
        } => {
            let password = read_password(true)?;
            let iterations = iterations.unwrap_or(configured);
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

/// `gatehouse xover-key FILE`: the home's key (created once, never overwritten), public half out.
fn xover_key(file: &std::path::Path) -> anyhow::Result<String> {
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let b64 = base64::engine::general_purpose::STANDARD;
    if !file.exists() {
        #[allow(clippy::disallowed_methods)] // a CLI command: the key comes from the OS
        let private: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .with_context(|| format!("creating {}", file.display()))?;
        writeln!(f, "{}", b64.encode(private))?;
        f.sync_all()?;
    }
    let key = gatehouse::crossover::home::read_key(file)?;
    Ok(b64.encode(key.public()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every flag or argument says what it is for (`--help`).
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "gatehouse", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
        Cli::command().debug_assert();
    }

    #[test]
    fn tables_read_like_wg_show() {
        assert_eq!(
            [human(45), human(192), human(7500), human(273_600)],
            ["45s", "3m12s", "2h05m", "3d04h"]
        );
        let tunnels = serde_json::json!([
            {"call_id": "c1@p", "identity": "alice", "from": "sip:alice@partner.example",
             "to": "sip:vpn@org.example", "prefixes": "2001:db8:456:1::/64", "pskmth": "scram",
             "state": "established", "created": 1000, "origin": "local"},
            {"call_id": "c22@p", "identity": "bob", "from": "sip:bob@partner.example",
             "to": "sip:vpn@org.example", "prefixes": null, "pskmth": "none",
             "state": "proposed", "created": 1190, "origin": "crossover"}
        ]);
        let text = render(&AdminAction::Tunnels, &tunnels, 1192);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("CALL-ID  IDENTITY  FROM"), "{text}");
        assert!(
            lines[1].starts_with("c1@p     alice     sip:alice@"),
            "{text}"
        );
        assert!(lines[1].ends_with("established  3m12s  local"), "{text}");
        assert!(lines[2].contains("  -  "), "null shows as -: {text}");
        assert!(
            lines[2].ends_with("proposed     2s     crossover"),
            "{text}"
        );
        assert_eq!(
            render(&AdminAction::Tunnels, &serde_json::json!([]), 0),
            "(none)\n"
        );
    }
}
