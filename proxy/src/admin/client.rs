//! The HTTP-SASL client of `gatehouse admin` (and of the tests): HTTP/1.1 through hyper's
//! client connection, over TCP or over TLS (rustls: the server verified against a CA file, or
//! the system's roots), SCRAM-SHA-256 — SCRAM-SHA-256-PLUS over TLS, bound to the connection
//! with `tls-exporter` — with the server-final verified and the session reused on one kept-alive
//! connection.
//!
//! The API is blocking (the CLI and tests call it from plain threads): each call runs on the
//! client's own single-threaded runtime. Do not call it from inside an async runtime.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long one request (connection, TLS handshake, answer) may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the admin client, each one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--url` is not `http(s)://host:port`.
    #[error("--url {0}: expected http://host:port or https://host:port")]
    Url(String),
    /// The gateway could not be reached (connection refused, no route, time out).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// TLS: the trust anchors could not be read, or the handshake failed (certificate).
    #[error("TLS with {url}: {reason}")]
    Tls { url: String, reason: String },
    /// The connection broke, or the answer is not HTTP.
    #[error("{0}")]
    Http(String),
    /// The SASL exchange failed (wrong password, unknown identity, server not verified).
    #[error("authentication failed ({0})")]
    Auth(String),
}

impl ClientError {
    /// The exit code of `gatehouse admin` for this error (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Url(_) => 2,
            ClientError::Connect { .. } | ClientError::Tls { .. } | ClientError::Http(_) => 3,
            ClientError::Auth(_) => 4,
        }
    }
}

/// Where the admin API is: `http://host:port` or `https://host:port` (a bare `host:port` is
/// `http://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl AdminUrl {
    pub fn parse(text: &str) -> Result<AdminUrl, ClientError> {
        let bad = || ClientError::Url(text.to_owned());
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else if text.contains("://") {
            return Err(bad());
        } else {
            (false, text)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.is_empty() {
            return Err(bad());
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
                (h.to_owned(), p)
            }
            None => {
                let (h, p) = rest.rsplit_once(':').ok_or_else(bad)?;
                (h.to_owned(), p)
            }
        };
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(AdminUrl { tls, host, port })
    }

    fn text(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "{}://{host}:{}",
            if self.tls { "https" } else { "http" },
            self.port
        )
    }
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The target of a `Link: <...>; rel="next"` header (RFC 8288): the next listing page.
    pub fn next_page(&self) -> Option<&str> {
        let link = self.header("link")?;
        link.split(',').find_map(|l| {
            let (target, params) = l.trim().split_once(';')?;
            let is_next = params
                .split(';')
                .any(|p| p.trim().eq_ignore_ascii_case("rel=\"next\""));
            is_next.then(|| target.trim().trim_start_matches('<').trim_end_matches('>'))
        })
    }
}

/// An open connection to the admin API, and its channel binding when it is TLS.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    exporter: Option<Vec<u8>>,
}

/// What a connection needs: the address, the URL, and TLS settings when it is HTTPS.
struct Endpoint {
    url: AdminUrl,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    fn new(url: AdminUrl, ca: Option<&Path>) -> Result<Endpoint, ClientError> {
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ClientError::Connect {
                url: url.text(),
                reason: "the name does not resolve".into(),
            })?;
        let tls = if url.tls {
            // The system's trust anchors unless a CA file is named.
            let roots = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
            let config = crate::tls::roots_from_pem_file(roots)
                .and_then(crate::tls::client_config)
                .map_err(|e| ClientError::Tls {
                    url: url.text(),
                    reason: e.to_string(),
                })?;
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Endpoint { url, addr, tls })
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let tcp = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| ClientError::Connect {
                url: self.url.text(),
                reason,
            })?;
        let Some(config) = &self.tls else {
            return http1(tcp, None).await;
        };
        let tls_error = |e: &dyn std::fmt::Display| ClientError::Tls {
            url: self.url.text(),
            reason: e.to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
            .map_err(|e| tls_error(&e))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(&e))?;
        // RFC 9266 tls-exporter: SCRAM-SHA-256-PLUS binds the exchange to this connection.
        let exporter = stream
            .get_ref()
            .1
            .export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
            .map_err(|e| tls_error(&e))?;
        http1(stream, Some(exporter)).await
    }
}

/// An HTTP/1.1 client connection over `io`, its connection task spawned on the client's
/// runtime.
async fn http1<S>(io: S, exporter: Option<Vec<u8>>) -> Result<Conn, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Http(format!("HTTP: {e}")))?;
    tokio::spawn(conn);
    Ok(Conn { sender, exporter })
}

/// The kept-alive connection, connected (again) first when there is none or it closed.
async fn open<'a>(
    conn: &'a mut Option<Conn>,
    endpoint: &Endpoint,
) -> Result<&'a mut Conn, ClientError> {
    if conn.as_ref().is_none_or(|c| c.sender.is_closed()) {
        *conn = Some(endpoint.connect().await?);
    }
    conn.as_mut()
        .ok_or_else(|| ClientError::Http("no connection".into()))
}

/// Debian's bundle of the system's trust anchors (package `ca-certificates`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Sends one request on `conn` and reads the whole response.
async fn exchange(
    conn: &mut Conn,
    host: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> Result<HttpResponse, ClientError> {
    let http_error = |e: &dyn std::fmt::Display| ClientError::Http(format!("HTTP: {e}"));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| http_error(&e))?;
    conn.sender.ready().await.map_err(|e| http_error(&e))?;
    let resp = tokio::time::timeout(TIMEOUT, conn.sender.send_request(req))
        .await
        .map_err(|_| ClientError::Http("no answer in time".into()))?
        .map_err(|e| http_error(&e))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http_error(&e))?
        .to_bytes();
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start the admin client's runtime: {e}"),
    }
}

/// Sends one plain-HTTP request on a connection of its own (no authentication handling).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> Result<HttpResponse, ClientError> {
    let url = AdminUrl {
        tls: false,
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let endpoint = Endpoint {
        url,
        addr,
        tls: None,
    };
    runtime().block_on(async {
        let mut conn = endpoint.connect().await?;
        exchange(&mut conn, &addr.to_string(), method, path, auth, body).await
    })
}

/// An authenticated admin session.
pub struct AdminClient {
    runtime: tokio::runtime::Runtime,
    endpoint: Endpoint,
    username: String,
    password: zeroize::Zeroizing<String>,
    session: Option<String>,
    conn: Option<Conn>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("url", &self.endpoint.url.text())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client of the plain-HTTP admin API at `addr`.
    pub fn new(addr: SocketAddr, username: &str, password: &str) -> Self {
        let url = AdminUrl {
            tls: false,
            host: addr.ip().to_string(),
            port: addr.port(),
        };
        AdminClient {
            runtime: runtime(),
            endpoint: Endpoint {
                url,
                addr,
                tls: None,
            },
            username: username.into(),
            password: zeroize::Zeroizing::new(password.into()),
            session: None,
            conn: None,
        }
    }

    /// A client of the admin API at `url`; over HTTPS the server's certificate is verified
    /// against `ca` (PEM) or the system's roots, and the exchange is SCRAM-SHA-256-PLUS.
    pub fn connect(
        url: &AdminUrl,
        ca: Option<&Path>,
        username: &str,
        password: &str,
    ) -> Result<Self, ClientError> {
        Ok(AdminClient {
            runtime: runtime(),
            endpoint: Endpoint::new(url.clone(), ca)?,
            username: username.into(),
            password: zeroize::Zeroizing::new(password.into()),
            session: None,
            conn: None,
        })
    }

    /// The session handle, once authenticated.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// The mechanism this client authenticates with (`-PLUS` over TLS).
    pub fn mechanism(&self) -> &'static str {
        if self.endpoint.tls.is_some() {
            "SCRAM-SHA-256-PLUS"
        } else {
            "SCRAM-SHA-256"
        }
    }

    /// One request on the kept-alive connection (connected again once if it was closed).
    fn send(
        &mut self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&Value>,
    ) -> Result<HttpResponse, ClientError> {
        let host = self.endpoint.url.host.clone();
        let AdminClient {
            runtime,
            endpoint,
            conn,
            ..
        } = self;
        runtime.block_on(async {
            for attempt in 0..2 {
                let c = open(conn, endpoint).await?;
                match exchange(c, &host, method, path, auth, body).await {
                    Err(ClientError::Http(_)) if attempt == 0 => *conn = None,
                    other => return other,
                }
            }
            Err(ClientError::Http("the connection keeps closing".into()))
        })
    }

    /// The channel binding of the current connection (connecting first if needed).
    fn exporter(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let AdminClient {
            runtime,
            endpoint,
            conn,
            ..
        } = self;
        runtime.block_on(async { Ok(open(conn, endpoint).await?.exporter.clone()) })
    }

    /// A request; authenticates (or re-authenticates when the session expired) as needed.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, ClientError> {
        if let Some(s) = self.session.clone() {
            let auth = SaslParams {
                s2s: Some(s),
                ..SaslParams::default()
            }
            .emit();
            let r = self.send(method, path, Some(&auth), body)?;
            if r.status != 401 {
                return Ok(r);
            }
            self.session = None;
        }
        let r = self.send(method, path, None, body)?;
        if r.status != 401 {
            return Ok(r);
        }
        let challenge = SaslParams::parse(
            r.header("www-authenticate")
                .ok_or_else(|| ClientError::Http("401 without a challenge".into()))?,
        )
        .map_err(|e| ClientError::Auth(e.to_string()))?;
        // The rounds go on this connection: over TLS, bound to it.
        let binding = self.exporter()?;
        let mut scram = ScramClient::new(&self.username, self.password.as_bytes(), binding);
        let p1 = SaslParams {
            realm: challenge.realm.clone(),
            mech: Some(scram.mechanism().into()),
            c2s: Some(scram.client_first()),
            ..SaslParams::default()
        };
        let r = self.send(method, path, Some(&p1.emit()), body)?;
        if r.status != 401 {
            return Err(ClientError::Auth(format!("status {}", r.status)));
        }
        let c = SaslParams::parse(
            r.header("www-authenticate")
                .ok_or_else(|| ClientError::Auth(format!("status {}", r.status)))?,
        )
        .map_err(|e| ClientError::Auth(e.to_string()))?;
        let cf = scram
            .client_final(c.s2c.as_deref().unwrap_or_default())
            .map_err(|e| ClientError::Auth(e.to_string()))?;
        let p2 = SaslParams {
            realm: challenge.realm,
            s2s: c.s2s,
            c2s: Some(cf),
            ..SaslParams::default()
        };
        let r = self.send(method, path, Some(&p2.emit()), body)?;
        let info = r
            .header("authentication-info")
            .ok_or_else(|| ClientError::Auth(format!("status {}", r.status)))?;
        // RFC 7615's form, or with a leading `SASL` (gateways before 2026-12).
        let info = SaslParams::parse_info(info)
            .ok_or_else(|| ClientError::Auth("malformed Authentication-Info".into()))?;
        scram
            .verify_server_final(info.s2c.as_deref().unwrap_or_default())
            .map_err(|e| ClientError::Auth(e.to_string()))?;
        self.session = info.s2s;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_or_https_host_port() {
        let u = |s| AdminUrl::parse(s);
        assert_eq!(
            u("http://localhost:9465").unwrap(),
            AdminUrl {
                tls: false,
                host: "localhost".into(),
                port: 9465
            }
        );
        assert!(u("https://gw.org.example:9465/").unwrap().tls);
        assert_eq!(u("127.0.0.1:9465").unwrap().host, "127.0.0.1");
        assert_eq!(u("https://[::1]:9465").unwrap().host, "::1");
        assert_eq!(
            u("https://[::1]:9465").unwrap().text(),
            "https://[::1]:9465"
        );
        for bad in [
            "ftp://x:1",
            "http://x",
            "http://x:1/api",
            "http://:1",
            "x:port",
        ] {
            assert!(u(bad).is_err(), "{bad}");
        }
    }
}
