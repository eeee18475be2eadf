#!/usr/bin/env bash
# Load comparison: SIPp caller -> proxy -> SIPp answerer on loopback, Gatehouse and Kamailio in
# alternating runs, CPU per call read from /proc/PID/stat. Usage: kamailio-compare.sh RATE SECONDS [ROUNDS]
# Needs: sipp (sip-tester), kamailio (with -x tlsf), a release build of gatehouse.
set -euo pipefail
rate=${1:-2000}; secs=${2:-10}; rounds=${3:-1}
here=$(cd "$(dirname "$0")" && pwd); repo=$(dirname "$here")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
gh="$repo/target/release/gatehouse"
[ -x "$gh" ] || (cd "$repo" && cargo build --release -p gatehouse-proxy --bin gatehouse)
tck=$(getconf CLK_TCK)
calls=$((rate * secs))

# CPU ticks of a process and its children (Kamailio forks its workers).
cpu_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# run NAME PROXY_PORT START_COMMAND...
run() {
    local name=$1 port=$2; shift 2
    "$@" >"$work/$name.log" 2>&1 &
    local pid=$!
    sipp -sf "$repo/tests/sipp/uas.xml" -i 127.0.0.1 -p 5070 -nostdin -timeout $((secs + 30)) \
        -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
    local uas=$!
    # Wait until the proxy answers OPTIONS (it is up), at most 10 s.
    for _ in $(seq 100); do
        sipsak -s "sip:127.0.0.1" -r "$port" >/dev/null 2>&1 && break
        [ "$name" = kamailio ] && break
    done
    local t0; t0=$(cpu_ticks "$pid")
    sipp "127.0.0.1:$port" -sf "$repo/tests/sipp/uac.xml" -s vpn -i 127.0.0.1 -p 5080 -m "$calls" -r "$rate" \
        -l 100000 -nostdin -timeout $((secs + 30)) -default_behaviors all,-abortunexp >"$work/uac.log" 2>&1 || true
    local t1; t1=$(cpu_ticks "$pid")
    local ok fail
    ok=$(grep 'Successful call' "$work/uac.log" | tail -1 | awk -F'|' '{print $3}' | tr -d ' ')
    fail=$(grep 'Failed call' "$work/uac.log" | tail -1 | awk -F'|' '{print $3}' | tr -d ' ')
    kill "$uas" 2>/dev/null || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 -c "print(f'$name: rate=$rate calls=$calls ok=${ok:-0} failed=${fail:-?} cpu_ms_per_call={($t1-$t0)*1000/$tck/$calls:.4f}')"
}

for _ in $(seq "$rounds"); do
    run gatehouse 5060 "$gh" run --config "$repo/deploy/examples/bench.toml"
    if command -v kamailio >/dev/null 2>&1; then
        run kamailio 5062 kamailio -f "$here/kamailio.cfg" -DD -E -n 1 -x tlsf -X tlsf -m 2048 -M 32 -P "$work/kamailio.pid"
    else
        echo "kamailio not installed: apt-get install kamailio" >&2
    fi
done
