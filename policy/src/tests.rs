//! Table-driven decisions.

use super::*;

const POLICY: &str = r#"
org_prefixes = ["2001:db8:789::/48", "10.0.0.0/8"]

[limits]
max_tunnels = 10

[[rule]]
name = "blocked"
kind = "any"
action = "deny"
callers = ["sip:mallory@partner.example"]

[[rule]]
name = "partners"
kind = "tunnel"
callers = ["*@partner.example"]
targets = ["sip:vpn@org.example"]
mechanisms = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
pskmth = ["scram", "none"]
prefixes = ["2001:db8:456::/48", "192.0.2.0/24"]
max_tunnels_per_identity = 2
max_tunnels_per_target = 5

[[rule]]
name = "strict"
kind = "tunnel"
callers = ["*@strict.example"]
targets = ["sip:vpn@org.example"]
mechanisms = ["SCRAM-SHA-256-PLUS"]
require_tls = true
require_psk = true

[[rule]]
name = "open"
kind = "tunnel"
callers = ["realm:org.example"]
targets = ["sip:open@org.example"]

[[rule]]
name = "messages"
kind = "method"
methods = ["MESSAGE"]
callers = ["any"]

[[rule]]
name = "infrastructure"
kind = "any"
callers = ["trusted"]
"#;

fn policy() -> Policy {
    Policy::parse(POLICY, "policy.toml").unwrap()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

struct Case {
    name: &'static str,
    caller: Caller<'static>,
    tls: bool,
    to: &'static str,
    prefixes: &'static [&'static str],
    pskmth: &'static [&'static str],
    scram: bool,
    kind: &'static str,
    counts: Counts,
    expect: Result<Option<&'static str>, Denied>,
}

fn alice(mechanism: &'static str) -> Caller<'static> {
    Caller::Authenticated {
        aor: "sip:alice@partner.example",
        realm: "org.example",
        mechanism,
        crossover: None,
    }
}

fn c(name: &'static str) -> Case {
    Case {
        name,
        caller: alice("SCRAM-SHA-256"),
        tls: false,
        to: "sip:vpn@org.example",
        prefixes: &["2001:db8:456:1::/64"],
        pskmth: &["scram", "none"],
        scram: true,
        kind: "tunnel",
        counts: Counts::default(),
        expect: Ok(Some("scram")),
    }
}

#[test]
fn decisions() {
    let cases = vec![
        c("allowed with scram first"),
        Case {
            pskmth: &["none"],
            expect: Ok(Some("none")),
            ..c("caller wants no psk")
        },
        Case {
            scram: false,
            expect: Ok(Some("none")),
            ..c("scram impossible without a SCRAM exchange")
        },
        Case {
            prefixes: &["192.0.2.0/25"],
            ..c("ipv4 prefix inside the allowed one")
        },
        Case {
            prefixes: &["2001:db8:999::/64"],
            expect: Err(Denied::Prefix),
            ..c("prefix outside the rule")
        },
        Case {
            prefixes: &["2001:db8:789:1::/64"],
            expect: Err(Denied::OrgPrefix),
            ..c("more specific org prefix")
        },
        Case {
            prefixes: &["2001:db8::/32"],
            expect: Err(Denied::OrgPrefix),
            ..c("covering the org prefix")
        },
        Case {
            prefixes: &["10.1.0.0/16"],
            expect: Err(Denied::OrgPrefix),
            ..c("ipv4 org overlap")
        },
        Case {
            caller: alice("PLAIN"),
            expect: Err(Denied::Mechanism),
            ..c("mechanism not allowed")
        },
        Case {
            to: "sip:other@org.example",
            expect: Err(Denied::NoRule),
            ..c("target not in any rule")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:mallory@partner.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256",
                crossover: None,
            },
            expect: Err(Denied::RuleDenies),
            ..c("explicitly denied identity, first match wins")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:eve@elsewhere.example",
                realm: "elsewhere",
                mechanism: "SCRAM-SHA-256",
                crossover: None,
            },
            expect: Err(Denied::NoRule),
            ..c("unknown domain, default deny")
        },
        Case {
            counts: Counts {
                by_identity: 2,
                ..Counts::default()
            },
            expect: Err(Denied::LimitIdentity),
            ..c("identity limit")
        },
        Case {
            counts: Counts {
                by_target: 5,
                ..Counts::default()
            },
            expect: Err(Denied::LimitTarget),
            ..c("target limit")
        },
        Case {
            counts: Counts {
                total: 10,
                ..Counts::default()
            },
            expect: Err(Denied::LimitTotal),
            ..c("global limit")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:bob@strict.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256-PLUS",
                crossover: None,
            },
            expect: Err(Denied::TlsRequired),
            ..c("strict needs TLS")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:bob@strict.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256-PLUS",
                crossover: None,
            },
            tls: true,
            pskmth: &["none"],
            expect: Err(Denied::PskRequired),
            ..c("strict requires a psk")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:bob@strict.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256",
                crossover: None,
            },
            tls: true,
            expect: Err(Denied::Mechanism),
            ..c("strict requires -PLUS")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:bob@strict.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256-PLUS",
                crossover: None,
            },
            tls: true,
            ..c("strict satisfied")
        },
        Case {
            caller: Caller::Authenticated {
                aor: "sip:anyone@anywhere.example",
                realm: "org.example",
                mechanism: "SCRAM-SHA-256",
                crossover: None,
            },
            to: "sip:open@org.example",
            ..c("open rule: any identity of the realm")
        },
        Case {
            pskmth: &["gateway"],
            expect: Err(Denied::Pskmth),
            ..c("gateway is never acceptable from a caller")
        },
        Case {
            kind: "call",
            expect: Err(Denied::NoRule),
            ..c("ordinary call from outside is denied by default")
        },
        Case {
            kind: "MESSAGE",
            expect: Ok(None),
            ..c("method rule")
        },
        Case {
            kind: "SUBSCRIBE",
            expect: Err(Denied::NoRule),
            ..c("other methods denied")
        },
        Case {
            caller: Caller::Trusted,
            kind: "call",
            expect: Ok(None),
            ..c("trusted infrastructure may call")
        },
        Case {
            caller: Caller::Trusted,
            to: "sip:x@org.example",
            pskmth: &["none"],
            expect: Ok(Some("none")),
            ..c("trusted tunnel")
        },
    ];
    let p = policy();
    for case in cases {
        let prefixes = nets(case.prefixes);
        let pskmth: Vec<String> = case.pskmth.iter().map(|s| s.to_string()).collect();
        let session = match case.kind {
            "tunnel" => Session::Tunnel {
                prefixes: &prefixes,
                pskmth: &pskmth,
                scram_available: case.scram,
                xover_available: false,
                outward: false,
            },
            "call" => Session::Call,
            m => Session::Method(m),
        };
        let q = Query {
            caller: case.caller,
            tls: case.tls,
            from: "sip:alice@partner.example",
            to: case.to,
            session,
            counts: case.counts,
        };
        let got = p
            .decide(&q)
            .map(|permit| permit.pskmth().map(str::to_owned));
        let want = case.expect.map(|o| o.map(str::to_owned));
        assert_eq!(got, want, "{}", case.name);
    }
}

#[test]
fn bad_files_name_the_line() {
    let cases = [
        ("[[rule]]\nname = \"x\"\nkind = \"tunnel\"\ncallers = [\"bogus\"]\n", 4),
        ("org_prefixes = [\"2001:db8::/129\"]\n", 1),
        ("[[rule]]\nname = \"x\"\nkind = \"tunnel\"\ncallers = [\"any\"]\npskmth = [\"magic\"]\n", 5),
        ("[[rule]]\nname = \"x\"\nkind = \"tunnel\"\ncallers = [\"any\"]\nfrobnicate = 1\n", 5),
        ("[[rule]]\nname = \"x\"\nkind = \"method\"\ncallers = [\"any\"]\n", 2),
    ];
    for (text, line) in cases {
        let e = Policy::parse(text, "p.toml").unwrap_err();
        assert_eq!(e.line, line, "{e}");
        assert!(e.to_string().starts_with(&format!("p.toml:{line}:")), "{e}");
    }
}

#[test]
fn labels_are_bounded_and_distinct() {
    use std::collections::HashSet;
    let all = [
        Denied::NoRule,
        Denied::RuleDenies,
        Denied::Mechanism,
        Denied::TlsRequired,
        Denied::Prefix,
        Denied::OrgPrefix,
        Denied::Pskmth,
        Denied::PskRequired,
        Denied::LimitIdentity,
        Denied::LimitTarget,
        Denied::LimitTotal,
    ];
    let labels: HashSet<_> = all.iter().map(|d| d.label()).collect();
    assert_eq!(labels.len(), all.len());
}

const CROSSOVER_POLICY: &str = r#"
[[rule]]
name = "local-partners"
kind = "tunnel"
callers = ["*@partner.example"]
targets = ["sip:vpn@org.example"]
pskmth = ["scram", "xover"]

[[rule]]
name = "crossover-partners"
kind = "tunnel"
callers = ["*@partner.example", "*@other.example"]
crossover = ["partner.example"]
targets = ["sip:vpn@org.example"]
pskmth = ["xover"]
require_psk = true

[[rule]]
name = "anyone-by-crossover-may-ping"
kind = "method"
methods = ["OPTIONS"]
callers = ["any"]
crossover = ["any"]
"#;

fn crossover_query<'a>(
    aor: &'a str,
    crossover: Option<&'a str>,
    session: Session<'a>,
) -> Query<'a> {
    Query {
        caller: Caller::Authenticated {
            aor,
            realm: "org.example",
            mechanism: "SXOVER-PLUS",
            crossover,
        },
        tls: true,
        from: aor,
        to: "sip:vpn@org.example",
        session,
        counts: Counts::default(),
    }
}

#[test]
fn crossover_callers_match_only_rules_that_name_their_realm() {
    let p = Policy::parse(CROSSOVER_POLICY, "policy.toml").unwrap();
    let prefixes = nets(&["2001:db8:b0b::/64"]);
    let pskmth = vec!["xover".to_owned(), "none".to_owned()];
    let tunnel = |xover| Session::Tunnel {
        prefixes: &prefixes,
        pskmth: &pskmth,
        scram_available: false,
        xover_available: xover,
        outward: false,
    };
    // bob's home vouched: the first rule (local callers) is skipped, the second matches.
    let permit = p
        .decide(&crossover_query(
            "sip:bob@partner.example",
            Some("partner.example"),
            tunnel(true),
        ))
        .unwrap();
    assert_eq!(permit.rule(), "crossover-partners");
    assert_eq!(permit.pskmth(), Some("xover"));
    // A local caller never matches through `crossover`, and gets the local rule.
    let local = p
        .decide(&crossover_query(
            "sip:bob@partner.example",
            None,
            tunnel(false),
        ))
        .unwrap_err();
    assert_eq!(local, Denied::Pskmth);
    // other.example's callers by crossover: the realm is not named: no rule for tunnels.
    assert_eq!(
        p.decide(&crossover_query(
            "sip:eve@other.example",
            Some("other.example"),
            tunnel(true)
        ))
        .unwrap_err(),
        Denied::NoRule
    );
    // Without the key (none would be left), the rule requires a PSK.
    assert_eq!(
        p.decide(&crossover_query(
            "sip:bob@partner.example",
            Some("partner.example"),
            tunnel(false)
        ))
        .unwrap_err(),
        Denied::Pskmth
    );
    // `any` admits every crossover realm.
    assert!(p
        .decide(&crossover_query(
            "sip:eve@other.example",
            Some("other.example"),
            Session::Method("OPTIONS")
        ))
        .is_ok());
}

#[test]
fn a_bad_crossover_option_is_refused_with_its_line() {
    for (bad, what) in [
        ("crossover = []", "names realms"),
        ("crossover = [\"Partner.Example\"]", "is not a realm"),
    ] {
        let text =
            format!("[[rule]]\nname = \"r\"\nkind = \"tunnel\"\ncallers = [\"any\"]\n{bad}\n");
        let e = Policy::parse(&text, "policy.toml").unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains(what), "{e}");
    }
}

const OUTWARD_POLICY: &str = r#"
org_prefixes = ["2001:db8:789::/48"]
[[rule]]
name = "alice-to-partners"
kind = "tunnel"
callers = ["sip:alice@org.example"]
targets = ["*@partner.example"]
pskmth = ["scram", "xover"]
require_psk = true
prefixes = ["2001:db8:789:a::/64"]
"#;

#[test]
fn an_outward_tunnel_may_offer_our_own_prefix_and_is_never_keyed_by_our_scram() {
    let p = Policy::parse(OUTWARD_POLICY, "policy.toml").unwrap();
    let own = nets(&["2001:db8:789:a::/64"]);
    let pskmth = vec!["scram".to_owned(), "xover".to_owned()];
    let query = |prefixes, outward, to| Query {
        caller: Caller::Authenticated {
            aor: "sip:alice@org.example",
            realm: "org.example",
            mechanism: "SCRAM-SHA-256-PLUS",
            crossover: None,
        },
        tls: true,
        from: "sip:alice@org.example",
        to,
        session: Session::Tunnel {
            prefixes,
            pskmth: &pskmth,
            scram_available: true,
            xover_available: outward,
            outward,
        },
        counts: Counts::default(),
    };
    // Outward: the organisation's own prefix is what its caller offers; scram is skipped
    // even though the caller prefers it and a transcript exists: the far end keys it.
    let permit = p
        .decide(&query(&own, true, "sip:vpn@partner.example"))
        .unwrap();
    assert_eq!(permit.pskmth(), Some("xover"));
    // The same offer inbound would claim an org prefix: refused.
    assert_eq!(
        p.decide(&query(&own, false, "sip:vpn@partner.example"))
            .unwrap_err(),
        Denied::OrgPrefix
    );
    // Outward, the rule's prefixes still bound what may be offered.
    let other = nets(&["2001:db8:789:b::/64"]);
    assert_eq!(
        p.decide(&query(&other, true, "sip:vpn@partner.example"))
            .unwrap_err(),
        Denied::Prefix
    );
    // Another domain is not a target of the rule.
    assert_eq!(
        p.decide(&query(&own, true, "sip:vpn@third.example"))
            .unwrap_err(),
        Denied::NoRule
    );
}

#[test]
fn the_shipped_example_policies_parse() {
    for f in [
        "examples/policy.toml",
        "examples/federation/org-policy.toml",
        "examples/federation/partner-policy.toml",
    ] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/").to_owned() + f;
        let text = std::fs::read_to_string(&path).unwrap();
        Policy::parse(&text, f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}
