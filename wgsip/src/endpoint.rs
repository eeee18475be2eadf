//! `wgsip endpoint`: registers its AOR with the gateway (SASL, 401 flow), re-registers before
//! expiry, answers tunnel INVITEs by configuring the peer on its WireGuard interface, and
//! removes the peer on BYE.
//!
//! With several gateways (`sip.gateways`, a cluster) it keeps one flow through each, every
//! one registered with the same RFC 5627 instance and its own RFC 5626 `reg-id`, each served
//! by a thread of its own: the AOR stays reachable while any gateway lives, and a tunnel
//! offered through one flow is ended by a BYE on any.

// Status lines on standard output are this command's interface.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_auth::scram::ScramClient;
use gatehouse_auth::SaslParams;
use gatehouse_sip::wireguard::WgSdp;
use gatehouse_sip::{HeaderName, Message, Method};
use ipnet::IpNet;

use crate::config::Config;
use crate::config::Sip;
use crate::sipua::{hostport, respond, token, Ua};
use crate::site::{is_connection_error, lost, Connect, Site};
use crate::uapi::{Interface, PeerConfig};
use crate::{net, wgsdp};

/// A peer the endpoint configured for a dialog.
struct Active {
    public_key: [u8; 32],
    prefixes: Vec<IpNet>,
}

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let accept = cfg
        .accept
        .clone()
        .context("an endpoint configuration needs an [accept] table")?;
    let site = Site::open(&cfg, Connect::Later)?;
    let shared = Shared {
        instance: instance_id(&site.public),
        tag: token(),
        active: Mutex::new(HashMap::new()),
        site: &site,
        cfg: &cfg,
        accept: &accept,
    };
    let gateways = cfg.sip.gateway_list().len();
    let result = std::thread::scope(|s| {
        let flows: Vec<_> = (0..gateways)
            .map(|n| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("wgsip-flow-{}", n + 1))
                    .spawn_scoped(s, move || {
                        let r = keep_flow(shared, n);
                        if r.is_err() {
                            // A refusal is final for every flow: end the others too.
                            shared.site.stop();
                        }
                        r
                    })
            })
            .collect();
        flows
            .into_iter()
            .map(|f| {
                f.map_err(anyhow::Error::from).and_then(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a flow thread panicked")))
                })
            })
            .collect::<anyhow::Result<Vec<()>>>()
    });
    let active = shared.active.lock().unwrap_or_else(|p| p.into_inner());
    for a in active.values() {
        let _ = site.iface.remove_peer(&a.public_key);
    }
    result.map(|_| ())
}

/// What every flow's thread shares: the device (instance ID, its tag in dialogs), the
/// tunnels it set up (a BYE may come over another flow than the INVITE), the site.
struct Shared<'a> {
    instance: String,
    tag: String,
    active: Mutex<HashMap<String, Active>>,
    site: &'a Site,
    cfg: &'a Config,
    accept: &'a crate::config::Accept,
}

/// One flow: through gateway `n` (0-based), registered with `reg-id` n + 1, connected again
/// (and registered at once) whenever it breaks, until the endpoint stops.
fn keep_flow(shared: &Shared<'_>, n: usize) -> anyhow::Result<()> {
    let site = shared.site;
    let sip = shared.cfg.sip.for_gateway(n);
    let mut ua = site.connect(&sip)?;
    let mut flow = Flow {
        sip,
        reg_id: n as u32 + 1,
        call_id: format!("{}@wgsip", token()),
        from_tag: token(),
        cseq_base: 0,
        next_register: Instant::now(),
    };
    while !site.stopping() {
        match serve(shared, &ua, &mut flow) {
            Ok(()) => {}
            // The gateway went away (restart, network): connect again and register at once.
            // Peers already configured stay; their BYE arrives over the new flow (or another).
            Err(e) if is_connection_error(&e) && !site.stopping() => {
                eprintln!("wgsip: lost the gateway {}: {e:#}", ua.gateway);
                ua = site.connect(&flow.sip)?;
                flow.next_register = Instant::now();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The registration state of one flow.
struct Flow {
    /// The settings of this flow's gateway ([`Sip::for_gateway`]).
    sip: Sip,
    reg_id: u32,
    call_id: String,
    from_tag: String,
    cseq_base: u32,
    next_register: Instant,
}

/// Registers when due and handles one request from the gateway (or waits up to 250 ms).
fn serve(shared: &Shared<'_>, ua: &Ua, flow: &mut Flow) -> anyhow::Result<()> {
    let (cfg, site) = (shared.cfg, shared.site);
    let (password, public, iface) = (&site.password, &site.public, &site.iface);
    let next_register = &mut flow.next_register;
    if Instant::now() >= *next_register {
        let expires = register(
            ua,
            cfg,
            password,
            (&flow.call_id, &flow.from_tag, &shared.instance, flow.reg_id),
            &mut flow.cseq_base,
        )
        .map_err(lost)?;
        println!(
            "registered {} for {expires} s through {}",
            cfg.sip.aor, ua.gateway
        );
        // Refresh at half the granted time.
        *next_register = Instant::now() + Duration::from_secs(u64::from(expires.max(2)) / 2);
    }
    let wait = next_register
        .saturating_duration_since(Instant::now())
        .min(Duration::from_millis(250));
    let Some((msg, from)) = ua.recv(wait).map_err(lost)? else {
        return Ok(());
    };
    if !msg.is_request() {
        return Ok(());
    }
    // Requests for the dialog come back over the same flow (the TLS connection, or UDP).
    let contact = format!(
        "Contact: <sip:{}@{}{}>\r\n",
        cfg.sip.username,
        hostport(ua.local),
        ua.contact_params()
    );
    let tag = shared.tag.as_str();
    let reply = match msg.method() {
        Some(Method::Invite) => {
            let mut active = shared.active.lock().unwrap_or_else(|p| p.into_inner());
            answer_invite(
                &msg,
                cfg,
                shared.accept,
                iface,
                public,
                tag,
                &mut active,
                &contact,
            )
        }
        Some(Method::Bye) => {
            let gone = shared
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&msg.call_id().into_owned());
            if let Some(a) = gone {
                iface.remove_peer(&a.public_key)?;
                for p in &a.prefixes {
                    net::route_del(&iface.name, p);
                }
                println!("tunnel down: peer removed");
            }
            respond(&msg, 200, "OK", tag, "", "")
        }
        Some(Method::Ack) => return Ok(()),
        Some(Method::Options) => respond(&msg, 200, "OK", tag, "", ""),
        _ => respond(&msg, 501, "Not Implemented", tag, "", ""),
    };
    ua.send(&reply, reply_target(&msg, from)).map_err(lost)
}

/// Responses go to the source of the request (the gateway).
fn reply_target(_msg: &Message, from: SocketAddr) -> SocketAddr {
    from
}

/// The endpoint's RFC 5627 instance ID, derived from its WireGuard public key: the same
/// device across reconnections and restarts, so that the registrar replaces the binding of
/// a dead flow instead of keeping it beside the new one (RFC 5626 section 6).
fn instance_id(public: &[u8; 32]) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(public);
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "<urn:uuid:{}-{}-{}-{}-{}>",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn register(
    ua: &Ua,
    cfg: &Config,
    password: &str,
    (call_id, from_tag, instance, reg_id): (&str, &str, &str, u32),
    cseq_base: &mut u32,
) -> anyhow::Result<u32> {
    let domain = cfg.sip.aor.rsplit('@').next().unwrap_or("").to_owned();
    // Each attempt takes three CSeq numbers, used or not: a retried registration must not
    // repeat a number the registrar may have seen.
    let base = *cseq_base;
    *cseq_base += 3;
    let build = |cseq: u32, auth: Option<&SaslParams>| {
        let auth = auth
            .map(|p| format!("Authorization: {}\r\n", p.emit()))
            .unwrap_or_default();
        format!(
            "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/{t} {l};branch=z9hG4bK{b};rport\r\nMax-Forwards: 70\r\n\
From: <{aor}>;tag={from_tag}\r\nTo: <{aor}>\r\nCall-ID: {call_id}\r\nCSeq: {c} REGISTER\r\n\
Contact: <sip:{user}@{l}{cp}>;+sip.instance=\"{instance}\";reg-id={reg_id}\r\nExpires: {e}\r\n{auth}Content-Length: 0\r\n\r\n",
            l = hostport(ua.local),
            t = ua.transport(),
            cp = ua.contact_params(),
            b = token(),
            aor = cfg.sip.aor,
            c = cseq,
            user = cfg.sip.username,
            e = cfg.sip.expires,
        )
    };
    // Over TLS this is SCRAM-SHA-256-PLUS, bound to this connection (tls-exporter).
    let client = ScramClient::new(&cfg.sip.username, password.as_bytes(), ua.channel_binding());
    let (r, transcript) = ua.authenticate(&build, base + 1, client, false, &mut |_, _| {})?;
    if r.status() != Some(200) || transcript.is_none() {
        anyhow::bail!(
            "registration refused: {} {}",
            r.status().unwrap_or(0),
            r.reason().unwrap_or_default()
        );
    }
    let granted = r
        .list_values(HeaderName::Contact)
        .iter()
        .find_map(|c| {
            c.split("expires=")
                .nth(1)
                .and_then(|e| e.trim().parse::<u32>().ok())
        })
        .unwrap_or(cfg.sip.expires);
    Ok(granted)
}

/// The WireGuard offer of an INVITE, or the refusal (status, reason, extra headers).
///
/// Only an `application/sdp` body without a Content-Encoding is an offer: anything else is
/// refused with 415 before its bytes are read (a label must not decide how a body is read,
/// and no other label is valid for an offer).
fn read_offer(msg: &Message) -> Result<WgSdp, (u16, &'static str, String)> {
    let sdp_labelled = msg.value_of(HeaderName::ContentType).is_some_and(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/sdp")
    });
    let encoded = msg
        .value_of(HeaderName::ContentEncoding)
        .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
    if !sdp_labelled || encoded {
        return Err((
            415,
            "Unsupported Media Type",
            "Accept: application/sdp\r\nAccept-Encoding: identity\r\n".into(),
        ));
    }
    match WgSdp::parse(msg.body()) {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err((
            488,
            "Not Acceptable Here",
            "Warning: 399 wgsip \"not a WireGuard offer\"\r\n".into(),
        )),
        Err(e) => Err((
            488,
            "Not Acceptable Here",
            format!("Warning: 399 wgsip \"{e}\"\r\n"),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn answer_invite(
    msg: &Message,
    cfg: &Config,
    accept: &crate::config::Accept,
    iface: &Interface,
    public: &[u8; 32],
    tag: &str,
    active: &mut HashMap<String, Active>,
    contact: &str,
) -> String {
    let offer = match read_offer(msg) {
        Ok(o) => o,
        Err((status, reason, extra)) => return respond(msg, status, reason, tag, &extra, ""),
    };
    let Some(pskmth) = offer
        .pskmth
        .iter()
        .find(|m| accept.pskmth.contains(m))
        .cloned()
    else {
        return respond(
            msg,
            488,
            "Not Acceptable Here",
            tag,
            "Warning: 399 wgsip \"pskmth not accepted\"\r\n",
            "",
        );
    };
    if !offer
        .prefixes
        .iter()
        .all(|p| accept.prefixes.iter().any(|a| a.contains(p)))
    {
        return respond(
            msg,
            403,
            "Forbidden",
            tag,
            "Warning: 399 wgsip \"prefix not accepted\"\r\n",
            "",
        );
    }
    if let Some(why) = held_by_another(active, &msg.call_id(), &offer.pubkey, &offer.prefixes) {
        // Defence in depth: whatever the gateway allowed, a second tunnel never moves an
        // allowed-ip away from a live one nor replaces its peer (key, PSK, endpoint).
        eprintln!("refused a tunnel offer: {why}");
        return respond(
            msg,
            403,
            "Forbidden",
            tag,
            &format!("Warning: 399 wgsip \"{why}\"\r\n"),
            "",
        );
    }
    let psk: Option<[u8; 32]> = match pskmth.as_str() {
        "gateway" => match offer.psk().and_then(|k| k.try_into().ok()) {
            Some(k) => Some(k),
            None => {
                return respond(
                    msg,
                    488,
                    "Not Acceptable Here",
                    tag,
                    "Warning: 399 wgsip \"pskmth=gateway without psk\"\r\n",
                    "",
                )
            }
        },
        _ => None,
    };
    let peer = PeerConfig {
        public_key: offer.pubkey,
        preshared_key: psk,
        endpoint: Some(offer.endpoint()),
        allowed_ips: offer.prefixes.clone(),
    };
    if let Err(e) = iface.set(None, None, Some(&peer)) {
        eprintln!("cannot configure the peer: {e}");
        return respond(msg, 500, "Server Internal Error", tag, "", "");
    }
    for p in &offer.prefixes {
        if let Err(e) = net::route_add(&iface.name, p) {
            eprintln!("route: {e}");
        }
    }
    active.insert(
        msg.call_id().into_owned(),
        Active {
            public_key: offer.pubkey,
            prefixes: offer.prefixes.clone(),
        },
    );
    println!(
        "tunnel up: peer {} allowed-ips {} psk {}",
        offer.endpoint(),
        offer.prefix_text,
        if psk.is_some() { "yes" } else { "no" }
    );
    let body = wgsdp::body(
        cfg.wireguard.address,
        cfg.wireguard.listen_port,
        public,
        &cfg.wireguard.prefix,
        &pskmth,
        None,
    );
    respond(msg, 200, "OK", tag, contact, &body)
}

/// Why an offer for dialog `call_id` would take over another live tunnel of this endpoint:
/// its public key is that tunnel's peer, or one of its prefixes overlaps (either contains the
/// other) that tunnel's allowed-ips. The offer of the same dialog (a retransmitted INVITE) is
/// not another tunnel.
fn held_by_another(
    active: &HashMap<String, Active>,
    call_id: &str,
    public_key: &[u8; 32],
    prefixes: &[IpNet],
) -> Option<&'static str> {
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(b) || b.contains(a);
    for (id, a) in active {
        if id == call_id {
            continue;
        }
        if &a.public_key == public_key {
            return Some("public key held by another tunnel");
        }
        if prefixes
            .iter()
            .any(|p| a.prefixes.iter().any(|q| overlaps(p, q)))
        {
            return Some("prefix held by another tunnel");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_tunnel_never_takes_over_a_live_ones_key_or_prefix() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut active = HashMap::new();
        active.insert(
            "alice".to_owned(),
            Active {
                public_key: [1; 32],
                prefixes: vec![net("2001:db8:456:1::/64"), net("10.1.0.0/16")],
            },
        );
        let held =
            |call: &str, key: [u8; 32], p: &str| held_by_another(&active, call, &key, &[net(p)]);
        assert_eq!(
            held("bob", [2; 32], "2001:db8:456::/48"),
            Some("prefix held by another tunnel"),
            "a /48 around hers"
        );
        assert_eq!(
            held("bob", [2; 32], "10.1.2.0/24"),
            Some("prefix held by another tunnel")
        );
        assert_eq!(
            held("bob", [1; 32], "2001:db8:999::/48"),
            Some("public key held by another tunnel")
        );
        assert_eq!(
            held("bob", [2; 32], "2001:db8:456:2::/64"),
            None,
            "beside hers"
        );
        assert_eq!(
            held("alice", [1; 32], "2001:db8:456:1::/64"),
            None,
            "her own INVITE again"
        );
    }

    const OFFER: &str = "v=0\r\no=- 1 1 IN IP6 2001:db8:1::2\r\ns=-\r\nc=IN IP6 2001:db8:1::2\r\nt=0 0\r\n\
m=application 51820 udp vnd.wireguard\r\n\
a=fmtp:vnd.wireguard pubkey=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=;prefix=2001:db8:456:1::/64;pskmth=gateway;psk=YWl42m1t56sMAYKwGZUQZNuYG+AbdW9eE7KLj3KBT1M=\r\n";

    fn invite(content_type: Option<&str>, extra: &str) -> Message {
        let ct = content_type
            .map(|c| format!("Content-Type: {c}\r\n"))
            .unwrap_or_default();
        let text = format!(
            "INVITE sip:vpn@org.example SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:alice@partner.example>;tag=1\r\nTo: <sip:vpn@org.example>\r\nCall-ID: c1\r\n\
CSeq: 1 INVITE\r\nMax-Forwards: 70\r\n{ct}{extra}Content-Length: {}\r\n\r\n{OFFER}",
            OFFER.len()
        );
        Message::parse(text.into(), &gatehouse_sip::Limits::default()).unwrap()
    }

    #[test]
    fn only_application_sdp_is_an_offer() {
        assert!(read_offer(&invite(Some("application/sdp"), "")).is_ok());
        assert!(read_offer(&invite(Some("Application/SDP; charset=utf-8"), "")).is_ok());
        for (ct, extra) in [
            (Some("text/plain"), ""),
            (Some("multipart/mixed;boundary=b"), ""),
            (None, ""),
            (Some("application/sdp"), "Content-Encoding: gzip\r\n"),
        ] {
            let refused = read_offer(&invite(ct, extra)).unwrap_err();
            assert_eq!(refused.0, 415, "{ct:?} {extra:?}");
        }
    }
}
