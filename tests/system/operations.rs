//! Operations: metrics after a scripted set of calls, health endpoints, a real Prometheus
//! scraping the gateway, promtool on the alert rules, systemd-analyze on the unit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use gatehouse_auth::scram::ScramClient;
use gatehouse_sip::flow::Transport;

use crate::client::SipClient;
use crate::harness::{free_port, repo, tool, Proc, TempDir};
use crate::sasl::{authenticated_invite, setup, Call};

/// A plain HTTP/1.0 GET; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of one sample line (`name{labels} value`) in an exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_count_a_scripted_set_of_calls() {
    let s = setup("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let metrics = s.gw.metrics.expect("metrics listener");
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    assert_eq!(http_get(metrics, "/nothing").0, 404);
    // One authenticated call (3 INVITE rounds), one wrong password (3 rounds).
    let mut c = SipClient::udp(s.gw.addr(Transport::Udp));
    let ok = authenticated_invite(
        &mut c,
        &mut ScramClient::new("alice", b"alice-secret", None),
        &mut Call::new("m1"),
    );
    assert_eq!(ok.status(), Some(200));
    let bad = authenticated_invite(
        &mut c,
        &mut ScramClient::new("alice", b"wrong", None),
        &mut Call::new("m2"),
    );
    assert_eq!(bad.status(), Some(403));
    let expect = [
        ("gatehouse_sip_requests_total{method=\"invite\",transport=\"udp\"}", 6.0),
        ("gatehouse_sip_responses_total{class=\"4xx\",transport=\"udp\"}", 5.0), // 4 × 407, 1 × 403
        ("gatehouse_sip_responses_total{class=\"2xx\",transport=\"udp\"}", 1.0),
        ("gatehouse_sip_responses_total{class=\"1xx\",transport=\"udp\"}", 1.0),
        ("gatehouse_auth_attempts_total{mechanism=\"scram-sha-256\",outcome=\"success\"}", 1.0),
        ("gatehouse_auth_attempts_total{mechanism=\"scram-sha-256\",outcome=\"bad_credentials\"}", 1.0),
        ("gatehouse_auth_challenges_total", 4.0), // every 407 round
        ("gatehouse_sip_invite_final_latency_seconds_count", 6.0), // one final per INVITE
    ];
    // Metrics synchronise from the core a few times a second: wait for them, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(metrics, "/metrics");
        let got: Vec<Option<f64>> = expect.iter().map(|(k, _)| sample(&text, k)).collect();
        if expect.iter().zip(&got).all(|((_, v), g)| *g == Some(*v)) {
            assert!(
                text.contains("process_resident_memory_bytes"),
                "process metrics"
            );
            assert!(
                !text.contains("alice") && !text.contains("@test"),
                "no user or Call-ID in labels"
            );
            // Prometheus conventions (issue 12, item 10): known series exist at 0 before their
            // first event, label values are lower case, transactions' retransmissions and
            // timeouts are exported.
            for zero in [
                "gatehouse_sip_requests_total{method=\"bye\",transport=\"tls\"}",
                "gatehouse_policy_denials_total{reason=\"limit_total\"}",
                "gatehouse_auth_attempts_total{mechanism=\"scram-sha-256-plus\",outcome=\"expired\"}",
                "gatehouse_transport_refused_total{reason=\"tls_budget\"}",
                "gatehouse_tunnel_limit_checks_total{outcome=\"unverified\"}",
                "gatehouse_sip_transaction_timeouts_total",
            ] {
                assert_eq!(sample(&text, zero), Some(0.0), "{zero}\n{text}");
            }
            assert!(sample(&text, "gatehouse_sip_retransmissions_total{kind=\"sent\"}").is_some());
            for line in text
                .lines()
                .filter(|l| l.starts_with("gatehouse_") && l.contains('{'))
            {
                let labels = &line[line.find('{').unwrap()..line.rfind('}').unwrap()];
                let values: Vec<&str> = labels.split('"').skip(1).step_by(2).collect();
                // (The version and commit of gatehouse_build_info are not names; `+Inf` is
                // the histogram's own bound.)
                if !line.starts_with("gatehouse_build_info") && !line.contains("le=\"+Inf\"") {
                    assert!(
                        values.iter().all(|v| *v == v.to_ascii_lowercase()),
                        "label values in lower case: {line}"
                    );
                }
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never matched: {:?}\n{text}",
            expect.iter().zip(got).collect::<Vec<_>>()
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn real_prometheus_scrapes_the_gateway() {
    if !tool("prometheus") {
        return;
    }
    let s = setup("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let metrics = s.gw.metrics.unwrap();
    let dir = TempDir::new("prom");
    let port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gatehouse\n    static_configs:\n      - targets: [\"{metrics}\"]\n"),
    )
    .unwrap();
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new("prometheus").args([
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ]),
        dir.path(),
    );
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = TcpStream::connect(api).is_ok()
            && http_get(api, "/api/v1/query?query=up%7Bjob%3D%22gatehouse%22%7D")
                .1
                .contains("\"value\":[")
            && http_get(api, "/api/v1/query?query=up%7Bjob%3D%22gatehouse%22%7D")
                .1
                .contains("\"1\"]");
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the target up:\n{}",
            prom.log_text()
        );
        std::thread::park_timeout(Duration::from_millis(200));
    }
    let _ = prom.wait_or_end(Duration::ZERO);
}

#[test]
fn promtool_accepts_the_alert_rules() {
    if !tool("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(repo().join("deploy/prometheus/scrape.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_verifies() {
    if !tool("systemd-analyze") {
        return;
    }
    let dir = TempDir::new("unit");
    let exe = std::env::current_exe().unwrap();
    let gatehouse = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("gatehouse");
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/gatehouse.service"))
        .unwrap()
        .replace("/usr/local/bin/gatehouse", &gatehouse.display().to_string());
    let path = dir.path().join("gatehouse.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("gatehouse.service:"),
        "{text}"
    );
}

/// The dashboard is JSON, and every metric it or the alert rules name is one the gateway
/// exports (a renamed metric cannot leave them behind).
#[test]
fn grafana_dashboard_is_json_with_gatehouse_queries() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/gatehouse.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(text.contains("gatehouse_sip_requests_total"));
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let exported = gatehouse::metrics::Metrics::new().render();
    let names: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for source in [&text, &alerts] {
        for token in source.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("gatehouse_") {
                assert!(names.contains(token), "{token} is not exported");
            }
        }
    }
}
