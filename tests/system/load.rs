//! `gatehouse-load`, the project's SASL load client (issue 10): it runs complete SCRAM tunnel
//! set-ups through a real gateway and counts what the gateway did.

use std::time::Duration;

use gatehouse_sip::flow::Transport;
use wgsip::load::{run, LoadOptions};

use crate::sasl::setup;

fn options(gateway: std::net::SocketAddr, password: &str, count: u32) -> LoadOptions {
    LoadOptions {
        gateway,
        local: "127.0.0.1:0".parse().expect("address"),
        target: "sip:vpn@org.example".into(),
        username: "alice".into(),
        password: password.into(),
        from: "sip:alice@partner.example".into(),
        rate: 200,
        count,
        concurrency: 100,
        timeout: Duration::from_secs(10),
        progress: false,
        hold: false,
        tls: None,
        crossover: None,
    }
}

#[test]
fn the_load_client_completes_sasl_set_ups_and_counts_refusals() {
    // The answerer on loopback is inside (the PSK may go to it); one source sends everything.
    let s = setup("internal_networks = [\"127.0.0.0/8\"]\n[rate_limit]\nenabled = false\n");
    let gw = s.gw.addr(Transport::Udp);
    let report = run(&options(gw, "alice-secret", 200)).expect("load run");
    assert_eq!(report.succeeded, 200, "{}", report.summary());
    assert_eq!(report.latencies.len(), 200);
    assert!(report.quantile(0.5) <= report.quantile(0.99));

    // A wrong password: every set-up fails at the proof, and says so.
    let report = run(&options(gw, "wrong", 3)).expect("load run");
    assert_eq!(
        (report.succeeded, report.failed),
        (0, 3),
        "{}",
        report.summary()
    );
    assert!(
        report
            .failures
            .keys()
            .all(|k| k.starts_with("client-final: 403")),
        "{}",
        report.summary()
    );
}
