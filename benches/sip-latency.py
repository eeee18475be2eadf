#!/usr/bin/env python3
"""Proxy-added INVITE->200 latency from packet timestamps (issue 10, measure a).

Reads a pcap of loopback traffic (tcpdump -i lo -w FILE) between a SIPp caller, a proxy and a
SIPp answerer, and for every call takes four timestamps: the INVITE arriving at the proxy,
the INVITE leaving it for the answerer, the 200 arriving from the answerer, the 200 leaving
for the caller. Proxy-added latency = (INVITE out - INVITE in) + (200 out - 200 in): the time
the call spends inside the proxy, without the answerer's or the network's share. SIPp's own
response times are 4 ms coarse; packet timestamps are microseconds.

Usage: sip-latency.py FILE.pcap PROXY_PORT UAS_PORT
Prints: calls measured, p50, p99, p99.9 and max in ms. Calls with a packet missing (tcpdump
drops under load) are left out and counted.
"""
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        head = f.read(24)
        magic = struct.unpack("<I", head[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            endian = "<"
        else:
            endian = ">"
            magic = struct.unpack(">I", head[:4])[0]
        nano = magic == 0xA1B23C4D
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        offset = {1: 14, 113: 16, 276: 20, 0: 4, 101: 0}.get(linktype)
        if offset is None:
            sys.exit(f"unsupported link type {linktype}")
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _ = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            ts = sec + frac / (1e9 if nano else 1e6)
            ip = data[offset:]
            if not ip:
                continue
            version = ip[0] >> 4
            if version == 4:
                ihl = (ip[0] & 15) * 4
                if ip[9] != 17:
                    continue
                udp = ip[ihl:]
            elif version == 6:
                if ip[6] != 17:
                    continue
                udp = ip[40:]
            else:
                continue
            sport, dport = struct.unpack(">HH", udp[:4])
            yield ts, sport, dport, udp[8:]


def sip_fields(payload):
    try:
        text = payload.decode("utf-8", "replace")
    except Exception:
        return None
    lines = text.split("\r\n")
    first = lines[0]
    call_id = cseq = None
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("call-id", "i"):
            call_id = value.strip()
        elif name == "cseq":
            cseq = value.strip()
    return first, call_id, cseq


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    path, proxy, uas = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    calls = {}
    for ts, sport, dport, payload in packets(path):
        f = sip_fields(payload)
        if not f or not f[1] or not f[2] or not f[2].endswith("INVITE"):
            continue
        first, call_id, _ = f
        if first.startswith("INVITE "):
            kind = "inv_in" if dport == proxy else "inv_out" if (sport == proxy and dport == uas) else None
        elif first.startswith("SIP/2.0 200"):
            kind = "ok_in" if (sport == uas and dport == proxy) else "ok_out" if sport == proxy else None
        else:
            kind = None
        if kind:
            calls.setdefault(call_id, {}).setdefault(kind, ts)  # first of any retransmissions
    added = []
    incomplete = 0
    for ev in calls.values():
        if len(ev) == 4:
            added.append((ev["inv_out"] - ev["inv_in"]) + (ev["ok_out"] - ev["ok_in"]))
        else:
            incomplete += 1
    if not added:
        sys.exit("no complete call in the capture")
    added.sort()

    def q(p):
        return added[min(len(added) - 1, round((len(added) - 1) * p))] * 1e3

    print(
        f"calls={len(added)} incomplete={incomplete} proxy_added_ms p50={q(0.5):.3f} "
        f"p99={q(0.99):.3f} p99.9={q(0.999):.3f} max={added[-1] * 1e3:.3f}"
    )


if __name__ == "__main__":
    main()
