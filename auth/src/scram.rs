//! SCRAM-SHA-256 pieces the gateway needs around rsasl: stored verifiers, parsing of the
//! client messages (GS2 header, username, proof), ClientKey recovery for the transcript,
//! a client (used by wgsip and tests, independent of the rsasl server), and the `scram`
//! pre-shared-key derivation of the WireGuard SDP spec.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Minimum PBKDF2 iteration count accepted in a verifier (RFC 7677).
pub const MIN_ITERATIONS: u32 = 4096;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

pub(crate) fn hmac(key: &[u8], data: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for d in data {
        m.update(d);
    }
    m.finalize().into_bytes().into()
}

/// The SCRAM-SHA-256 verifier stored for a user: never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, i) (RFC 5802), through rsasl's tool.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Secret<[u8; 32]> {
    let mut out = sha2::digest::Output::<Sha256>::default();
    rsasl::mechanisms::scram::tools::hash_password::<Sha256>(password, iterations, salt, &mut out);
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&out);
    out.as_mut_slice().zeroize();
    Secret::new(bytes)
}

impl Verifier {
    /// Derives the verifier of a password (the plaintext is not kept).
    pub fn derive(password: &[u8], salt: Vec<u8>, iterations: u32) -> Verifier {
        let salted = salted_password(password, &salt, iterations);
        let client_key = Secret::new(hmac(salted.expose(), &[b"Client Key"]));
        let server_key = hmac(salted.expose(), &[b"Server Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key.expose()).into();
        Verifier {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }

    /// Checks a plaintext password against the verifier (PLAIN), in constant time.
    pub fn check_password(&self, password: &[u8]) -> bool {
        let v = Verifier::derive(password, self.salt.clone(), self.iterations);
        constant_time_eq(&v.stored_key, &self.stored_key)
    }
}

/// Constant-time comparison of secrets (`subtle`; unequal lengths are unequal, and the
/// lengths themselves are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Encodes a username as a SCRAM `saslname`.
pub fn encode_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

pub use crate::scram_msg::{ClientFinal, ClientFirst, Gs2Binding};

/// What the PSK derivation needs from a finished, verified exchange.
#[derive(Clone)]
pub struct Transcript {
    /// AuthMessage = client-first-bare "," server-first "," client-final-without-proof.
    pub auth_message: String,
    /// ClientKey (gateway: ClientProof XOR ClientSignature; caller: HMAC(SaltedPassword, "Client Key")).
    pub client_key: Secret<[u8; 32]>,
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("client_key", &self.client_key)
            .finish_non_exhaustive()
    }
}

/// Recovers ClientKey on the server from a verified proof, and checks it against StoredKey.
pub fn recover_client_key(
    stored_key: &[u8; 32],
    auth_message: &str,
    proof: &[u8],
) -> Option<Secret<[u8; 32]>> {
    let signature = hmac(stored_key, &[auth_message.as_bytes()]);
    let mut key = [0u8; 32];
    for (k, (p, s)) in key.iter_mut().zip(proof.iter().zip(signature.iter())) {
        *k = p ^ s;
    }
    let key = Secret::new(key);
    let check: [u8; 32] = Sha256::digest(key.expose()).into();
    constant_time_eq(&check, stored_key).then_some(key)
}

/// Inputs of the `scram` PSK binding (wireguard-sdp.md).
#[derive(Debug, Clone, Copy)]
pub struct PskBinding<'a> {
    pub mech: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub call_id: &'a str,
    pub pubkey: &'a [u8; 32],
    pub prefix: &'a str,
}

fn lp(h: &mut Sha256, x: &[u8]) {
    h.update((x.len() as u16).to_be_bytes());
    h.update(x);
}

impl PskBinding<'_> {
    /// bind = SHA-256(lp("wgsip-psk-bind-v1") || lp(mech) || lp(From) || lp(To) || lp(Call-ID)
    ///                || lp(pubkey) || lp(prefix)).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for x in [
            b"wgsip-psk-bind-v1".as_slice(),
            self.mech.as_bytes(),
            self.from.as_bytes(),
            self.to.as_bytes(),
            self.call_id.as_bytes(),
            self.pubkey.as_slice(),
            self.prefix.as_bytes(),
        ] {
            lp(&mut h, x);
        }
        h.finalize().into()
    }
}

/// PSK = HKDF-SHA-256(salt = SHA-256(AuthMessage), IKM = ClientKey,
///                    info = "wgsip psk scram v1" || bind, L = 32).
pub fn derive_psk(transcript: &Transcript, binding: &PskBinding<'_>) -> Secret<[u8; 32]> {
    let salt: [u8; 32] = Sha256::digest(transcript.auth_message.as_bytes()).into();
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), transcript.client_key.expose());
    let mut info = Vec::with_capacity(18 + 32);
    info.extend_from_slice(b"wgsip psk scram v1");
    info.extend_from_slice(&binding.digest());
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF length");
    Secret::new(okm)
}

/// Errors of the SCRAM client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("server-first message malformed")]
    ServerFirst,
    #[error("server nonce does not extend the client nonce")]
    Nonce,
    #[error("iteration count below {MIN_ITERATIONS}")]
    Iterations,
    #[error("server-final malformed")]
    ServerFinal,
    #[error("server reported error: {0}")]
    ServerError(String),
    #[error("server signature does not verify: not the genuine server")]
    ServerSignature,
}

/// The SaltedPassword of one password for the salt and iteration count last seen.
#[derive(Default)]
pub struct SaltedCache {
    entry: Option<(Vec<u8>, u32, Secret<[u8; 32]>)>,
}

impl std::fmt::Debug for SaltedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaltedCache(..)")
    }
}

impl SaltedCache {
    fn get(&mut self, password: &[u8], salt: &[u8], iterations: u32) -> Secret<[u8; 32]> {
        match &self.entry {
            Some((s, i, k)) if s == salt && *i == iterations => Secret::new(*k.expose()),
            _ => {
                let k = salted_password(password, salt, iterations);
                self.entry = Some((salt.to_vec(), iterations, Secret::new(*k.expose())));
                k
            }
        }
    }
}

/// A SCRAM-SHA-256(-PLUS) client. `channel_binding` is the tls-exporter data for -PLUS.
pub struct ScramClient {
    username: String,
    password: Secret<Vec<u8>>,
    nonce: String,
    channel_binding: Option<Vec<u8>>,
    client_first_bare: String,
    state: ClientState,
}

enum ClientState {
    Initial,
    SentFinal {
        server_signature: [u8; 32],
        transcript: Transcript,
    },
    Done,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// With a fresh random nonce. The client runs in `wgsip` and in tests, never in the
    /// gateway's sans-IO core, so it may draw from the operating system's generator.
    #[allow(clippy::disallowed_methods)]
    pub fn new(username: &str, password: &[u8], channel_binding: Option<Vec<u8>>) -> ScramClient {
        let nonce: [u8; 18] = rand::random();
        Self::with_nonce(username, password, channel_binding, &b64().encode(nonce))
    }

    /// With a fixed nonce (test vectors).
    pub fn with_nonce(
        username: &str,
        password: &[u8],
        channel_binding: Option<Vec<u8>>,
        nonce: &str,
    ) -> ScramClient {
        ScramClient {
            username: username.to_owned(),
            password: Secret::new(password.to_vec()),
            nonce: nonce.to_owned(),
            channel_binding,
            client_first_bare: format!("n={},r={nonce}", encode_saslname(username)),
            state: ClientState::Initial,
        }
    }

    /// The mechanism this client runs.
    pub fn mechanism(&self) -> &'static str {
        if self.channel_binding.is_some() {
            "SCRAM-SHA-256-PLUS"
        } else {
            "SCRAM-SHA-256"
        }
    }

    fn gs2_header(&self) -> &'static str {
        if self.channel_binding.is_some() {
            "p=tls-exporter,,"
        } else {
            "n,,"
        }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header(), self.client_first_bare).into_bytes()
    }

    /// Consumes server-first, returns client-final.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.client_final_cached(server_first, &mut SaltedCache::default())
    }

    /// As [`client_final`](Self::client_final), reusing the SaltedPassword computed for the
    /// same salt and iteration count in an earlier exchange (RFC 5802 section 5.1 allows a
    /// client to cache it): a client that authenticates often runs PBKDF2 once.
    pub fn client_final_cached(
        &mut self,
        server_first: &[u8],
        cache: &mut SaltedCache,
    ) -> Result<Vec<u8>, ClientError> {
        let sf = std::str::from_utf8(server_first).map_err(|_| ClientError::ServerFirst)?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in sf.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = b64().decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                Some(("e=", v)) => return Err(ClientError::ServerError(v.to_owned())),
                _ => {}
            }
        }
        let (nonce, salt, iterations) = match (nonce, salt, iterations) {
            (Some(n), Some(s), Some(i)) => (n, s, i),
            _ => return Err(ClientError::ServerFirst),
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ClientError::Nonce);
        }
        if iterations < MIN_ITERATIONS {
            return Err(ClientError::Iterations);
        }
        let mut cbind = self.gs2_header().as_bytes().to_vec();
        if let Some(cb) = &self.channel_binding {
            cbind.extend_from_slice(cb);
        }
        let without_proof = format!("c={},r={nonce}", b64().encode(&cbind));
        let auth_message = format!("{},{sf},{without_proof}", self.client_first_bare);
        let salted = cache.get(self.password.expose(), &salt, iterations);
        let client_key = Secret::new(hmac(salted.expose(), &[b"Client Key"]));
        let stored_key: [u8; 32] = Sha256::digest(client_key.expose()).into();
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .expose()
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = Secret::new(hmac(salted.expose(), &[b"Server Key"]));
        let server_signature = hmac(server_key.expose(), &[auth_message.as_bytes()]);
        self.state = ClientState::SentFinal {
            server_signature,
            transcript: Transcript {
                auth_message,
                client_key,
            },
        };
        Ok(format!("{without_proof},p={}", b64().encode(proof)).into_bytes())
    }

    /// Verifies server-final (mutual authentication). Only then is the transcript available.
    pub fn verify_server_final(&mut self, server_final: &[u8]) -> Result<Transcript, ClientError> {
        let ClientState::SentFinal {
            server_signature,
            transcript,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ClientError::ServerFinal);
        };
        let text = std::str::from_utf8(server_final).map_err(|_| ClientError::ServerFinal)?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ClientError::ServerError(e.to_owned()));
        }
        let v = text.strip_prefix("v=").ok_or(ClientError::ServerFinal)?;
        let v = b64()
            .decode(v.split(',').next().unwrap_or(""))
            .map_err(|_| ClientError::ServerFinal)?;
        if !constant_time_eq(&v, &server_signature) {
            return Err(ClientError::ServerSignature);
        }
        Ok(transcript)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unb64(s: &str) -> Vec<u8> {
        b64().decode(s).unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The RFC 7677 exchange as given in wireguard-sdp.md.
    const C2S1: &str = "biwsbj11c2VyLHI9ck9wck5HZndFYmVSV2diTkVrcU8=";
    const S2C1: &str = "cj1yT3ByTkdmd0ViZVJXZ2JORWtxTyVodllEcFdVYTJSYVRDQWZ1eEZJbGopaE5sRiRrMCxzPVcyMlphSjBTTlk3c29Fc1VFamI2Z1E9PSxpPTQwOTY=";
    const C2S2: &str = "Yz1iaXdzLHI9ck9wck5HZndFYmVSV2diTkVrcU8laHZZRHBXVWEyUmFUQ0FmdXhGSWxqKWhObEYkazAscD1kSHpiWmFwV0lrNGpVaE4rVXRlOXl0YWc5empmTUhnc3FtbWl6N0FuZFZRPQ==";
    const S2C2: &str = "dj02cnJpVFJCaTIzV3BSUi93dHVwK21NaFVaVW4vZEI1bkxUSlJzamw5NUc0PQ==";

    #[test]
    fn client_reproduces_rfc_7677() {
        let mut c = ScramClient::with_nonce("user", b"pencil", None, "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.client_first(), unb64(C2S1));
        assert_eq!(c.client_final(&unb64(S2C1)).unwrap(), unb64(C2S2));
        let t = c.verify_server_final(&unb64(S2C2)).unwrap();
        assert_eq!(
            hex(t.client_key.expose()),
            "a60fc923d67e8644a92d16b96eda5ef4656b0c725c484374be25535576996e8b"
        );
    }

    #[test]
    fn server_side_recovery_matches_and_psk_vector() {
        let v = Verifier::derive(b"pencil", unb64("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096);
        let cf = ClientFirst::parse(&unb64(C2S1)).unwrap();
        assert_eq!(cf.username, "user");
        assert_eq!(cf.binding, Gs2Binding::None);
        let c2s2 = unb64(C2S2);
        let cf2 = ClientFinal::parse(&c2s2).unwrap();
        let (without_proof, proof) = (cf2.without_proof, cf2.proof);
        let sf = String::from_utf8(unb64(S2C1)).unwrap();
        let auth_message = format!("{},{sf},{without_proof}", cf.bare);
        let key = recover_client_key(&v.stored_key, &auth_message, &proof).unwrap();
        assert_eq!(
            hex(key.expose()),
            "a60fc923d67e8644a92d16b96eda5ef4656b0c725c484374be25535576996e8b"
        );
        let pubkey: [u8; 32] = unb64("YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=")
            .try_into()
            .unwrap();
        let binding = PskBinding {
            mech: "SCRAM-SHA-256",
            from: "sip:alice@a.example",
            to: "sip:bob@b.example",
            call_id: "a84b4c76e66710@pc33.a.example",
            pubkey: &pubkey,
            prefix: "2001:db8:456:1::/64",
        };
        assert_eq!(
            hex(&binding.digest()),
            "9373df842d9d77edd17d60ca0fd432974f11c2bebe8934fdc06c039493381c44"
        );
        let psk = derive_psk(
            &Transcript {
                auth_message,
                client_key: key,
            },
            &binding,
        );
        assert_eq!(
            hex(psk.expose()),
            "e5cfbd73548fb1364961ccbb03b1468ef19c8690c723a99302634d089c345b94"
        );
        assert!(v.check_password(b"pencil"));
        assert!(!v.check_password(b"pencil2"));
    }

    #[test]
    fn client_refuses_a_forged_server_final() {
        let mut c = ScramClient::with_nonce("user", b"pencil", None, "rOprNGfwEbeRWgbNEkqO");
        c.client_final(&unb64(S2C1)).unwrap();
        assert_eq!(
            c.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .unwrap_err(),
            ClientError::ServerSignature
        );
    }
}
