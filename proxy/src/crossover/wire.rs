//! The JSON of the relay (docs/realm-crossover.md, "The relay"): the facts a foreign gateway
//! reports with each round, and the home's success statement. Both are bounded (4096 bytes;
//! each field as in the tokens), unknown members are ignored, a missing or mistyped one is
//! an error. The `key` of a statement is a secret: it is never logged.

use std::net::IpAddr;

use base64::Engine;
use gatehouse_auth::xover::Facts;
use gatehouse_auth::Secret;

/// Largest JSON body either side accepts.
pub const BODY_MAX: usize = 4096;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The facts as a JSON object (the foreign domain is not in it: the home takes it from the
/// relaying gateway's certificate), with the caller's address as the relaying gateway sees it
/// (`client`: what the home's lockout counts, instead of the relaying gateway's own address).
pub fn facts_json(f: &Facts, client: Option<IpAddr>) -> String {
    let mut v = serde_json::json!({
        "call_id": f.call_id,
        "from_tag": f.from_tag,
        "from": f.from_aor,
        "cb": b64().encode(&f.channel_binding),
        "pubkey": b64().encode(&f.offer_pubkey),
        "prefix": f.offer_prefix,
    });
    if let (Some(ip), Some(o)) = (client, v.as_object_mut()) {
        o.insert("client".into(), serde_json::Value::String(ip.to_string()));
    }
    v.to_string()
}

fn text<'a>(v: &'a serde_json::Value, name: &'static str) -> Result<&'a str, &'static str> {
    v.get(name).and_then(|x| x.as_str()).ok_or(name)
}

/// Reads the facts a foreign gateway reported (foreign domain left empty) and the caller's
/// address it reported, if any (`client`; not an IP address: an error).
pub fn parse_facts(body: &[u8]) -> Result<(Facts, Option<IpAddr>), &'static str> {
    if body.len() > BODY_MAX {
        return Err("body too long");
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    if !v.is_object() {
        return Err("not an object");
    }
    let facts = Facts {
        foreign_domain: String::new(),
        call_id: text(&v, "call_id")?.to_owned(),
        from_tag: text(&v, "from_tag")?.to_owned(),
        from_aor: text(&v, "from")?.to_owned(),
        channel_binding: b64().decode(text(&v, "cb")?).map_err(|_| "cb")?,
        offer_pubkey: b64().decode(text(&v, "pubkey")?).map_err(|_| "pubkey")?,
        offer_prefix: text(&v, "prefix")?.to_owned(),
    };
    facts.check().map_err(|_| "a fact is too long")?;
    let client = match v.get("client") {
        None => None,
        Some(c) => Some(
            c.as_str()
                .and_then(|c| c.parse::<IpAddr>().ok())
                .ok_or("client")?,
        ),
    };
    Ok((facts, client))
}

/// The home's success statement.
#[derive(Debug)]
pub struct Statement {
    pub identity: String,
    pub released_to: String,
    pub key: Secret<[u8; 32]>,
}

pub fn statement_json(identity: &str, released_to: &str, key: &[u8; 32]) -> String {
    serde_json::json!({
        "identity": identity,
        "released_to": released_to,
        "key": b64().encode(key),
    })
    .to_string()
}

pub fn parse_statement(body: &[u8]) -> Result<Statement, &'static str> {
    if body.len() > BODY_MAX {
        return Err("body too long");
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    let identity = text(&v, "identity")?;
    let released_to = text(&v, "released_to")?;
    if identity.len() > 512 || released_to.len() > 253 {
        return Err("a field is too long");
    }
    let key = b64().decode(text(&v, "key")?).map_err(|_| "key")?;
    let key: [u8; 32] = key.as_slice().try_into().map_err(|_| "key length")?;
    Ok(Statement {
        identity: identity.to_owned(),
        released_to: released_to.to_owned(),
        key: Secret::new(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            foreign_domain: String::new(),
            call_id: "c@x".into(),
            from_tag: "t".into(),
            from_aor: "sip:bob@partner.example".into(),
            channel_binding: vec![3; 32],
            offer_pubkey: vec![4; 32],
            offer_prefix: "2001:db8::/64".into(),
        }
    }

    #[test]
    fn facts_and_statements_round_trip_and_bad_ones_are_named() {
        assert_eq!(
            parse_facts(facts_json(&facts(), None).as_bytes()).unwrap(),
            (facts(), None)
        );
        let client: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            parse_facts(facts_json(&facts(), Some(client)).as_bytes()).unwrap(),
            (facts(), Some(client))
        );
        let bad = facts_json(&facts(), None).replacen('{', "{\"client\":\"nowhere\",", 1);
        assert_eq!(parse_facts(bad.as_bytes()).unwrap_err(), "client");
        let s = parse_statement(
            statement_json("bob@partner.example", "org.example", &[9; 32]).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            (s.identity.as_str(), s.key.expose()),
            ("bob@partner.example", &[9; 32])
        );
        assert_eq!(parse_facts(b"[]").unwrap_err(), "not an object");
        assert_eq!(parse_facts(b"{\"call_id\":1}").unwrap_err(), "call_id");
        let long = facts_json(
            &Facts {
                call_id: "x".repeat(2000),
                ..facts()
            },
            None,
        );
        assert_eq!(
            parse_facts(long.as_bytes()).unwrap_err(),
            "a fact is too long"
        );
        assert_eq!(
            parse_facts(&vec![b' '; BODY_MAX + 1]).unwrap_err(),
            "body too long"
        );
        assert_eq!(
            parse_statement(b"{\"identity\":\"a\",\"released_to\":\"b\",\"key\":\"AAAA\"}")
                .unwrap_err(),
            "key length"
        );
    }
}
