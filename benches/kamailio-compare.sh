#!/usr/bin/env bash
# Load comparison with Kamailio (issue 10, measure a): SIPp caller -> proxy -> SIPp answerer on
# loopback, Gatehouse and Kamailio in alternating runs of the same calls. For each: calls
# completed and failed, CPU per call (/proc/PID/stat, Kamailio's forked workers included) and,
# with tcpdump, the proxy-added INVITE->200 latency from packet timestamps
# (benches/sip-latency.py: p50/p99/p99.9).
#
# Usage: kamailio-compare.sh [RATE=2000] [SECONDS=10] [ROUNDS=1] [KIND=tunnel]
#   KIND tunnel: every INVITE offers a WireGuard tunnel (tests/sipp/uac.xml, uas.xml)
#   KIND plain:  ordinary audio calls (uac_plain.xml, uas_plain.xml)
# Max clean rate: run at rising RATEs; the highest with failed=0 is it.
# Needs: sipp (sip-tester), kamailio, tcpdump (optional: no latency without it), python3, a
# release build of gatehouse (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-2000}; secs=${2:-10}; rounds=${3:-1}; kind=${4:-tunnel}
calls=$((rate * secs))
case "$kind" in
    tunnel) uac=uac.xml; uas=uas.xml ;;
    plain) uac=uac_plain.xml; uas=uas_plain.xml ;;
    *) echo "KIND is tunnel or plain" >&2; exit 64 ;;
esac


# calls PORT: one SIPp caller run against the proxy on PORT; sets ok and fail.
calls() {
    sipp "127.0.0.1:$1" -sf "$repo/tests/sipp/$uac" -s vpn -i 127.0.0.1 -p 5080 -m "$calls" -r "$rate" \
        -l 100000 -nostdin -timeout $((secs * 3 + 30)) -default_behaviors all,-abortunexp >"$work/uac.log" 2>&1 || true
    sipp_counts "$work/uac.log"
}

# run NAME PROXY_PORT START_COMMAND...: two passes of the same calls through one proxy
# process: the first measures CPU (nothing else running), the second captures packets for the
# latency (tcpdump costs CPU on this 2-core machine, so it never runs during the first).
run() {
    local name=$1 port=$2; shift 2
    "$@" >"$work/$name.log" 2>&1 &
    local pid=$!
    sipp -sf "$repo/tests/sipp/$uas" -i 127.0.0.1 -p 5070 -nostdin -timeout $((secs * 6 + 60)) \
        -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
    local sipp_uas=$!
    wait_udp "$port"; wait_udp 5070
    local t0 t1 latency="latency=not-measured(no tcpdump)"
    t0=$(cpu_ticks "$pid")
    calls "$port"
    t1=$(cpu_ticks "$pid")
    local ok1=${ok:-0} fail1=${fail:-?}
    if command -v tcpdump >/dev/null 2>&1; then
        tcpdump -i lo -n -s 2048 -B 65536 -w "$work/$name.pcap" "udp and port $port" >"$work/tcpdump.log" 2>&1 &
        local dump=$!
        for _ in $(seq 50); do grep -q listening "$work/tcpdump.log" && break; sleep 0.1; done
        calls "$port"
        kill -INT "$dump"; wait "$dump" 2>/dev/null || true
        latency=$(python3 "$here/sip-latency.py" "$work/$name.pcap" "$port" 5070 || echo "latency=none")
        [ "${fail:-?}" = 0 ] || latency="$latency (capture pass: ok=${ok:-0} failed=${fail:-?})"
    fi
    kill "$sipp_uas" 2>/dev/null || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    wait "$sipp_uas" 2>/dev/null || true
    python3 -c 'import sys; a = sys.argv; t0, t1, tck, calls = map(int, a[1:5]); print(f"{a[5]}: kind={a[6]} rate={a[7]} calls={calls} ok={a[8]} failed={a[9]} cpu_ms_per_call={(t1 - t0) * 1000 / tck / calls:.4f} {a[10]}")' \
        "$t0" "$t1" "$tck" "$calls" "$name" "$kind" "$rate" "$ok1" "$fail1" "$latency"
}

for _ in $(seq "$rounds"); do
    run gatehouse 5060 "$gh" run --config "$repo/deploy/examples/bench.toml"
    if command -v kamailio >/dev/null 2>&1; then
        run kamailio 5062 kamailio -f "$here/kamailio.cfg" -DD -E -n 1 -x tlsf -X tlsf -m 2048 -M 32 -P "$work/kamailio.pid"
    else
        echo "kamailio not installed: apt-get install kamailio" >&2
    fi
done
