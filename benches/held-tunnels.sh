#!/usr/bin/env bash
# Held tunnels (issue 10, measure b): CPU per tunnel set-up and RSS per held tunnel while the
# tunnel table grows. SIPp opens WireGuard tunnels through a release gatehouse
# (deploy/examples/bench.toml plus a store file) and keeps them (tests/sipp/uac_hold.xml and
# uas_hold.xml: no BYE). A probe of PROBE set-ups is measured at 0, STEP and 2*STEP tunnels held;
# between probes the table is filled.
# Usage: held-tunnels.sh [STEP=50000] [PROBE=5000] [RATE=2000]
# Prints one line per probe: held, set-ups, failed, CPU ms per set-up, RSS MiB; then the RSS
# per held tunnel. Needs: sipp (sip-tester), a release build (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
step=${1:-50000}; probe=${2:-5000}; rate=${3:-2000}
total=$((2 * step + probe))

cp "$repo/deploy/examples/bench.toml" "$work/gw.toml"
# No heap reserve: resident memory must grow with the tunnels from the first one for the
# marginal figure to be true (a reserve written at start would hide the first 64 MiB).
printf '\n[auth]\nstore = "%s"\n[metrics]\nlisten = "127.0.0.1:9091"\n[engine]\nmemory_reserve_mib = 0\n' "$work/store.sqlite" >>"$work/gw.toml"
"$gh" run --config "$work/gw.toml" >"$work/gw.log" 2>&1 &
gw=$!
sipp -sf "$repo/tests/sipp/uas_hold.xml" -i 127.0.0.1 -p 5070 -m "$total" -nostdin \
    -timeout 3600 -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
wait_udp 5060; wait_udp 5070

ticks() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$gw/status"; }
metric() { curl -s http://127.0.0.1:9091/metrics | awk -v m="$1" '$1 == m {print $2}'; }
# The RSS of held tunnels, not of transactions still in their RFC 6026/17.2 wait states:
# wait (at most 90 s) until every transaction has ended.
settle() {
    for _ in $(seq 900); do [ "$(metric gatehouse_sip_transactions)" = 0 ] && return; sleep 0.1; done
    echo "transactions did not drain" >&2
}
held=0
# calls N: N held set-ups at RATE; prints "ok failed" (the caller adds ok to held)
calls() {
    sipp 127.0.0.1:5060 -sf "$repo/tests/sipp/uac_hold.xml" -s vpn -i 127.0.0.1 -p 5080 -m "$1" -r "$rate" \
        -l 100000 -nostdin -timeout 3600 -default_behaviors all,-abortunexp >"$work/uac.log" 2>&1 || true
    sipp_counts "$work/uac.log"
    echo "${ok:-0} ${fail:-?}"
}
measure() {
    local at=$held t0 t1 r ok
    t0=$(ticks)
    r=$(calls "$probe")
    t1=$(ticks)
    ok=${r%% *}; held=$((held + ok))
    settle
    python3 -c "
ok, fail = '$r'.split()
print(f'held={$at:>7} setups={ok:>6} failed={fail:>4} cpu_ms_per_setup={($t1-$t0)*1000/$tck/max(int(ok),1):.4f} rss_mib={$(rss_kib)/1024:.1f} tunnels_active={$(metric gatehouse_tunnel_active)}')"
}
echo "# gatehouse $("$gh" --version) held tunnels: step=$step probe=$probe rate=$rate/s"
measure
rss0=$(rss_kib); held0=$held
fill() { local r; r=$(calls "$1"); held=$((held + ${r%% *})); }
fill $((step - probe))
measure
fill $((step - probe))
measure
rss1=$(rss_kib)
python3 -c "print(f'rss_per_held_tunnel_bytes={($rss1-$rss0)*1024/max($held-$held0,1):.0f} (from {$held0} to {$held} held)')"
kill "$gw"; wait "$gw" 2>/dev/null || true
