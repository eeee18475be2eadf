//! The HTTP-SASL client of `gatehouse admin` (and of the tests): plain HTTP/1.1 over TCP,
//! SCRAM-SHA-256, server-final verified, session reused for later requests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use serde_json::Value;

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response")]
    Http,
    #[error("authentication failed ({0})")]
    Auth(String),
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

/// Sends one HTTP/1.1 request and reads the whole response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> Result<HttpResponse, ClientError> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or(ClientError::Http)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or(ClientError::Http)?;
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// An authenticated admin session.
#[derive(Debug)]
pub struct AdminClient {
    addr: SocketAddr,
    username: String,
    password: zeroize::Zeroizing<String>,
    session: Option<String>,
}

impl AdminClient {
    pub fn new(addr: SocketAddr, username: &str, password: &str) -> Self {
        AdminClient {
            addr,
            username: username.into(),
            password: zeroize::Zeroizing::new(password.into()),
            session: None,
        }
    }

    /// The session handle, once authenticated.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// A request; authenticates (or re-authenticates when the session expired) as needed.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, ClientError> {
        if let Some(s) = &self.session {
            let r = http(
                self.addr,
                method,
                path,
                Some(
                    &SaslParams {
                        s2s: Some(s.clone()),
                        ..SaslParams::default()
                    }
                    .emit(),
                ),
                body,
            )?;
            if r.status != 401 {
                return Ok(r);
            }
            self.session = None;
        }
        let r = http(self.addr, method, path, None, body)?;
        if r.status != 401 {
            return Ok(r);
        }
        let challenge = SaslParams::parse(r.header("www-authenticate").ok_or(ClientError::Http)?)
            .map_err(|e| ClientError::Auth(e.to_string()))?;
        let mut scram = ScramClient::new(&self.username, self.password.as_bytes(), None);
        let p1 = SaslParams {
            realm: challenge.realm.clone(),
            mech: Some(scram.mechanism().into()),
            c2s: Some(scram.client_first()),
            ..SaslParams::default()
        };
        let r = http(self.addr, method, path, Some(&p1.emit()), body)?;
        if r.status != 401 {
            return Err(ClientError::Auth(format!("status {}", r.status)));
        }
        let c = SaslParams::parse(r.header("www-authenticate").ok_or(ClientError::Http)?)
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
        let r = http(self.addr, method, path, Some(&p2.emit()), body)?;
        let info = r
            .header("authentication-info")
            .ok_or_else(|| ClientError::Auth(format!("status {}", r.status)))?;
        let info = SaslParams::parse(info).map_err(|e| ClientError::Auth(e.to_string()))?;
        scram
            .verify_server_final(info.s2c.as_deref().unwrap_or_default())
            .map_err(|e| ClientError::Auth(e.to_string()))?;
        self.session = info.s2s;
        Ok(r)
    }
}
