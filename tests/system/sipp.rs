//! Real peers: SIPp caller -> gatehouse -> SIPp answerer on loopback, and sipsak.

use std::process::Command;
use std::time::Duration;

use gatehouse_sip::flow::Transport;

use crate::harness::{
    free_port, gateway_config, scenario, tool, wait_tcp_listening, wait_udp_bound, Gateway, Proc,
    TempDir,
};

pub struct Call<'a> {
    pub transport: &'a str,
    pub uac: &'a str,
    pub uas: &'a str,
    pub calls: u32,
    pub rate: u32,
    pub extra_config: &'a str,
    pub uac_args: &'a [&'a str],
}

impl Default for Call<'_> {
    fn default() -> Self {
        Call {
            transport: "udp",
            uac: "uac.xml",
            uas: "uas.xml",
            calls: 1,
            rate: 10,
            extra_config: "",
            uac_args: &[],
        }
    }
}

/// Runs SIPp answerer and caller through a gateway; returns (caller log, answerer log).
fn run(call: Call<'_>) -> Option<(String, String)> {
    if !tool("sipp") {
        return None;
    }
    let uas_port = free_port();
    let gw = Gateway::start(&config_for(&call, uas_port));
    let logs = run_through(&gw, uas_port, &call);
    gw.stop();
    Some(logs)
}

/// A gateway configuration routing `org.example` to a SIPp answerer on `uas_port`.
pub fn config_for(call: &Call<'_>, uas_port: u16) -> String {
    gateway_config(
        &[call.transport],
        &format!(
            "{}[[route]]\ndomain = \"org.example\"\ntarget = \"sip:127.0.0.1:{uas_port}\"\ntransport = \"{}\"\n",
            call.extra_config, call.transport
        ),
    )
}

/// Runs SIPp answerer (on `uas_port`) and caller through a running gateway; asserts both
/// succeed; returns (caller log, answerer log).
pub fn run_through(gw: &Gateway, uas_port: u16, call: &Call<'_>) -> (String, String) {
    let dir = TempDir::new("sipp");
    let gw_addr = gw.addr(Transport::from_token(call.transport).expect("transport"));
    let sipp_transport = if call.transport == "tcp" { "t1" } else { "u1" };
    let calls = call.calls.to_string();
    let mut uas = Proc::spawn(
        "uas",
        Command::new("sipp").args([
            "-sf",
            &scenario(call.uas),
            "-i",
            "127.0.0.1",
            "-p",
            &uas_port.to_string(),
            "-t",
            sipp_transport,
            "-m",
            &calls,
            "-nostdin",
            "-default_behaviors",
            "all,-abortunexp",
            "-timeout",
            "60",
            "-timeout_error",
        ]),
        dir.path(),
    );
    if call.transport == "tcp" {
        wait_tcp_listening(uas_port);
    } else {
        wait_udp_bound(&mut uas, uas_port);
    }
    let uac_port = free_port().to_string();
    let mut args: Vec<String> = [
        gw_addr.to_string().as_str(),
        "-sf",
        &scenario(call.uac),
        "-s",
        "vpn",
        "-i",
        "127.0.0.1",
        "-p",
        &uac_port,
        "-t",
        sipp_transport,
        "-m",
        &calls,
        "-r",
        &call.rate.to_string(),
        "-nostdin",
        "-default_behaviors",
        "all,-abortunexp",
        "-timeout",
        "60",
        "-timeout_error",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(call.uac_args.iter().map(|s| s.to_string()));
    let mut uac = Proc::spawn("uac", Command::new("sipp").args(&args), dir.path());
    let uac_status = uac.wait(Duration::from_secs(90));
    let uac_log = uac.log_text();
    assert!(
        uac_status.success(),
        "caller failed ({uac_status}):\n{}",
        tail(&uac_log)
    );
    let uas_status = uas.wait(Duration::from_secs(30));
    let uas_log = uas.log_text();
    assert!(
        uas_status.success(),
        "answerer failed ({uas_status}):\n{}",
        tail(&uas_log)
    );
    (uac_log, uas_log)
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// "Successful call" cumulative count from SIPp's final screen.
pub fn successful(log: &str) -> u32 {
    log.lines()
        .filter(|l| l.trim_start().starts_with("Successful call"))
        .filter_map(|l| l.rsplit('|').next().and_then(|v| v.trim().parse().ok()))
        .next_back()
        .unwrap_or(0)
}

#[test]
fn sipp_1000_calls_over_udp() {
    let _load = crate::harness::load_test();
    let Some((uac, _)) = run(Call {
        calls: 1000,
        rate: 500,
        ..Call::default()
    }) else {
        return;
    };
    assert_eq!(successful(&uac), 1000, "{}", tail(&uac));
}

#[test]
fn sipp_1000_calls_over_tcp() {
    let _load = crate::harness::load_test();
    let Some((uac, _)) = run(Call {
        transport: "tcp",
        calls: 1000,
        rate: 500,
        ..Call::default()
    }) else {
        return;
    };
    assert_eq!(successful(&uac), 1000, "{}", tail(&uac));
}

#[test]
fn sipp_cancel_is_relayed() {
    let Some((uac, _)) = run(Call {
        uac: "uac_cancel.xml",
        uas: "uas_cancel.xml",
        calls: 5,
        ..Call::default()
    }) else {
        return;
    };
    assert_eq!(successful(&uac), 5, "{}", tail(&uac));
}

#[test]
fn sipp_busy_answerer_486_is_relayed() {
    let Some((uac, _)) = run(Call {
        uac: "uac_busy.xml",
        uas: "uas_busy.xml",
        calls: 5,
        ..Call::default()
    }) else {
        return;
    };
    assert_eq!(successful(&uac), 5, "{}", tail(&uac));
}

#[test]
fn sipp_silent_answerer_gives_408_after_timer_c() {
    let Some((uac, _)) = run(Call {
        uac: "uac_timeout.xml",
        uas: "uas_silent.xml",
        calls: 2,
        extra_config: "[timers]\ntimer_c_ms = 1000\n",
        ..Call::default()
    }) else {
        return;
    };
    assert_eq!(successful(&uac), 2, "{}", tail(&uac));
}

#[test]
fn sipsak_ping_and_traceroute() {
    if !tool("sipsak") || !tool("sipp") {
        return;
    }
    let dir = TempDir::new("sipsak");
    let uas_port = free_port();
    // sipsak 0.9.8 cuts a five-digit port out of a URI, so the URIs carry no port (the
    // gateway serves the domain "127.0.0.1") and `-r` names the gateway's port.
    let config = gateway_config(
        &["udp"],
        &format!("[[route]]\ndomain = \"127.0.0.1\"\ntarget = \"sip:127.0.0.1:{uas_port}\"\n"),
    )
    .replace(
        "domains = [\"org.example\"]",
        "domains = [\"org.example\", \"127.0.0.1\"]",
    );
    let gw = Gateway::start(&config);
    let gw_port = gw.addr(Transport::Udp).port();
    // Ping: OPTIONS to the gateway itself. sipsak sends from one port and listens on another
    // with ;rport, so this also checks RFC 3581.
    let mut ping = Proc::spawn(
        "sipsak-ping",
        Command::new("sipsak").args(["-vv", "-s", "sip:127.0.0.1", "-r", &gw_port.to_string()]),
        dir.path(),
    );
    let st = ping.wait(Duration::from_secs(20));
    let log = ping.log_text();
    assert!(st.success(), "sipsak ping failed:\n{log}");
    assert!(log.contains("SIP/2.0 200 OK"), "{log}");

    let mut uas = Proc::spawn(
        "uas-options",
        Command::new("sipp").args([
            "-sf",
            &scenario("uas_options.xml"),
            "-i",
            "127.0.0.1",
            "-p",
            &uas_port.to_string(),
            "-m",
            "1",
            "-nostdin",
            "-timeout",
            "30",
        ]),
        dir.path(),
    );
    wait_udp_bound(&mut uas, uas_port);
    let mut trace = Proc::spawn(
        "sipsak-trace",
        Command::new("sipsak").args(["-T", "-s", "sip:vpn@127.0.0.1", "-r", &gw_port.to_string()]),
        dir.path(),
    );
    let st = trace.wait(Duration::from_secs(30));
    let log = trace.log_text();
    assert!(st.success(), "sipsak traceroute failed:\n{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("0:") || l.starts_with("1:"))
        .collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("0:") && l.contains("483 Too Many Hops")),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l.contains("200 OK")),
        "the answerer is reached: {log}"
    );
    assert!(uas.wait(Duration::from_secs(30)).success());
}
