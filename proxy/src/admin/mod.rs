//! The HTTP admin API, authenticated with HTTP-SASL (http-sasl.md), JSON in and out.
//!
//! | method and path | role | what |
//! |---|---|---|
//! | `GET /api/v1/status` | read-only | counts: transactions, tunnels, registrations, pending SASL, connections |
//! | `GET /api/v1/tunnels` | read-only | the tunnels, one page (see below); `?scope=cluster` (the default on a PostgreSQL store) lists every gateway's from the database, `?scope=local` this gateway's table |
//! | `DELETE /api/v1/tunnels/{call-id}` | admin | BYE both ways (the endpoint removes its peer), entry removed; a tunnel another gateway of the cluster set up (even a dead one) is read from the database and torn down from here |
//! | `GET /api/v1/registrations` | read-only | live bindings, one page |
//! | `DELETE /api/v1/registrations/{aor}` | admin | remove an AOR's bindings |
//!
//! Listings page: `?limit=N` (1 to 10 000, default 1000) and `after=KEY` (the Call-ID or AOR
//! the previous page ended with). The body is the page's JSON array; when more follows, a
//! `Link: </api/v1/tunnels?after=KEY&limit=N>; rel="next"` header (RFC 8288) names the next
//! page. The gateway's loop copies one page per request, whatever the table holds.
//! | `GET /api/v1/users` | admin | SIP users (no key material) |
//! | `POST /api/v1/users` `{"username","password","aors":[...]}` | admin | add a user |
//! | `PUT /api/v1/users/{name}/password` `{"password"}` | admin | set a password |
//! | `POST /api/v1/users/{name}/disable`, `/enable` | admin | disable, enable |
//! | `DELETE /api/v1/users/{name}` | admin | remove |
//! | `POST /api/v1/reload` | admin | re-read the policy file; a bad file is refused, the old policy stays |
//! | `PUT /api/v1/log-level` `{"level"}` | admin | change the log level |
//!
//! Authentication: `WWW-Authenticate: SASL realm=..., mech=...` (401); two SCRAM rounds with
//! `Authorization: SASL ...`; the success carries `Authentication-Info: s2c=<server-final>,
//! s2s=<session>` (RFC 7615's form, no scheme; the client also accepts a leading `SASL`); later requests send `Authorization: SASL s2s="<session>"` until the session
//! has been idle for `admin.session_idle_s`. A failed exchange is 403, a malformed header 400,
//! an unknown or expired handle a fresh 401. Over TLS, SCRAM-SHA-256-PLUS with `tls-exporter`.
//! Failed logins feed a lockout of the SIP design (`core::lockout`, the `[auth]` settings): a
//! locked user or source is refused (403) before the SASL step; failures are logged and counted
//! (`gatehouse_admin_logins_total`). The listener is capped per listener and per source, with a
//! header deadline and a connection lifetime (`http_guard`).

// The I/O side: an HTTP listener with its own clock, session tokens and SQLite connection.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod client;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_auth::{
    AuthError, Exchange, Mechanism, Outcome, SaslParams, SaslServer, Secret, ServerSettings,
    TlsInfo,
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Admins, Role, Store};

/// What the admin API asks of the I/O loop that owns the proxy.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Value>),
    Tunnels(Page, oneshot::Sender<Listing>),
    Teardown(String, oneshot::Sender<Result<(), String>>),
    /// A tunnel another gateway set up, as the shared store has it.
    TeardownStored(
        Box<crate::tunnel::Tunnel>,
        oneshot::Sender<Result<(), String>>,
    ),
    Registrations(Page, oneshot::Sender<Listing>),
    RemoveRegistration(String, oneshot::Sender<usize>),
    /// Reload the configuration (or the policy alone for the embedded default).
    Reload(oneshot::Sender<Result<String, String>>),
    /// Users changed through the admin API: refresh the core's credential snapshot now
    /// (changes by the CLI arrive with the storage worker's next poll).
    UsersChanged,
}

/// Which part of a listing a request wants (`?after=KEY&limit=N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub after: Option<String>,
    pub limit: usize,
    /// `scope=cluster` (`Some(true)`) or `scope=local` (`Some(false)`); tunnels only.
    pub cluster: Option<bool>,
}

/// Rows of a listing page per request when `limit` is not given, and the most allowed.
pub const PAGE_DEFAULT: usize = 1000;
pub const PAGE_MAX: usize = 10_000;

impl Page {
    /// Reads `after` and `limit` from a query string; other parameters are refused.
    pub fn from_query(query: Option<&str>) -> Result<Page, String> {
        let mut page = Page {
            after: None,
            limit: PAGE_DEFAULT,
            cluster: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "after" => page.after = Some(percent_decode(v)),
                "limit" => {
                    page.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=PAGE_MAX).contains(n))
                        .ok_or_else(|| format!("limit: a number from 1 to {PAGE_MAX}"))?;
                }
                "scope" => {
                    page.cluster = Some(match v {
                        "cluster" => true,
                        "local" => false,
                        _ => return Err("scope: cluster or local".into()),
                    })
                }
                other => return Err(format!("unknown query parameter {other:?}")),
            }
        }
        Ok(page)
    }
}

/// One page of a listing: its rows and the key of the last one when more follows.
pub type Listing = (Value, Option<String>);

/// Changes the log filter (installed by `main`; absent in embedded use).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

struct Session {
    username: String,
    role: Role,
    last_used: Instant,
}

/// Shared state of the admin listener.
pub struct AdminState {
    sasl: Mutex<SaslServer>,
    /// Failed admin logins per (user, source), source, network and user, decaying: the same
    /// design and settings (`[auth]`) as SIP's (`core::lockout`).
    lockout: Mutex<crate::core::lockout::Lockout>,
    store: Mutex<Store>,
    /// The store is a cluster's (PostgreSQL): known once, so no request locks the store (a
    /// blocking task may hold it for a database round trip) just to ask.
    shared: bool,
    sessions: Mutex<HashMap<String, Session>>,
    idle: Duration,
    commands: mpsc::Sender<Command>,
    log: Option<LogControl>,
    metrics: Arc<crate::metrics::Metrics>,
    /// PBKDF2 iterations of the verifiers it writes (`auth.iterations`).
    iterations: u32,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminState")
    }
}

/// Bound on admin sessions.
const MAX_SESSIONS: usize = 1024;
/// Entries of the admin lockout table (sampled eviction keeps a guesser's record).
const LOCKOUT_CAPACITY: usize = 10_000;

impl AdminState {
    pub fn new(
        realm: &str,
        store: Store,
        idle: Duration,
        commands: mpsc::Sender<Command>,
        log: Option<LogControl>,
        metrics: Arc<crate::metrics::Metrics>,
        auth: &crate::config::AuthSettings,
    ) -> Self {
        let secret = store.key("admin-fake-verifier").unwrap_or([7; 32]);
        let iterations = auth.iterations;
        AdminState {
            lockout: Mutex::new(crate::core::lockout::Lockout::new(
                auth.failures_before_lockout,
                auth.failure_window,
                auth.lockout,
                LOCKOUT_CAPACITY,
            )),
            sasl: Mutex::new(SaslServer::new(ServerSettings {
                realm: realm.to_owned(),
                mechanisms: vec![Mechanism::ScramSha256Plus, Mechanism::ScramSha256],
                ttl: Duration::from_secs(30),
                max_pending: 256,
                max_pending_per_source: 16,
                // Unknown admins get fake verifiers like the real ones.
                iterations,
                secret: Secret::new(secret),
                // The admin API is the I/O side: its seed comes from the operating system.
                seed: Secret::new(rand::random()),
            })),
            shared: store.is_shared(),
            store: Mutex::new(store),
            sessions: Mutex::new(HashMap::new()),
            idle,
            commands,
            log,
            metrics,
            iterations,
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value, headers: &[(&str, String)]) -> Resp {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (n, v) in headers {
        b = b.header(*n, v.as_str());
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Auth {
    Ok {
        username: String,
        role: Role,
        info: Option<String>,
    },
    Respond(Resp),
}

/// The HTTP-SASL exchange of one request (`header`: its Authorization value). It reads the
/// store (admin credentials): run on a blocking thread, never on the gateway's loop.
fn authenticate(
    state: &AdminState,
    header: Option<&str>,
    source: IpAddr,
    tls: Option<&TlsInfo>,
) -> Auth {
    let now = Instant::now();
    let challenge = |state: &AdminState| {
        let value = lock(&state.sasl).challenge(tls).emit();
        Auth::Respond(reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "authentication required"}),
            &[("www-authenticate", value)],
        ))
    };
    let Some(header) = header else {
        return challenge(state);
    };
    let params = match SaslParams::parse(header) {
        Ok(p) => p,
        Err(e) => {
            return Auth::Respond(reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.reason_phrase()}),
                &[],
            ))
        }
    };
    // Session reuse: only s2s, no token.
    if let (Some(s2s), None, None) = (&params.s2s, &params.c2s, &params.mech) {
        let mut sessions = lock(&state.sessions);
        sessions.retain(|_, s| now.duration_since(s.last_used) < state.idle);
        return match sessions.get_mut(s2s) {
            Some(s) => {
                s.last_used = now;
                Auth::Ok {
                    username: s.username.clone(),
                    role: s.role,
                    info: None,
                }
            }
            None => {
                drop(sessions);
                challenge(state)
            }
        };
    }
    let call_id = source.to_string();
    let ex = Exchange {
        call_id: &call_id,
        from_tag: "",
        source,
        tls,
    };
    // Guesses are limited as SIP's are: per (user, source), source, network and user, with
    // decay; a locked attempt is refused before the SASL step (and the store) is touched.
    let username = lock(&state.sasl).claimed_username(&params);
    let locked = {
        let l = lock(&state.lockout);
        l.source_locked(source, now).is_some()
            || username
                .as_deref()
                .is_some_and(|u| l.user_locked(u, source, false, now).is_some())
    };
    if locked {
        state
            .metrics
            .admin_logins
            .with_label_values(&["locked"])
            .inc();
        tracing::warn!(%source, "admin login refused: locked out after failed attempts");
        return Auth::Respond(reply(
            StatusCode::FORBIDDEN,
            json!({"error": "forbidden"}),
            &[],
        ));
    }
    let store = lock(&state.store);
    let step = lock(&state.sasl).step(&params, &ex, &Admins(&store), now);
    match &step {
        Ok(Outcome::Success { auth, .. }) => {
            lock(&state.lockout).success(auth.identity(), source, now);
            state
                .metrics
                .admin_logins
                .with_label_values(&["success"])
                .inc();
        }
        Err(AuthError::Failed(f))
            if !matches!(
                f,
                gatehouse_auth::Failure::UnknownHandle | gatehouse_auth::Failure::Expired
            ) =>
        {
            let mut l = lock(&state.lockout);
            l.failure(username.as_deref(), source, now);
            l.sweep(now, 64);
            drop(l);
            state
                .metrics
                .admin_logins
                .with_label_values(&["failure"])
                .inc();
            tracing::warn!(%source, reason = f.label(), "admin login failed");
        }
        _ => {}
    }
    match step {
        Ok(Outcome::Challenge(p)) => Auth::Respond(reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "authentication continues"}),
            &[("www-authenticate", p.emit())],
        )),
        Ok(Outcome::Success { auth, info }) => {
            let role = store
                .admin_credential(auth.identity())
                .ok()
                .flatten()
                .map_or(Role::ReadOnly, |(_, r)| r);
            let token = {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
            };
            let mut sessions = lock(&state.sessions);
            if sessions.len() >= MAX_SESSIONS {
                sessions.retain(|_, s| now.duration_since(s.last_used) < state.idle);
            }
            if sessions.len() < MAX_SESSIONS {
                sessions.insert(
                    token.clone(),
                    Session {
                        username: auth.identity().to_owned(),
                        role,
                        last_used: now,
                    },
                );
            }
            let info = SaslParams {
                s2s: Some(token),
                ..info
            };
            tracing::info!(
                admin = auth.identity(),
                role = role.as_str(),
                "admin authenticated"
            );
            Auth::Ok {
                username: auth.identity().to_owned(),
                role,
                // RFC 7615's form: auth-params, no scheme (http-sasl.md).
                info: Some(info.emit_auth_params()),
            }
        }
        Err(AuthError::Malformed(e)) => Auth::Respond(reply(
            StatusCode::BAD_REQUEST,
            json!({"error": e.reason_phrase()}),
            &[],
        )),
        Err(AuthError::Failed(
            gatehouse_auth::Failure::UnknownHandle | gatehouse_auth::Failure::Expired,
        )) => {
            drop(store);
            challenge(state)
        }
        Err(AuthError::Internal) => {
            tracing::error!("panic inside the SASL library contained (admin); answered 500");
            state
                .metrics
                .internal_errors
                .with_label_values(&["admin"])
                .inc();
            Auth::Respond(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal error"}),
                &[],
            ))
        }
        Err(AuthError::Failed(_)) => Auth::Respond(reply(
            StatusCode::FORBIDDEN,
            json!({"error": "forbidden"}),
            &[],
        )),
    }
}

async fn ask<T>(state: &AdminState, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    state.commands.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn body_json(req: Request<hyper::body::Incoming>) -> Option<Value> {
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    if bytes.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

fn forbidden() -> Resp {
    reply(
        StatusCode::FORBIDDEN,
        json!({"error": "this needs the admin role"}),
        &[],
    )
}

async fn handle(
    state: Arc<AdminState>,
    req: Request<hyper::body::Incoming>,
    source: IpAddr,
    tls: Option<TlsInfo>,
) -> Result<Resp, Infallible> {
    // The exchange reads the store (a database round trip with PostgreSQL): off the loop.
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let st = Arc::clone(&state);
    let auth = tokio::task::spawn_blocking(move || {
        authenticate(&st, header.as_deref(), source, tls.as_ref())
    })
    .await;
    let (username, role, info) = match auth {
        Ok(Auth::Ok {
            username,
            role,
            info,
        }) => (username, role, info),
        Ok(Auth::Respond(r)) => return Ok(r),
        Err(_) => {
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal error"}),
                &[],
            ))
        }
    };
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let parts: Vec<String> = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .map(percent_decode)
        .collect();
    let write = !matches!(method, Method::GET);
    if write && role != Role::Admin {
        return Ok(with_info(forbidden(), info));
    }
    if write {
        tracing::info!(admin = %username, %method, %path, "admin action");
    }
    let p: Vec<&str> = parts.iter().map(String::as_str).collect();
    let resp = route(&state, &method, &p, role, req).await;
    Ok(with_info(resp, info))
}

/// The API's routes (method and path under `/api/v1/`), each to its handler: the one place the
/// API's shape is written. Writes already need the admin role (checked by [`handle`]); the
/// users table needs it to be read too.
async fn route(
    state: &Arc<AdminState>,
    method: &Method,
    path: &[&str],
    role: Role,
    req: Request<hyper::body::Incoming>,
) -> Resp {
    match (method, path) {
        (&Method::GET, ["status"]) => status(state).await,
        (&Method::GET, [list @ ("tunnels" | "registrations")]) => {
            listing(state, list, req.uri().query()).await
        }
        (&Method::DELETE, ["tunnels", id]) => teardown_tunnel(state, id).await,
        (&Method::DELETE, ["registrations", aor]) => remove_registration(state, aor).await,
        (_, ["users", ..]) if role != Role::Admin => forbidden(),
        (&Method::GET, ["users"]) => list_users(state).await,
        (&Method::POST, ["users"]) => add_user(state, body_json(req).await).await,
        (&Method::PUT, ["users", name, "password"]) => {
            set_password(state, name, body_json(req).await).await
        }
        (&Method::POST, ["users", name, action @ ("disable" | "enable")]) => {
            let (name, enable) = ((*name).to_owned(), *action == "enable");
            change_users(state, StatusCode::OK, move |st| {
                st.set_enabled(&name, enable)
            })
            .await
        }
        (&Method::DELETE, ["users", name]) => {
            let name = (*name).to_owned();
            change_users(state, StatusCode::OK, move |st| st.delete_user(&name)).await
        }
        (&Method::POST, ["reload"]) => reload(state).await,
        (&Method::PUT, ["log-level"]) => set_log_level(state, body_json(req).await),
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "no such endpoint"}),
            &[],
        ),
    }
}

/// `GET /status`.
async fn status(state: &AdminState) -> Resp {
    match ask(state, Command::Status).await {
        Some(v) => reply(StatusCode::OK, v, &[]),
        None => unavailable(),
    }
}

/// `GET /tunnels` and `GET /registrations`: one page, with a `Link` to the next.
async fn listing(state: &Arc<AdminState>, list: &str, query: Option<&str>) -> Resp {
    let page = match Page::from_query(query) {
        Ok(page) => page,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e }), &[]),
    };
    let limit = page.limit;
    let cluster = page.cluster.unwrap_or(state.shared);
    let listing = if list == "tunnels" && cluster {
        stored_tunnels(state, page).await
    } else if list == "tunnels" {
        ask(state, |tx| Command::Tunnels(page, tx)).await
    } else {
        ask(state, |tx| Command::Registrations(page, tx)).await
    };
    let Some((rows, next)) = listing else {
        return unavailable();
    };
    let link: Vec<(&str, String)> = next
        .map(|key| {
            (
                "link",
                format!(
                    "</api/v1/{list}?after={}&limit={limit}>; rel=\"next\"",
                    percent_encode(&key)
                ),
            )
        })
        .into_iter()
        .collect();
    reply(StatusCode::OK, rows, &link)
}

/// `DELETE /tunnels/{call-id}`.
async fn teardown_tunnel(state: &Arc<AdminState>, id: &str) -> Resp {
    let mut outcome = ask(state, |tx| Command::Teardown(id.to_owned(), tx)).await;
    // Not in this gateway's table: another gateway of the cluster (alive or not) set it up;
    // its record in the shared database is enough to end it from here.
    if matches!(outcome, Some(Err(_))) && state.shared {
        let st = Arc::clone(state);
        let call_id = id.to_owned();
        let stored = tokio::task::spawn_blocking(move || lock(&st.store).tunnel(&call_id))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        if let Some(t) = stored {
            outcome = ask(state, |tx| Command::TeardownStored(Box::new(t), tx)).await;
        }
    }
    match outcome {
        Some(Ok(())) => reply(StatusCode::OK, json!({"torn_down": id}), &[]),
        Some(Err(e)) => reply(StatusCode::NOT_FOUND, json!({"error": e}), &[]),
        None => unavailable(),
    }
}

/// `DELETE /registrations/{aor}`.
async fn remove_registration(state: &AdminState, aor: &str) -> Resp {
    match ask(state, |tx| Command::RemoveRegistration(aor.to_owned(), tx)).await {
        Some(0) => reply(StatusCode::NOT_FOUND, json!({"error": "no binding"}), &[]),
        Some(n) => reply(StatusCode::OK, json!({"removed": n}), &[]),
        None => unavailable(),
    }
}

/// `GET /users` (never key material).
async fn list_users(state: &Arc<AdminState>) -> Resp {
    let st = Arc::clone(state);
    let users = tokio::task::spawn_blocking(move || lock(&st.store).list_users()).await;
    match users
        .unwrap_or_else(|_| Err(crate::store::StoreError::Invalid("internal error".into())))
    {
        Ok(list) => reply(
            StatusCode::OK,
            Value::Array(
                list.into_iter()
                    .map(|u| json!({"username": u.username, "aors": u.aors, "enabled": u.enabled, "mechanisms": u.mechanisms}))
                    .collect(),
            ),
            &[],
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
            &[],
        ),
    }
}

/// `POST /users`: `username`, `password` and `aors` are required.
async fn add_user(state: &Arc<AdminState>, body: Option<Value>) -> Resp {
    let body = body.unwrap_or(Value::Null);
    let username = body["username"].as_str().unwrap_or("").to_owned();
    let password = zeroize::Zeroizing::new(body["password"].as_str().unwrap_or("").to_owned());
    let aors: Vec<String> = body["aors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if username.is_empty() || password.is_empty() || aors.is_empty() {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "username, password and aors are required"}),
            &[],
        );
    }
    let iterations = state.iterations;
    change_users(state, StatusCode::CREATED, move |st| {
        st.add_user(&username, password.as_bytes(), &aors, None, iterations)
    })
    .await
}

/// `PUT /users/{name}/password`.
async fn set_password(state: &Arc<AdminState>, name: &str, body: Option<Value>) -> Resp {
    let body = body.unwrap_or(Value::Null);
    let password = zeroize::Zeroizing::new(body["password"].as_str().unwrap_or("").to_owned());
    if password.is_empty() {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "password is required"}),
            &[],
        );
    }
    let (name, iterations) = (name.to_owned(), state.iterations);
    change_users(state, StatusCode::OK, move |st| {
        st.set_password(&name, password.as_bytes(), iterations)
    })
    .await
}

/// `POST /reload`: configuration and policy, as SIGHUP.
async fn reload(state: &AdminState) -> Resp {
    match ask(state, Command::Reload).await {
        Some(Ok(what)) => reply(StatusCode::OK, json!({"reloaded": what}), &[]),
        Some(Err(e)) => reply(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": e}), &[]),
        None => unavailable(),
    }
}

/// `PUT /log-level`.
fn set_log_level(state: &AdminState, body: Option<Value>) -> Resp {
    let body = body.unwrap_or(Value::Null);
    let level = body["level"].as_str().unwrap_or("");
    if !["error", "warn", "info", "debug", "trace"].contains(&level) {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "level is one of error, warn, info, debug, trace"}),
            &[],
        );
    }
    match &state.log {
        Some(set) => match set(level) {
            Ok(()) => reply(StatusCode::OK, json!({"level": level}), &[]),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e}), &[]),
        },
        None => reply(
            StatusCode::NOT_IMPLEMENTED,
            json!({"error": "no log control in this process"}),
            &[],
        ),
    }
}

fn with_info(mut r: Resp, info: Option<String>) -> Resp {
    if let Some(i) = info.and_then(|i| hyper::header::HeaderValue::from_str(&i).ok()) {
        r.headers_mut().insert("authentication-info", i);
    }
    r
}

fn unavailable() -> Resp {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "the gateway is stopping"}),
        &[],
    )
}

/// A change of the users table, run off the async workers (PBKDF2 and SQLite may take
/// milliseconds, or seconds while another process holds the write lock); on success the SIP
/// loop's credential snapshot is refreshed at once.
async fn change_users(
    state: &Arc<AdminState>,
    ok: StatusCode,
    change: impl FnOnce(&mut Store) -> Result<(), crate::store::StoreError> + Send + 'static,
) -> Resp {
    let st = Arc::clone(state);
    let Ok(r) = tokio::task::spawn_blocking(move || change(&mut lock(&st.store))).await else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "internal error"}),
            &[],
        );
    };
    if r.is_ok() {
        let _ = state.commands.send(Command::UsersChanged).await;
    }
    store_result(r, ok)
}

fn store_result(r: Result<(), crate::store::StoreError>, ok: StatusCode) -> Resp {
    match r {
        Ok(()) => reply(ok, json!({"ok": true}), &[]),
        Err(crate::store::StoreError::NoUser(u)) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no user {u}")}),
            &[],
        ),
        Err(e @ (crate::store::StoreError::Exists(_) | crate::store::StoreError::Invalid(_))) => {
            reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string()}),
                &[],
            )
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
            &[],
        ),
    }
}

/// A path segment or query value, percent-decoded (invalid UTF-8 replaced, never refused:
/// the look-up that follows simply finds nothing).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What a path segment or query value may carry unescaped (RFC 3986 unreserved, and `@`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Escapes a Call-ID, AOR or user name for a path segment or query value.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Serves the admin API (plain HTTP, or TLS with `acceptor`) until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    // Caps per listener and per source, a header deadline, a lifetime per connection, and an
    // accept loop that backs off instead of spinning when descriptors run out.
    let guard = crate::http_guard::HttpGuard::new(crate::http_guard::HttpLimits::ADMIN);
    let (mut backoff, mut reserve) = (Duration::ZERO, None);
    loop {
        let (stream, remote) =
            crate::http_guard::accept(&listener, &mut backoff, &mut reserve).await;
        let Some(permit) = guard.admit(remote.ip()) else {
            tracing::debug!(%remote, "admin connection refused: over the listener's or the source's cap");
            continue;
        };
        let state = Arc::clone(&state);
        let acceptor = acceptor.clone();
        let guard = Arc::clone(&guard);
        tokio::spawn(async move {
            let _permit = permit;
            let source = remote.ip();
            let limits = guard.limits();
            let http = guard.http1();
            let serve = async move {
                match acceptor {
                    Some(acc) => {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(limits.header_timeout, acc.accept(stream)).await
                        else {
                            return;
                        };
                        // Channel binding of this connection, computed once after the handshake.
                        let info = crate::tls::channel_binding(tls.get_ref().1);
                        let io = hyper_util::rt::TokioIo::new(tls);
                        let service = hyper::service::service_fn(move |req| {
                            handle(Arc::clone(&state), req, source, Some(info.clone()))
                        });
                        let _ = http.serve_connection(io, service).await;
                    }
                    None => {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let service = hyper::service::service_fn(move |req| {
                            handle(Arc::clone(&state), req, source, None)
                        });
                        let _ = http.serve_connection(io, service).await;
                    }
                }
            };
            let _ = tokio::time::timeout(limits.lifetime, serve).await;
        });
    }
}

/// Answers admin commands against the proxy (called by the I/O loop; `Reload` and
/// `UsersChanged` are the driver's own).
pub fn execute(proxy: &mut crate::core::Proxy, cmd: Command, connections: usize) {
    let now = Instant::now();
    match cmd {
        Command::Status(tx) => {
            let _ = tx.send(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "transactions": proxy.transactions(),
                "tunnels": proxy.tunnel_count(),
                "registrations": proxy.registrations(),
                "pending_sasl": proxy.pending_sasl(),
                "connections": connections,
            }));
        }
        Command::Tunnels(page, tx) => {
            let (tunnels, next) = proxy.tunnel_page(page.after.as_deref(), page.limit);
            let list: Vec<Value> = tunnels.iter().map(tunnel_json).collect();
            let _ = tx.send((Value::Array(list), next));
        }
        Command::Teardown(id, tx) => {
            let _ = tx.send(proxy.teardown(&id, now));
        }
        Command::TeardownStored(t, tx) => {
            let _ = tx.send(proxy.teardown_stored(*t, now));
        }
        Command::Registrations(page, tx) => {
            let (bindings, next) = proxy.registration_page(page.after.as_deref(), page.limit, now);
            let list: Vec<Value> = bindings
                .into_iter()
                .map(|(aor, b)| {
                    json!({"aor": aor, "contact": b.contact, "transport": b.transport.to_string(), "source": b.remote.to_string(),
                           "expires_in": b.expires.saturating_duration_since(now).as_secs(),
                           "holder": b.holder.as_deref()})
                })
                .collect();
            let _ = tx.send((Value::Array(list), next));
        }
        Command::RemoveRegistration(aor, tx) => {
            let _ = tx.send(proxy.remove_registration(&aor));
        }
        // The driver runs these itself: a reload is read off the loop, a users change goes to
        // the storage worker.
        Command::Reload(_) | Command::UsersChanged => {
            tracing::error!("admin command routed to the wrong handler");
        }
    }
}

/// A tunnel as the listings show it.
fn tunnel_json(t: &crate::tunnel::Tunnel) -> Value {
    // Who vouched for the caller: a trusted source, this gateway (local), or the caller's home
    // realm (crossover: its key is the home's, `pskmth=xover`, its identity `user@realm`); a
    // local caller's tunnel keyed by crossover went out to a partner (federation: the realm
    // shown is the partner's domain, which keys it).
    let (origin, realm) = match (t.identity.as_str(), t.pskmth.as_str()) {
        ("trusted", _) => ("trusted", None),
        (id, "xover") if id.contains('@') => ("crossover", id.rsplit_once('@').map(|(_, r)| r)),
        (_, "xover") => (
            "outward",
            t.to.rsplit_once('@')
                .map(|(_, d)| d.split([':', ';']).next().unwrap_or(d)),
        ),
        _ => ("local", None),
    };
    json!({"call_id": t.call_id, "identity": t.identity, "from": t.from, "to": t.to, "prefixes": t.prefixes,
           "pskmth": t.pskmth, "state": t.state.as_str(), "created": t.created_unix,
           "origin": origin, "realm": realm})
}

/// A page of every gateway's tunnels, from the shared database (on a blocking thread).
async fn stored_tunnels(state: &Arc<AdminState>, page: Page) -> Option<Listing> {
    let st = Arc::clone(state);
    let rows = tokio::task::spawn_blocking(move || {
        lock(&st.store).tunnel_page(page.after.as_deref(), page.limit)
    })
    .await
    .ok()?;
    match rows {
        Ok((tunnels, next)) => Some((
            Value::Array(tunnels.iter().map(tunnel_json).collect()),
            next,
        )),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the cluster's tunnels");
            None
        }
    }
}

pub use crate::config::plain_http_allowed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_queries() {
        assert_eq!(
            Page::from_query(None),
            Ok(Page {
                after: None,
                limit: PAGE_DEFAULT,
                cluster: None
            })
        );
        assert_eq!(
            Page::from_query(Some("limit=2&after=sip%3Avpn%40org.example")),
            Ok(Page {
                after: Some("sip:vpn@org.example".into()),
                limit: 2,
                cluster: None
            })
        );
        assert_eq!(
            Page::from_query(Some("scope=local")).map(|p| p.cluster),
            Ok(Some(false))
        );
        for bad in [
            "limit=0",
            "limit=10001",
            "limit=-1",
            "limit=",
            "x=1",
            "scope=all",
        ] {
            assert!(Page::from_query(Some(bad)).is_err(), "{bad}");
        }
        // Escaping round trip, including bytes that are not UTF-8 boundaries when split.
        for s in ["a b/c@d", "%aé", "t/e@x", "ü%"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("%aé%zz%4"), "%aé%zz%4");
    }
}

#[cfg(test)]
mod listing_tests {
    use crate::tunnel::{Tunnel, TunnelState};

    fn tunnel(identity: &str, pskmth: &str) -> Tunnel {
        Tunnel {
            call_id: "c1".into(),
            caller_tag: "t".into(),
            callee_tag: None,
            identity: identity.into(),
            from: "sip:bob@partner.example".into(),
            to: "sip:vpn@org.example".into(),
            prefixes: "2001:db8:456:1::/64".into(),
            pubkey: String::new(),
            pskmth: pskmth.into(),
            created_unix: 0,
            state: TunnelState::Established,
            caller: None,
            callee: None,
        }
    }

    #[test]
    fn a_tunnel_listing_says_who_vouched_for_the_caller() {
        let x = super::tunnel_json(&tunnel("bob@partner.example", "xover"));
        assert_eq!(
            (x["origin"].as_str(), x["realm"].as_str()),
            (Some("crossover"), Some("partner.example"))
        );
        let l = super::tunnel_json(&tunnel("alice", "scram"));
        assert_eq!(
            (l["origin"].as_str(), l["realm"].as_str()),
            (Some("local"), None)
        );
        let t = super::tunnel_json(&tunnel("trusted", "none"));
        assert_eq!(t["origin"].as_str(), Some("trusted"));
        // Federation: our own alice, keyed by the partner with us as her home.
        let mut out = tunnel("alice", "xover");
        out.to = "sip:vpn@partner.example".into();
        let o = super::tunnel_json(&out);
        assert_eq!(
            (o["origin"].as_str(), o["realm"].as_str()),
            (Some("outward"), Some("partner.example"))
        );
    }
}
