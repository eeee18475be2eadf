#!/usr/bin/env python3
"""Independent SCRAM-SHA-256 peer (Python scramp) for Gatehouse interop tests.

  scramp_peer.py invite HOST PORT USER PASSWORD
      Drives the SIP-SASL INVITE flow over UDP against a running gateway with raw SIP
      messages; exits 0 when the gateway relays a final response whose
      Proxy-Authentication-Info verifies (mutual authentication), prints the status.

  scramp_peer.py http HOST PORT USER PASSWORD
      HTTP-SASL against the admin API (GET /api/v1/status); exits 0 on 200.

  scramp_peer.py server USER PASSWORD
      Acts as a SCRAM server on stdin/stdout, one base64 token per line:
      reads client-first, writes server-first, reads client-final, writes server-final.
"""
import base64
import random
import re
import socket
import sys

from scramp import ScramClient, ScramMechanism

B64 = lambda b: base64.b64encode(b).decode()


def header(msg, name):
    for line in msg.split("\r\n"):
        if ":" in line and line.split(":", 1)[0].strip().lower() == name.lower():
            return line.split(":", 1)[1].strip()
    return None


def params(value):
    return {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', value or "")}


def invite(host, port, user, password):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    local = "%s:%d" % sock.getsockname()
    call_id = "scramp-%d@interop" % random.randrange(1 << 30)
    client = ScramClient(["SCRAM-SHA-256"], user, password)

    def send(cseq, auth):
        auth_line = "Proxy-Authorization: %s\r\n" % auth if auth else ""
        msg = (
            "INVITE sip:vpn@org.example SIP/2.0\r\n"
            "Via: SIP/2.0/UDP %s;branch=z9hG4bK%s-%d;rport\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:%s@partner.example>;tag=py1\r\n"
            "To: <sip:vpn@org.example>\r\n"
            "Call-ID: %s\r\nCSeq: %d INVITE\r\n"
            "Contact: <sip:%s@%s>\r\n%s"
            "Content-Length: 0\r\n\r\n"
        ) % (local, call_id, cseq, user, call_id, cseq, user, local, auth_line)
        sock.sendto(msg.encode(), (host, int(port)))
        while True:
            data = sock.recv(65535).decode()
            if not data.startswith("SIP/2.0 100 "):
                return data

    r = send(1, None)
    assert r.startswith("SIP/2.0 407 "), r
    r = send(2, 'SASL realm="org.example", mech="SCRAM-SHA-256", c2s="%s"'
             % B64(client.get_client_first().encode()))
    assert r.startswith("SIP/2.0 407 "), r
    p = params(header(r, "Proxy-Authenticate"))
    client.set_server_first(base64.b64decode(p["s2c"]).decode())
    r = send(3, 'SASL realm="org.example", s2s="%s", c2s="%s"'
             % (p["s2s"], B64(client.get_client_final().encode())))
    status = r.split(" ", 2)[1]
    info = params(header(r, "Proxy-Authentication-Info"))
    if "s2c" not in info:
        print("no server-final, status", status)
        return 1
    client.set_server_final(base64.b64decode(info["s2c"]).decode())  # raises if forged
    print(status)
    return 0 if status.startswith("2") else 1


def server(user, password):
    mech = ScramMechanism("SCRAM-SHA-256")
    salt, stored, server_key, iters = mech.make_auth_info(password, iteration_count=4096)

    def auth_fn(username):
        if username != user:
            raise ValueError("unknown user")
        return salt, stored, server_key, iters

    s = mech.make_server(auth_fn)
    s.set_client_first(base64.b64decode(sys.stdin.readline()).decode())
    print(B64(s.get_server_first().encode()), flush=True)
    s.set_client_final(base64.b64decode(sys.stdin.readline()).decode())
    print(B64(s.get_server_final().encode()), flush=True)
    return 0


def http(host, port, user, password):
    """HTTP-SASL against the admin API: GET /api/v1/status; prints the status code."""
    client = ScramClient(["SCRAM-SHA-256"], user, password)

    def get(auth):
        s = socket.create_connection((host, int(port)), timeout=10)
        hdr = "Authorization: %s\r\n" % auth if auth else ""
        s.sendall(("GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % hdr).encode())
        data = b""
        while True:
            chunk = s.recv(65535)
            if not chunk:
                break
            data += chunk
        return data.decode()

    r = get(None)
    assert " 401 " in r.split("\r\n")[0], r
    r = get('SASL mech="SCRAM-SHA-256", c2s="%s"' % B64(client.get_client_first().encode()))
    p = params(header(r, "WWW-Authenticate"))
    client.set_server_first(base64.b64decode(p["s2c"]).decode())
    r = get('SASL s2s="%s", c2s="%s"' % (p["s2s"], B64(client.get_client_final().encode())))
    status = r.split(" ", 2)[1]
    info = params(header(r, "Authentication-Info"))
    if "s2c" in info:
        client.set_server_final(base64.b64decode(info["s2c"]).decode())
    print(status)
    return 0 if status == "200" else 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "invite":
        sys.exit(invite(*sys.argv[2:6]))
    if mode == "http":
        sys.exit(http(*sys.argv[2:6]))
    sys.exit(server(*sys.argv[2:4]))
