#!/usr/bin/env bash
# Authenticated set-ups (issue 10, measure c): CPU per SASL tunnel set-up through Gatehouse
# (gatehouse-load: three SCRAM-SHA-256 rounds, server-final verified, scram PSK derived, ACK,
# BYE) against Kamailio's CPU per Digest-authenticated call (auth + auth_db on db_text; SIPp
# [authentication]: INVITE, 407, INVITE with credentials, ACK, BYE), the same answerer behind
# both, in the same run.
#
# Usage: sasl-compare.sh [RATE=500] [COUNT=10000]
# Needs: sipp, kamailio, python3, release builds of gatehouse and gatehouse-load (built when
# missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-500}; count=${2:-10000}
# answerer SCENARIO: the same SIPp answerer behind both (WireGuard answers for tunnels);
# its PID in $uas.
answerer() {
    sipp -sf "$repo/tests/sipp/$1" -i 127.0.0.1 -p 5070 -nostdin -timeout 600 \
        -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
    uas=$!
}

# --- Gatehouse: SASL, nobody trusted, the answerer inside (the scram PSK may go to it).
sasl_gateway 127.0.0.1:5066 "$work/store.sqlite" >"$work/gw.toml"
"$gh" run --config "$work/gw.toml" >"$work/gw.log" 2>&1 &
gw=$!
answerer uas.xml
wait_udp 5066; wait_udp 5070
echo alice-secret >"$work/password"
t0=$(cpu_ticks "$gw")
"$load" --gateway 127.0.0.1:5066 --password-file "$work/password" --rate "$rate" --count "$count" --quiet >"$work/load.log" 2>&1 || true
t1=$(cpu_ticks "$gw")
ok=$(awk '/^set-ups:/ {print $4}' "$work/load.log")
python3 -c 'import sys; t0, t1, tck, ok = map(int, sys.argv[1:5]); print(f"gatehouse SASL (3 rounds): rate={sys.argv[5]} set-ups={sys.argv[6]} ok={ok} cpu_ms_per_setup={(t1 - t0) * 1000 / tck / max(ok, 1):.4f}")' "$t0" "$t1" "$tck" "${ok:-0}" "$rate" "$count"
sed 's/^/  /' "$work/load.log"
kill "$gw" "$uas" 2>/dev/null || true; wait "$gw" "$uas" 2>/dev/null || true

# --- Kamailio: Digest (auth_db on db_text).
if ! command -v kamailio >/dev/null 2>&1; then
    echo "kamailio not installed: apt-get install kamailio" >&2; exit 0
fi
mkdir -p "$work/db"
printf 'table_name(string) table_version(int)\nsubscriber:7\nversion:1\n' >"$work/db/version"
ha1=$(printf 'alice:org.example:alice-secret' | md5sum | cut -d' ' -f1)
printf 'id(int,auto) username(string) domain(string) password(string) ha1(string) ha1b(string)\n1:alice:org.example:alice-secret:%s:%s\n' "$ha1" "$ha1" >"$work/db/subscriber"
sed "s|@DBURL@|text://$work/db|" "$here/kamailio-auth.cfg" >"$work/kamailio.cfg"
kamailio -f "$work/kamailio.cfg" -DD -E -n 1 -x tlsf -X tlsf -m 2048 -M 32 -P "$work/kamailio.pid" >"$work/kamailio.log" 2>&1 &
kam=$!
answerer uas_plain.xml
wait_udp 5064; wait_udp 5070
t0=$(cpu_ticks "$kam")
sipp 127.0.0.1:5064 -sf "$repo/tests/sipp/uac_digest.xml" -s vpn -i 127.0.0.1 -p 5080 -m "$count" -r "$rate" \
    -l 100000 -nostdin -timeout 600 -default_behaviors all,-abortunexp >"$work/uac.log" 2>&1 || true
t1=$(cpu_ticks "$kam")
sipp_counts "$work/uac.log"
python3 -c 'import sys; t0, t1, tck, ok = map(int, sys.argv[1:5]); print(f"kamailio Digest (2 rounds): rate={sys.argv[5]} calls={sys.argv[6]} ok={ok} failed={sys.argv[7]} cpu_ms_per_call={(t1 - t0) * 1000 / tck / max(ok, 1):.4f}")' "$t0" "$t1" "$tck" "${ok:-0}" "$rate" "$count" "${fail:-?}"
kill "$kam" "$uas" 2>/dev/null || true; wait "$kam" "$uas" 2>/dev/null || true
