//! Interoperability with an independent SCRAM implementation (Python `scramp`), and with a real
//! SIP phone (baresip) behind a route.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use base64::Engine;
use gatehouse_auth::scram::ScramClient;
use gatehouse_sip::flow::Transport;

use crate::harness::repo;
use crate::sasl::setup;

/// True when python3 with scramp is available (required in CI, where .ci/run installs it).
fn scramp() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import scramp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 scramp is required in CI"
        );
        eprintln!("SKIPPED: python3 scramp not installed (pip install scramp)");
    }
    ok
}

fn peer() -> String {
    repo()
        .join("tests/interop/scramp_peer.py")
        .display()
        .to_string()
}

#[test]
fn scramp_client_authenticates_through_raw_sip() {
    if !scramp() {
        return;
    }
    let s = setup("");
    let gw = s.gw.addr(Transport::Udp);
    let out = Command::new("python3")
        .args([
            &peer(),
            "invite",
            &gw.ip().to_string(),
            &gw.port().to_string(),
            "alice",
            "alice-secret",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "200");
    // And a wrong password through the same implementation is refused.
    let out = Command::new("python3")
        .args([
            &peer(),
            "invite",
            &gw.ip().to_string(),
            &gw.port().to_string(),
            "alice",
            "wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("403"));
}

#[test]
fn our_client_authenticates_against_scramp_server() {
    if !scramp() {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut child = Command::new("python3")
        .args([&peer(), "server", "alice", "pencil"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut client = ScramClient::new("alice", b"pencil", None);
    writeln!(input, "{}", b64.encode(client.client_first())).unwrap();
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    let server_first = b64.decode(line.trim()).unwrap();
    let client_final = client.client_final(&server_first).unwrap();
    writeln!(input, "{}", b64.encode(client_final)).unwrap();
    line.clear();
    output.read_line(&mut line).unwrap();
    client
        .verify_server_final(&b64.decode(line.trim()).unwrap())
        .expect("scramp's server-final verifies");
    assert!(child.wait().unwrap().success());
}

/// A real SIP phone behind the embedded default's domain route: baresip, registered for
/// nobody, answers for its own user only (a Request-URI without it is "404 UA not found").
/// The default's `target = "sip:127.0.0.1:5070"` names only host and port, so the caller's
/// user stays: INVITE sip:alice@org.example reaches baresip as sip:alice@127.0.0.1:PORT and is
/// answered 200 (auto-answer). (Ports moved off 5060/5070 so tests can run side by side.)
#[test]
fn baresip_answers_a_call_routed_by_the_embedded_default() {
    use crate::harness::{free_port, tool, wait_until, Gateway, Proc, TempDir};
    if !tool("baresip") {
        return;
    }
    let dir = TempDir::new("baresip");
    let d = dir.path();
    let phone_port = free_port();
    std::fs::write(
        d.join("config"),
        format!(
            "poll_method epoll\nsip_listen 127.0.0.1:{phone_port}\nmodule_path /usr/lib/baresip/modules\n\
module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule_app account.so\nmodule_app menu.so\n\
audio_player aufile,{out}\naudio_source ausine,440\naudio_alert aufile,{out}\n\
ausrc_srate 48000\nausrc_channels 2\nauplay_srate 48000\nauplay_channels 2\n",
            out = d.join("out.wav").display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("accounts"),
        format!("<sip:alice@127.0.0.1:{phone_port}>;regint=0;answermode=auto\n"),
    )
    .unwrap();
    let phone = Proc::spawn(
        "baresip",
        Command::new("baresip")
            .arg("-f")
            .arg(d)
            .stdin(Stdio::null()),
        d,
    );
    wait_until(
        || phone.log_text().contains("baresip is ready"),
        "baresip ready",
    );
    let config = gatehouse::config::DEFAULT_CONFIG
        .replace("127.0.0.1:5060", "127.0.0.1:0")
        .replace("[::1]:5060", "[::1]:0")
        .replace("sip:127.0.0.1:5070", &format!("sip:127.0.0.1:{phone_port}"));
    let gw = Gateway::start(&config);
    let gw_addr = gw
        .addrs
        .iter()
        .find(|(t, a)| *t == Transport::Udp && a.is_ipv4())
        .map(|(_, a)| *a)
        .unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n",
        local.port() + 2
    );
    let invite = format!(
        "INVITE sip:alice@org.example SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKbs1;rport\r\nMax-Forwards: 70\r\n\
From: <sip:caller@org.example>;tag=c1\r\nTo: <sip:alice@org.example>\r\nCall-ID: baresip-1@test\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{local}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    sock.send_to(invite.as_bytes(), gw_addr).unwrap();
    let mut buf = vec![0u8; 65_536];
    let ok = loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no final answer ({e})\nbaresip:\n{}", phone.log_text()));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.starts_with("SIP/2.0 1") {
            continue;
        }
        break text;
    };
    assert!(
        ok.starts_with("SIP/2.0 200"),
        "{ok}\nbaresip:\n{}",
        phone.log_text()
    );
    assert!(
        phone
            .log_text()
            .contains("answering call on line 1 from sip:caller@org.example"),
        "{}",
        phone.log_text()
    );
    // ACK and BYE along the route set the 200 names.
    let header = |name: &str| -> Vec<String> {
        ok.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let to = header("To")[0].clone();
    let contact = header("Contact")[0]
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned();
    let route = header("Record-Route").join(", ");
    let in_dialog = |method: &str, cseq: u32, branch: &str| {
        format!(
            "{method} {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch};rport\r\nMax-Forwards: 70\r\n\
Route: {route}\r\nFrom: <sip:caller@org.example>;tag=c1\r\nTo: {to}\r\nCall-ID: baresip-1@test\r\n\
CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    sock.send_to(in_dialog("ACK", 1, "z9hG4bKbs2").as_bytes(), gw_addr)
        .unwrap();
    sock.send_to(in_dialog("BYE", 2, "z9hG4bKbs3").as_bytes(), gw_addr)
        .unwrap();
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer to BYE ({e})\nbaresip:\n{}", phone.log_text()));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.contains("CSeq: 2 BYE") {
            assert!(text.starts_with("SIP/2.0 200"), "{text}");
            break;
        }
    }
    gw.stop();
}
