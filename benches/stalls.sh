#!/usr/bin/env bash
# Loop stalls (issue 20): plain calls from SIPp through one release gateway at a rate where
# nothing competes for the cores, then what the loop itself saw. For each run: the messages
# whose handling took over 1, 2.5 and 5 ms (`gatehouse_loop_message_seconds`), the page faults
# the gateway took while the calls ran (/proc/PID/stat) and the CPU time the hypervisor stole
# from this machine meanwhile (/proc/stat), once with the heap kept warm ([engine]
# memory_reserve_mib, the default 64) and once with RESERVE_MIB.
#
# A page fault on this project's virtual machines costs 3-4 ms of kernel time (the host backs
# guest memory lazily), so faults during a steady load are stalls: with a warm heap there
# should be none; stalls that remain with faults=0 are stolen time.
#
# Usage: stalls.sh [RATE=200] [CALLS=4000] [RESERVE_MIB=0]
# Needs: sipp, curl, a release build of gatehouse (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-200}; calls=${2:-4000}; other=${3:-0}

# bucket METRICS LE: the cumulative count of the loop histogram at bucket LE.
bucket() {
    awk -v le="$2" -F'[ "]' '/^gatehouse_loop_message_seconds_bucket/ && $2 == le {print $NF}' "$1"
}

# run RESERVE_MIB: one gateway process, the calls, its own figures.
run() {
    local reserve=$1
    { cat "$repo/deploy/examples/bench.toml"; printf '[metrics]\nlisten = "127.0.0.1:9469"\n[engine]\nmemory_reserve_mib = %s\n' "$reserve"; } >"$work/gh.toml"
    "$gh" run --config "$work/gh.toml" >"$work/gh.log" 2>&1 &
    local pid=$!
    sipp -sf "$repo/tests/sipp/uas_plain.xml" -i 127.0.0.1 -p 5070 -nostdin -timeout $((calls / rate * 3 + 60)) \
        -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
    local uas=$!
    wait_udp 5060; wait_udp 5070
    local f0 s0 f1 s1
    f0=$(awk '{print $10}' "/proc/$pid/stat"); s0=$(awk '/^cpu /{print $9}' /proc/stat)
    sipp 127.0.0.1:5060 -sf "$repo/tests/sipp/uac_plain.xml" -s vpn -i 127.0.0.1 -p 5080 -m "$calls" -r "$rate" \
        -l 100000 -nostdin -timeout $((calls / rate * 3 + 30)) -default_behaviors all,-abortunexp >"$work/uac.log" 2>&1 || true
    f1=$(awk '{print $10}' "/proc/$pid/stat"); s1=$(awk '/^cpu /{print $9}' /proc/stat)
    sipp_counts "$work/uac.log"
    curl -sf http://127.0.0.1:9469/metrics >"$work/metrics.txt"
    kill "$uas" "$pid"; wait "$pid" "$uas" 2>/dev/null || true
    local all b1 b25 b5
    all=$(bucket "$work/metrics.txt" +Inf); b1=$(bucket "$work/metrics.txt" 0.001)
    b25=$(bucket "$work/metrics.txt" 0.0025); b5=$(bucket "$work/metrics.txt" 0.005)
    echo "stalls: memory_reserve_mib=$reserve rate=$rate calls=$calls ok=${ok:-0} failed=${fail:-?}" \
        "messages=$all over_1ms=$((all - b1)) over_2.5ms=$((all - b25)) over_5ms=$((all - b5))" \
        "faults=$((f1 - f0)) stolen_ms=$(((s1 - s0) * 1000 / tck))"
}

run 64
run "$other"
