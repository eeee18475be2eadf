#!/usr/bin/env bash
# The store's share of the set-up tail (issue 20): complete SCRAM tunnel set-ups (gatehouse-load)
# through one gateway on an SQLite store, with a user added by another process half way, then
# the commit-time histogram (`gatehouse_store_commit_seconds`: a tunnel's 200, and everything
# sent after it, waits for its commit) and the set-up quantiles. A commit over 10 ms is a stall
# of every call in flight; with the WAL checkpointed beside the storage worker there should be none.
#
# Usage: store-tail.sh [RATE=600] [SECONDS=60]
# Needs: sipp, curl, release builds of gatehouse and gatehouse-load (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-600}; secs=${2:-60}
sasl_gateway 127.0.0.1:5067 "$work/store.sqlite" "$(printf '[metrics]\nlisten = "127.0.0.1:9471"')" >"$work/gw.toml"
"$gh" run --config "$work/gw.toml" >"$work/gw.log" 2>&1 &
gw=$!
sipp -sf "$repo/tests/sipp/uas.xml" -i 127.0.0.1 -p 5070 -nostdin -timeout $((secs * 2 + 60)) \
    -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
uas=$!
wait_udp 5067; wait_udp 5070
echo alice-secret >"$work/password"
( sleep $((secs / 2)); echo bob-secret | "$gh" user add bob --aor sip:bob@partner.example --store "$work/store.sqlite" >/dev/null 2>&1 ) &
"$load" --gateway 127.0.0.1:5067 --password-file "$work/password" --rate "$rate" --count $((rate * secs)) \
    --quiet >"$work/load.log" 2>&1 || true
curl -sf http://127.0.0.1:9471/metrics >"$work/metrics.txt"
kill "$gw" "$uas" 2>/dev/null || true; wait "$gw" "$uas" 2>/dev/null || true
# bucket LE: the commit histogram's cumulative count at LE.
bucket() { awk -v le="$1" -F'[ "]' '/^gatehouse_store_commit_seconds_bucket/ && $2 == le {print $NF}' "$work/metrics.txt"; }
all=$(bucket +Inf); b10=$(bucket 0.01); b100=$(bucket 0.1)
ok=$(awk '/^set-ups:/ {print $4}' "$work/load.log")
failed=$(awk '/^set-ups:/ {print $6}' "$work/load.log")
echo "store-tail: rate=$rate set-ups=$((rate * secs)) ok=${ok:-0} failed=${failed:-?} commits=$all over_10ms=$((all - b10)) over_100ms=$((all - b100))"
sed 's/^/  /' "$work/load.log"
