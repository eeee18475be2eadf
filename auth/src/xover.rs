//! Realm crossover, `SXOVER-PLUS` (docs/realm-crossover.md), sans-IO.
//!
//! A caller authenticates with SCRAM-SHA-256 against its **home** realm through a **foreign**
//! gateway that relays ciphertext only. This module is the whole wire protocol:
//!
//! - token framing ([`Token::parse`]: strict, bounded, never panics; a fuzz target drives it);
//! - the seal: HPKE (RFC 9180, X25519 / HKDF-SHA256 / ChaCha20Poly1305) for the first token,
//!   then ChaCha20Poly1305 under keys exported from that context, one per direction, with
//!   sequence numbers that must come in order ([`Channel`]);
//! - the facts the caller seals and the foreign gateway reports ([`Facts`]);
//! - the caller's state machine ([`XoverClient`]), the home's opening of a first token
//!   ([`HomeKeys::open_first`]) and its sealing of answers;
//! - the tunnel key (`pskmth=xover`, [`derive_key`]).
//!
//! The home's SCRAM runs in [`crate::SaslServer`] like any local exchange; this module only
//! carries its messages. Nothing here reads a clock or a global generator: the caller's
//! ephemeral key material is an argument.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};

use crate::scram::{ClientError, ScramClient, Transcript};
use crate::secret::Secret;

type Kem = X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type HpkeAead = hpke::aead::ChaCha20Poly1305;

/// The mechanism name (offered in the 407 next to SCRAM, on TLS only).
pub const MECHANISM: &str = "SXOVER-PLUS";
/// Longest field of any plaintext or fact.
pub const FIELD_MAX: usize = 1024;
/// Longest token (base64-decoded).
pub const TOKEN_MAX: usize = 8 * FIELD_MAX + 128;
const MAGIC: &[u8; 2] = b"SX";
const VERSION: u8 = 1;
const AEAD_TAG: usize = 16;

/// Why a token or a step failed. Peers only ever see a generic refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XoverError {
    #[error("crossover token malformed: {0}")]
    Malformed(&'static str),
    #[error("crossover token for another realm")]
    WrongRealm,
    #[error("crossover token sealed to an unknown home key")]
    UnknownKey,
    #[error("crossover token does not open")]
    Seal,
    #[error("crossover token out of sequence")]
    Sequence,
    #[error("sealed facts differ from the relayed ones ({0})")]
    Facts(&'static str),
    #[error("SCRAM inside the crossover failed")]
    Scram,
    #[error("home's answer names another identity or foreign domain")]
    Statement,
}

impl XoverError {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            XoverError::Malformed(_) => "malformed",
            XoverError::WrongRealm => "wrong_realm",
            XoverError::UnknownKey => "unknown_key",
            XoverError::Seal => "seal",
            XoverError::Sequence => "sequence",
            XoverError::Facts(_) => "facts",
            XoverError::Scram => "scram",
            XoverError::Statement => "statement",
        }
    }
}

/// Token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClientFirst = 1,
    ClientNext = 2,
    HomeNext = 3,
    HomeFinal = 4,
}

/// A framed token, borrowed from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token<'a> {
    First {
        realm: &'a str,
        kid: [u8; 8],
        enc: [u8; 32],
        /// Everything before the ciphertext: the associated data.
        header: &'a [u8],
        ct: &'a [u8],
    },
    Next {
        kind: Kind,
        seq: u8,
        header: &'a [u8],
        ct: &'a [u8],
    },
}

/// A realm as the protocol accepts it: 1 to 253 bytes of lower-case letters, digits, `-`, `.`.
pub fn valid_realm(realm: &str) -> bool {
    (1..=253).contains(&realm.len())
        && realm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !realm.starts_with('.')
        && !realm.ends_with('.')
        && !realm.contains("..")
}

impl<'a> Token<'a> {
    /// Frames a token (base64-decoded bytes). Checks lengths and grammar, not the seal.
    pub fn parse(b: &'a [u8]) -> Result<Token<'a>, XoverError> {
        if b.len() > TOKEN_MAX {
            return Err(XoverError::Malformed("too long"));
        }
        if b.len() < 4 || &b[..2] != MAGIC {
            return Err(XoverError::Malformed("magic"));
        }
        if b[2] != VERSION {
            return Err(XoverError::Malformed("version"));
        }
        let kind = match b[3] {
            1 => Kind::ClientFirst,
            2 => Kind::ClientNext,
            3 => Kind::HomeNext,
            4 => Kind::HomeFinal,
            _ => return Err(XoverError::Malformed("type")),
        };
        if kind == Kind::ClientFirst {
            let realm_len = *b.get(4).ok_or(XoverError::Malformed("realm"))? as usize;
            let realm_end = 5 + realm_len;
            let header_end = realm_end + 8 + 32;
            if b.len() < header_end + AEAD_TAG {
                return Err(XoverError::Malformed("length"));
            }
            let realm = std::str::from_utf8(&b[5..realm_end])
                .ok()
                .filter(|r| valid_realm(r))
                .ok_or(XoverError::Malformed("realm"))?;
            let mut kid = [0u8; 8];
            kid.copy_from_slice(&b[realm_end..realm_end + 8]);
            let mut enc = [0u8; 32];
            enc.copy_from_slice(&b[realm_end + 8..header_end]);
            return Ok(Token::First {
                realm,
                kid,
                enc,
                header: &b[..header_end],
                ct: &b[header_end..],
            });
        }
        if b.len() < 5 + AEAD_TAG {
            return Err(XoverError::Malformed("length"));
        }
        Ok(Token::Next {
            kind,
            seq: b[4],
            header: &b[..5],
            ct: &b[5..],
        })
    }

    /// The realm a client-first token names (what the foreign gateway relays by).
    pub fn realm(&self) -> Option<&'a str> {
        match self {
            Token::First { realm, .. } => Some(realm),
            Token::Next { .. } => None,
        }
    }
}

fn put_lp(out: &mut Vec<u8>, x: &[u8]) {
    out.extend_from_slice(&(x.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(x);
}

/// Reads `lp` fields in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<&'a [u8], XoverError> {
        if self.0.len() < 2 {
            return Err(XoverError::Malformed("field length"));
        }
        let n = u16::from_be_bytes([self.0[0], self.0[1]]) as usize;
        if n > FIELD_MAX || self.0.len() < 2 + n {
            return Err(XoverError::Malformed("field"));
        }
        let (x, rest) = self.0[2..].split_at(n);
        self.0 = rest;
        Ok(x)
    }

    fn text(&mut self) -> Result<String, XoverError> {
        std::str::from_utf8(self.next()?)
            .map(str::to_owned)
            .map_err(|_| XoverError::Malformed("field text"))
    }

    fn end(self) -> Result<(), XoverError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(XoverError::Malformed("trailing bytes"))
        }
    }
}

/// What a crossover exchange is bound to: sealed by the caller, reported by the foreign
/// gateway, compared by the home.
#[derive(Clone, PartialEq, Eq)]
pub struct Facts {
    /// The domain the caller sends its INVITE to (whom the key is released to).
    pub foreign_domain: String,
    pub call_id: String,
    pub from_tag: String,
    /// The From addr-spec.
    pub from_aor: String,
    /// RFC 9266 tls-exporter of the caller's connection with the foreign gateway.
    pub channel_binding: Vec<u8>,
    /// The offer's 32-byte WireGuard key (empty without an offer).
    pub offer_pubkey: Vec<u8>,
    /// The offer's `prefix` text (empty without an offer).
    pub offer_prefix: String,
}

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("foreign_domain", &self.foreign_domain)
            .field("from_aor", &self.from_aor)
            .field("offer_prefix", &self.offer_prefix)
            .finish_non_exhaustive()
    }
}

impl Facts {
    fn encode(&self, out: &mut Vec<u8>) {
        put_lp(out, self.foreign_domain.as_bytes());
        put_lp(out, self.call_id.as_bytes());
        put_lp(out, self.from_tag.as_bytes());
        put_lp(out, self.from_aor.as_bytes());
        put_lp(out, &self.channel_binding);
        put_lp(out, &self.offer_pubkey);
        put_lp(out, self.offer_prefix.as_bytes());
    }

    fn decode(f: &mut Fields<'_>) -> Result<Facts, XoverError> {
        Ok(Facts {
            foreign_domain: f.text()?,
            call_id: f.text()?,
            from_tag: f.text()?,
            from_aor: f.text()?,
            channel_binding: f.next()?.to_vec(),
            offer_pubkey: f.next()?.to_vec(),
            offer_prefix: f.text()?,
        })
    }

    /// Checks that every field is within bounds (what a relay or a caller may send).
    pub fn check(&self) -> Result<(), XoverError> {
        let texts = [
            &self.foreign_domain,
            &self.call_id,
            &self.from_tag,
            &self.from_aor,
            &self.offer_prefix,
        ];
        if texts.iter().any(|t| t.len() > FIELD_MAX) || self.channel_binding.len() > 64 {
            return Err(XoverError::Malformed("fact too long"));
        }
        if !(self.offer_pubkey.is_empty() || self.offer_pubkey.len() == 32) {
            return Err(XoverError::Malformed("offer key"));
        }
        Ok(())
    }

    /// The home's comparison of the sealed facts with the relayed ones (the channel binding
    /// in constant time). Names the first field that differs, for the home's log.
    pub fn agree(&self, relayed: &Facts) -> Result<(), XoverError> {
        let pairs: [(&[u8], &[u8], &'static str); 6] = [
            (
                self.call_id.as_bytes(),
                relayed.call_id.as_bytes(),
                "call-id",
            ),
            (
                self.from_tag.as_bytes(),
                relayed.from_tag.as_bytes(),
                "from-tag",
            ),
            (
                self.from_aor.as_bytes(),
                relayed.from_aor.as_bytes(),
                "from",
            ),
            (&self.offer_pubkey, &relayed.offer_pubkey, "pubkey"),
            (
                self.offer_prefix.as_bytes(),
                relayed.offer_prefix.as_bytes(),
                "prefix",
            ),
            (
                self.foreign_domain.as_bytes(),
                relayed.foreign_domain.as_bytes(),
                "foreign-domain",
            ),
        ];
        for (a, b, name) in pairs {
            if a != b {
                return Err(XoverError::Facts(name));
            }
        }
        if !crate::scram::constant_time_eq(&self.channel_binding, &relayed.channel_binding) {
            return Err(XoverError::Facts("channel-binding"));
        }
        Ok(())
    }
}

/// The key id of a home public key: the first 8 bytes of its SHA-256.
pub fn kid(public: &[u8; 32]) -> [u8; 8] {
    let d = Sha256::digest(public);
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    k
}

fn info(realm: &str) -> Vec<u8> {
    let mut i = b"gatehouse sxover v1".to_vec();
    put_lp(&mut i, realm.as_bytes());
    i
}

fn nonce(seq: u8) -> Nonce {
    let mut n = [0u8; 12];
    n[11] = seq;
    Nonce::from(n)
}

/// The two directions' keys and sequence numbers of one exchange.
pub struct Channel {
    c2h: Secret<[u8; 32]>,
    h2c: Secret<[u8; 32]>,
    next_c2h: u8,
    next_h2c: u8,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("next_c2h", &self.next_c2h)
            .field("next_h2c", &self.next_h2c)
            .finish_non_exhaustive()
    }
}

impl Channel {
    fn from_export(keys: &[u8; 64]) -> Channel {
        let mut c2h = [0u8; 32];
        let mut h2c = [0u8; 32];
        c2h.copy_from_slice(&keys[..32]);
        h2c.copy_from_slice(&keys[32..]);
        Channel {
            c2h: Secret::new(c2h),
            h2c: Secret::new(h2c),
            next_c2h: 1,
            next_h2c: 0,
        }
    }

    fn seal(key: &[u8; 32], kind: Kind, seq: u8, fields: &[&[u8]]) -> Result<Vec<u8>, XoverError> {
        let header = [MAGIC[0], MAGIC[1], VERSION, kind as u8, seq];
        let mut pt = Vec::new();
        for f in fields {
            put_lp(&mut pt, f);
        }
        let cipher = ChaCha20Poly1305::new(key.into());
        let ct = cipher
            .encrypt(
                &nonce(seq),
                Payload {
                    msg: &pt,
                    aad: &header,
                },
            )
            .map_err(|_| XoverError::Seal)?;
        let mut out = header.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open(key: &[u8; 32], token: &[u8], kind: Kind, seq: u8) -> Result<Vec<u8>, XoverError> {
        match Token::parse(token)? {
            Token::Next {
                kind: k,
                seq: s,
                header,
                ct,
            } if k == kind => {
                if s != seq {
                    return Err(XoverError::Sequence);
                }
                let cipher = ChaCha20Poly1305::new(key.into());
                cipher
                    .decrypt(
                        &nonce(s),
                        Payload {
                            msg: ct,
                            aad: header,
                        },
                    )
                    .map_err(|_| XoverError::Seal)
            }
            _ => Err(XoverError::Malformed("token type")),
        }
    }

    fn bump(n: &mut u8) -> Result<u8, XoverError> {
        let seq = *n;
        *n = n.checked_add(1).ok_or(XoverError::Sequence)?;
        Ok(seq)
    }

    /// Home: seals a SCRAM server-first for the caller.
    pub fn seal_home_next(&mut self, server_first: &[u8]) -> Result<Vec<u8>, XoverError> {
        let seq = Self::bump(&mut self.next_h2c)?;
        Self::seal(self.h2c.expose(), Kind::HomeNext, seq, &[server_first])
    }

    /// Home: seals the server-final and the statement of what was released to whom.
    pub fn seal_home_final(
        &mut self,
        server_final: &[u8],
        identity: &str,
        released_to: &str,
    ) -> Result<Vec<u8>, XoverError> {
        let seq = Self::bump(&mut self.next_h2c)?;
        Self::seal(
            self.h2c.expose(),
            Kind::HomeFinal,
            seq,
            &[server_final, identity.as_bytes(), released_to.as_bytes()],
        )
    }

    /// Home: opens a client-next token (the SCRAM client-final).
    pub fn open_client_next(&mut self, token: &[u8]) -> Result<Vec<u8>, XoverError> {
        let pt = Self::open(self.c2h.expose(), token, Kind::ClientNext, self.next_c2h)?;
        Self::bump(&mut self.next_c2h)?;
        let mut f = Fields(&pt);
        let client_final = f.next()?.to_vec();
        f.end()?;
        Ok(client_final)
    }

    fn seal_client_next(&mut self, client_final: &[u8]) -> Result<Vec<u8>, XoverError> {
        let seq = Self::bump(&mut self.next_c2h)?;
        Self::seal(self.c2h.expose(), Kind::ClientNext, seq, &[client_final])
    }

    fn open_home(&mut self, token: &[u8], kind: Kind) -> Result<Vec<u8>, XoverError> {
        let pt = Self::open(self.h2c.expose(), token, kind, self.next_h2c)?;
        Self::bump(&mut self.next_h2c)?;
        Ok(pt)
    }
}

/// A home's key pair (X25519), by the kid that names it.
pub struct HomeKey {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
    kid: [u8; 8],
}

impl std::fmt::Debug for HomeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeKey")
            .field("public", &base64_std(&self.public))
            .finish_non_exhaustive()
    }
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl HomeKey {
    /// From the 32 private bytes (as stored in the home's key file).
    pub fn from_private(bytes: &[u8; 32]) -> Result<HomeKey, XoverError> {
        let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| XoverError::Malformed("private key"))?;
        let pk = Kem::sk_to_pk(&private);
        let mut public = [0u8; 32];
        public.copy_from_slice(&pk.to_bytes());
        Ok(HomeKey {
            private,
            kid: kid(&public),
            public,
        })
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn kid(&self) -> [u8; 8] {
        self.kid
    }
}

/// What a home learns from a client-first that opened.
#[derive(Debug)]
pub struct OpenedFirst {
    pub channel: Channel,
    pub facts: Facts,
    /// The SCRAM client-first (GS2 header `n,,` required by the caller of this function).
    pub scram_client_first: Vec<u8>,
}

/// A home realm's key pairs: the current one and, during a rotation, the previous one.
#[derive(Debug)]
pub struct HomeKeys {
    pub realm: String,
    pub keys: Vec<HomeKey>,
}

impl HomeKeys {
    /// Opens a client-first token sealed to one of these keys.
    pub fn open_first(&self, token: &[u8]) -> Result<OpenedFirst, XoverError> {
        let Token::First {
            realm,
            kid,
            enc,
            header,
            ct,
        } = Token::parse(token)?
        else {
            return Err(XoverError::Malformed("token type"));
        };
        if realm != self.realm {
            return Err(XoverError::WrongRealm);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(XoverError::UnknownKey)?;
        let enc =
            <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc).map_err(|_| XoverError::Seal)?;
        let mut ctx = hpke::setup_receiver::<HpkeAead, Kdf, Kem>(
            &OpModeR::Base,
            &key.private,
            &enc,
            &info(realm),
        )
        .map_err(|_| XoverError::Seal)?;
        let pt = ctx.open(ct, header).map_err(|_| XoverError::Seal)?;
        let mut keys = [0u8; 64];
        ctx.export(b"sxover v1 channel", &mut keys)
            .map_err(|_| XoverError::Seal)?;
        let channel = Channel::from_export(&keys);
        keys.fill(0);
        let mut f = Fields(&pt);
        let facts = Facts::decode(&mut f)?;
        let scram_client_first = f.next()?.to_vec();
        f.end()?;
        facts.check()?;
        if !scram_client_first.starts_with(b"n,,") {
            return Err(XoverError::Scram);
        }
        Ok(OpenedFirst {
            channel,
            facts,
            scram_client_first,
        })
    }
}

/// 32 bytes of key material handed to HPKE as its "random" source: the caller draws them
/// from the operating system; tests and vectors fix them.
struct Ikm([u8; 32], usize);

impl hpke::rand_core::RngCore for Ikm {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            *d = self.0[self.1 % 32];
            self.1 += 1;
        }
    }
}
impl hpke::rand_core::CryptoRng for Ikm {}

impl Drop for Ikm {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// What the caller knows once the home's final statement verified.
#[derive(Debug)]
pub struct XoverSuccess {
    pub identity: String,
    pub released_to: String,
    pub transcript: Transcript,
}

enum ClientState {
    SentFirst,
    SentNext,
    Done,
}

/// The caller's side of one exchange.
pub struct XoverClient {
    realm: String,
    identity: String,
    facts: Facts,
    scram: ScramClient,
    channel: Channel,
    state: ClientState,
}

impl std::fmt::Debug for XoverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XoverClient")
            .field("realm", &self.realm)
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

impl XoverClient {
    /// Starts an exchange as `user@realm`, sealed to the home's `home_public` key. `ikm`: 32
    /// fresh random bytes (the HPKE ephemeral key). Returns the client-first token.
    pub fn start(
        home_public: &[u8; 32],
        identity: &str,
        password: &[u8],
        facts: Facts,
        ikm: [u8; 32],
        scram_nonce: Option<&str>,
    ) -> Result<(XoverClient, Vec<u8>), XoverError> {
        let (user, realm) = identity
            .rsplit_once('@')
            .ok_or(XoverError::Malformed("identity"))?;
        if !valid_realm(realm) || user.is_empty() {
            return Err(XoverError::Malformed("identity"));
        }
        facts.check()?;
        let scram = match scram_nonce {
            Some(n) => ScramClient::with_nonce(user, password, None, n),
            None => ScramClient::new(user, password, None),
        };
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(home_public)
            .map_err(|_| XoverError::Malformed("home key"))?;
        let mut rng = Ikm(ikm, 0);
        let (enc, mut ctx) = hpke::setup_sender::<HpkeAead, Kdf, Kem, _>(
            &OpModeS::Base,
            &pk,
            &info(realm),
            &mut rng,
        )
        .map_err(|_| XoverError::Seal)?;
        let mut header = vec![MAGIC[0], MAGIC[1], VERSION, Kind::ClientFirst as u8];
        header.push(realm.len() as u8);
        header.extend_from_slice(realm.as_bytes());
        header.extend_from_slice(&kid(home_public));
        header.extend_from_slice(&enc.to_bytes());
        let mut pt = Vec::new();
        facts.encode(&mut pt);
        put_lp(&mut pt, &scram.client_first());
        let ct = ctx.seal(&pt, &header).map_err(|_| XoverError::Seal)?;
        let mut keys = [0u8; 64];
        ctx.export(b"sxover v1 channel", &mut keys)
            .map_err(|_| XoverError::Seal)?;
        let channel = Channel::from_export(&keys);
        keys.fill(0);
        let mut token = header;
        token.extend_from_slice(&ct);
        Ok((
            XoverClient {
                realm: realm.to_owned(),
                identity: identity.to_owned(),
                facts,
                scram,
                channel,
                state: ClientState::SentFirst,
            },
            token,
        ))
    }

    /// The home realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Consumes the home-next token (server-first); returns the client-next token.
    pub fn step(&mut self, home_next: &[u8]) -> Result<Vec<u8>, XoverError> {
        if !matches!(self.state, ClientState::SentFirst) {
            return Err(XoverError::Sequence);
        }
        let pt = self.channel.open_home(home_next, Kind::HomeNext)?;
        let mut f = Fields(&pt);
        let server_first = f.next()?;
        f.end()?;
        let client_final = self
            .scram
            .client_final(server_first)
            .map_err(|_| XoverError::Scram)?;
        self.state = ClientState::SentNext;
        self.channel.seal_client_next(&client_final)
    }

    /// Consumes the home-final token: the server-final must verify, and the statement must
    /// name this caller and the foreign domain it sealed.
    pub fn finish(&mut self, home_final: &[u8]) -> Result<XoverSuccess, XoverError> {
        if !matches!(self.state, ClientState::SentNext) {
            return Err(XoverError::Sequence);
        }
        self.state = ClientState::Done;
        let pt = self.channel.open_home(home_final, Kind::HomeFinal)?;
        let mut f = Fields(&pt);
        let server_final = f.next()?;
        let identity = f.text()?;
        let released_to = f.text()?;
        f.end()?;
        let transcript =
            self.scram
                .verify_server_final(server_final)
                .map_err(|e: ClientError| match e {
                    ClientError::ServerSignature => XoverError::Scram,
                    _ => XoverError::Scram,
                })?;
        if identity != self.identity || released_to != self.facts.foreign_domain {
            return Err(XoverError::Statement);
        }
        Ok(XoverSuccess {
            identity,
            released_to,
            transcript,
        })
    }

    /// The facts this exchange is bound to.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }
}

/// bind = SHA-256(lp("sxover-key-bind-v1") || lp(foreign-domain) || lp(call-id) || lp(from-aor)
///                || lp(offer-pubkey) || lp(offer-prefix)).
pub fn key_binding(facts: &Facts) -> [u8; 32] {
    let mut b = Vec::new();
    for x in [
        b"sxover-key-bind-v1".as_slice(),
        facts.foreign_domain.as_bytes(),
        facts.call_id.as_bytes(),
        facts.from_aor.as_bytes(),
        &facts.offer_pubkey,
        facts.offer_prefix.as_bytes(),
    ] {
        put_lp(&mut b, x);
    }
    Sha256::digest(&b).into()
}

/// key = HKDF-SHA-256(salt = SHA-256(AuthMessage), IKM = ClientKey,
///                    info = "sxover tunnel key v1" || bind, L = 32).
pub fn derive_key(transcript: &Transcript, facts: &Facts) -> Secret<[u8; 32]> {
    let salt: [u8; 32] = Sha256::digest(transcript.auth_message.as_bytes()).into();
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), transcript.client_key.expose());
    let mut info = b"sxover tunnel key v1".to_vec();
    info.extend_from_slice(&key_binding(facts));
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF length");
    Secret::new(okm)
}

/// The foreign gateway's acceptance of a home's success answer: the home of `realm` vouches
/// for `identity` only if it is one of that realm's (`user@realm`), presenting a From AOR of
/// that realm; the key must have been released to one of `our_domains`, the one the facts
/// (as this gateway reported them) name. Only then is there an [`Authenticated`] proof.
pub fn accept_release(
    realm: &str,
    our_domains: &[String],
    facts: Facts,
    identity: &str,
    released_to: &str,
    key: [u8; 32],
) -> Result<crate::Authenticated, XoverError> {
    let key = Secret::new(key);
    let user = identity
        .strip_suffix(realm)
        .and_then(|u| u.strip_suffix('@'))
        .filter(|u| !u.is_empty() && !u.contains('@'))
        .ok_or(XoverError::Statement)?;
    let _ = user;
    let aor_host = facts.from_aor.rsplit_once('@').map(|(_, h)| {
        h.split([':', ';', '>'])
            .next()
            .unwrap_or(h)
            .to_ascii_lowercase()
    });
    if aor_host.as_deref() != Some(realm) {
        return Err(XoverError::Statement);
    }
    if !released_to.eq_ignore_ascii_case(&facts.foreign_domain)
        || !our_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(released_to))
    {
        return Err(XoverError::Statement);
    }
    let aor = facts.from_aor.clone();
    Ok(crate::Authenticated::crossed(
        identity.to_owned(),
        aor,
        crate::Crossed {
            realm: realm.to_owned(),
            key,
            facts,
        },
    ))
}

pub mod home;
pub use home::{HomeFailure, HomeOutcome, HomeReason, Relayed, XoverHome};

#[cfg(test)]
mod tests;
