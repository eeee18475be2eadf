//! `wgsip call`: offers a tunnel to an AOR through the gateway, authenticates with SCRAM,
//! verifies the gateway (server-final), derives the `scram` PSK, configures its WireGuard
//! peer from the answer, and hangs up with BYE on SIGINT/SIGTERM. With `[call] home_key` it
//! answers a challenge of another realm with SXOVER-PLUS sealed to its home (realm crossover,
//! `pskmth=xover`); calling a partner through its own gateway (federation) it does both in
//! turn: SCRAM with its gateway, then crossover for the partner's (docs/realm-crossover.md).

// Status lines on standard output are this command's interface.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::{bail, Context};
use gatehouse_auth::scram::{derive_psk, PskBinding, ScramClient};
use gatehouse_auth::xover::{self, derive_key, Facts, XoverClient};
use gatehouse_auth::SaslParams;
use gatehouse_sip::wireguard::WgSdp;
use gatehouse_sip::{HeaderName, Message, NameAddr};

use crate::config::Config;
use crate::sipua::{self, hostport, respond, token};
use crate::site::{is_connection_error, lost, Site};
use crate::uapi::PeerConfig;
use crate::{net, wgsdp};

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Test hook: use a wrong PSK locally (the tunnel must then stay dark).
    pub corrupt_psk: bool,
}

/// Calls through the gateways in order: the next one is tried when one cannot be reached or
/// does not answer the set-up (never once the call is up).
pub fn run(cfg: Config, target: &str, opts: &CallOptions) -> anyhow::Result<()> {
    let gateways = cfg.sip.gateway_list();
    for (n, gateway) in gateways.iter().enumerate() {
        let mut one = cfg.clone();
        one.sip = cfg.sip.for_gateway(n);
        match call(&one, target, opts) {
            Err(e) if is_connection_error(&e) && n + 1 < gateways.len() => {
                eprintln!("wgsip: gateway {gateway}: {e:#}; trying the next one");
            }
            r => return r,
        }
    }
    bail!("no gateway configured")
}

fn call(cfg: &Config, target: &str, opts: &CallOptions) -> anyhow::Result<()> {
    let site = Site::open(cfg, crate::site::Connect::Once)?;
    let ua = site.ua.as_ref().context("connected above")?;
    let (password, public, iface) = (&site.password, &site.public, &site.iface);

    let call_id = format!("{}@wgsip", token());
    let from_tag = token();
    let crossover = cfg.call.home_key.is_some();
    let pskmth = if crossover && cfg.call.pskmth == ["scram"] {
        "xover".to_owned()
    } else {
        cfg.call.pskmth.join(",")
    };
    let offer = wgsdp::body(
        cfg.wireguard.address,
        cfg.wireguard.listen_port,
        public,
        &cfg.wireguard.prefix,
        &pskmth,
        None,
    );
    let from = cfg.sip.aor.clone();
    let build = |cseq: u32, auth: Option<&SaslParams>| {
        let auth = auth
            .map(|p| format!("Proxy-Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        format!(
            "INVITE {target} SIP/2.0\r\nVia: SIP/2.0/{t} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n\
From: <{from}>;tag={from_tag}\r\nTo: <{target}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\n\
Contact: <sip:{user}@{l}{cp}>\r\n{auth}Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{offer}",
            l = hostport(ua.local),
            t = ua.transport(),
            cp = ua.contact_params(),
            b = token(),
            user = cfg.sip.username,
            len = offer.len(),
        )
    };
    // Realm crossover: authenticated by our own home, through this gateway (sealed, TLS only).
    let facts = Facts {
        foreign_domain: uri_host(target)?,
        call_id: call_id.clone(),
        from_tag: from_tag.clone(),
        from_aor: from.clone(),
        channel_binding: ua.channel_binding().unwrap_or_default(),
        offer_pubkey: public.to_vec(),
        offer_prefix: cfg.wireguard.prefix.to_string(),
    };
    // Who challenges decides how to answer: a gateway of our own realm gets SCRAM (over TLS
    // SCRAM-SHA-256-PLUS, bound to this connection with tls-exporter); a gateway of another
    // realm gets SXOVER-PLUS sealed to our home (realm crossover, TLS only). In a federation
    // both happen in turn: our own gateway first, then — its 407 relayed by ours — the
    // partner's (docs/realm-crossover.md, "Federation").
    let identity = cfg.call.identity.clone().unwrap_or_else(|| {
        format!(
            "{}@{}",
            cfg.sip.username,
            uri_host(&cfg.sip.aor).unwrap_or_default()
        )
    });
    let home_realm = identity.rsplit_once('@').map(|(_, r)| r.to_owned());
    let mut cseq = 1;
    let mut r = ua
        .transact(&build(cseq, None), cseq, &mut |_, _| {})
        .map_err(lost)?;
    let mut own: Option<gatehouse_auth::scram::Transcript> = None;
    let mut crossed: Option<xover::XoverSuccess> = None;
    while r.status() == Some(407) && crossed.is_none() {
        let realm = sipua::header(&r, "Proxy-Authenticate")
            .and_then(|h| SaslParams::parse(&h).ok())
            .and_then(|p| p.realm);
        let foreign = cfg.call.home_key.is_some() && realm != home_realm;
        if !foreign && own.is_none() {
            let client =
                ScramClient::new(&cfg.sip.username, password.as_bytes(), ua.channel_binding());
            // Until the call is answered, a gateway that cannot be reached lets the next one try.
            let (next, transcript) = ua
                .authenticate_from(r, &build, cseq + 1, client, true, &mut |_, _| {})
                .map_err(lost)?;
            (r, own, cseq) = (next, transcript, cseq + 2);
            if own.is_none() {
                break;
            }
        } else if let (true, Some(home_key)) = (foreign, &cfg.call.home_key) {
            let home_key = home_public_key(home_key)?;
            if ua.channel_binding().is_none() {
                bail!(
                    "realm crossover needs sip.transport = \"tls\" (the home checks this channel)"
                );
            }
            let start = || {
                #[allow(clippy::disallowed_methods)] // the caller draws its ephemeral key here
                let ikm: [u8; 32] = rand::random();
                XoverClient::start(
                    &home_key,
                    &identity,
                    password.as_bytes(),
                    facts.clone(),
                    ikm,
                    None,
                )
                .map_err(anyhow::Error::from)
            };
            let (next, success) = ua
                .authenticate_xover_from(r, &build, cseq + 1, &start, &mut |_, _| {})
                .map_err(lost)?;
            (r, crossed, cseq) = (next, success, cseq + 2);
            if crossed.is_none() {
                break;
            }
        } else {
            break;
        }
    }
    let ok = r;
    let auth = match (crossed, own) {
        (Some(x), _) => Some(Verified::Crossover(x)),
        (None, Some(t)) => Some(Verified::Scram(t)),
        (None, None) => None,
    };
    let status = ok.status().unwrap_or(0);
    if status != 200 {
        bail!("call refused: {status} {}", ok.reason().unwrap_or_default());
    }
    let auth = auth.context("the gateway (or the home) did not authenticate itself")?;
    let mechanism = match &auth {
        Verified::Scram(_) if ua.channel_binding().is_some() => "SCRAM-SHA-256-PLUS",
        Verified::Scram(_) => "SCRAM-SHA-256",
        Verified::Crossover(_) => xover::MECHANISM,
    }
    .to_owned();
    // ACK the 2xx along the route set before anything else.
    let route = route_set(&ok);
    let contact = ok
        .value_of(HeaderName::Contact)
        .and_then(|c| NameAddr::parse(&c).map(|n| n.uri.to_owned()))
        .context("2xx without Contact")?;
    let to = ok.value_of(HeaderName::To).unwrap_or_default().into_owned();
    let in_dialog = |method: &str, cseq: u32| {
        format!(
            "{method} {contact} SIP/2.0\r\nVia: SIP/2.0/{t} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n{route}\
From: <{from}>;tag={from_tag}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
            l = hostport(ua.local),
            t = ua.transport(),
            b = token(),
        )
    };
    ua.send(&in_dialog("ACK", cseq), ua.gateway)?;

    let answer = WgSdp::parse(ok.body())?.context("the answer is not a WireGuard SDP")?;
    if answer.psk().is_some() {
        bail!("the answer carries a psk: refusing it");
    }
    let chosen = answer
        .pskmth
        .first()
        .cloned()
        .unwrap_or_else(|| "none".into());
    let psk = match (chosen.as_str(), &auth) {
        ("xover", Verified::Crossover(ok)) => {
            let mut k = *derive_key(&ok.transcript, &facts).expose();
            if opts.corrupt_psk {
                k[0] ^= 0xff;
            }
            Some(k)
        }
        ("scram", Verified::Scram(transcript)) => {
            let binding = PskBinding {
                mech: &mechanism,
                from: &from,
                to: target,
                call_id: &call_id,
                pubkey: public,
                prefix: &cfg.wireguard.prefix.to_string(),
            };
            let mut k = *derive_psk(transcript, &binding).expose();
            if opts.corrupt_psk {
                k[0] ^= 0xff;
            }
            Some(k)
        }
        ("none", _) => None,
        (other, _) => bail!("unexpected pskmth {other} in the answer"),
    };
    let peer = PeerConfig {
        public_key: answer.pubkey,
        preshared_key: psk,
        endpoint: Some(answer.endpoint()),
        allowed_ips: answer.prefixes.clone(),
    };
    iface.set(None, None, Some(&peer))?;
    for p in &answer.prefixes {
        net::route_add(&iface.name, p)?;
    }
    println!(
        "tunnel up: peer {} endpoint {} allowed-ips {} psk {}",
        base64_key(&answer.pubkey),
        answer.endpoint(),
        answer.prefix_text,
        if psk.is_some() {
            format!("yes ({chosen})")
        } else {
            "no".into()
        }
    );
    match &auth {
        Verified::Crossover(ok) => println!(
            "authenticated as {} by its home with {mechanism}, key released to {}, server-final verified",
            ok.identity, ok.released_to
        ),
        Verified::Scram(_) => println!("authenticated with {mechanism}, server-final verified"),
    }

    // Keep the dialog until asked to hang up; answer a BYE from the other side.
    let mut hung_up_by_peer = false;
    while !site.stopping() {
        if let Some((m, from_addr)) = ua.recv(Duration::from_millis(250))? {
            if m.is_request() && m.method_text() == "BYE" {
                ua.send(&respond(&m, 200, "OK", &from_tag, "", ""), from_addr)?;
                hung_up_by_peer = true;
                break;
            }
        }
    }
    if !hung_up_by_peer {
        let r = ua.transact(&in_dialog("BYE", cseq + 1), cseq + 1, &mut |_, _| {})?;
        println!("hung up: {}", r.status().unwrap_or(0));
    }
    iface.remove_peer(&answer.pubkey)?;
    for p in &answer.prefixes {
        net::route_del(&iface.name, p);
    }
    println!("tunnel down");
    Ok(())
}

/// What authenticated the call: the gateway itself (SCRAM), or our home through it.
enum Verified {
    Scram(gatehouse_auth::scram::Transcript),
    Crossover(gatehouse_auth::xover::XoverSuccess),
}

/// The host of a SIP URI (or `<...>` name-addr), lower case.
fn uri_host(uri: &str) -> anyhow::Result<String> {
    let inner = uri.trim().trim_start_matches('<').trim_end_matches('>');
    let u =
        gatehouse_sip::Uri::parse(inner).map_err(|_| anyhow::anyhow!("not a SIP URI: {uri}"))?;
    Ok(u.host.trim_end_matches('.').to_ascii_lowercase())
}

fn home_public_key(b64: &str) -> anyhow::Result<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
        .context("call.home_key: base64 of a 32-byte key (gatehouse xover-key prints it)")
}

fn base64_key(k: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// `Route:` lines from a 2xx's Record-Route, reversed (RFC 3261 12.1.2).
fn route_set(ok: &Message) -> String {
    let rr = ok.list_values(HeaderName::RecordRoute);
    if rr.is_empty() {
        return String::new();
    }
    let reversed: Vec<String> = rr.into_iter().rev().collect();
    format!("Route: {}\r\n", reversed.join(", "))
}
