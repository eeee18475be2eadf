#!/usr/bin/env bash
# Cluster measures (issue 11): gatehouse-load's complete SCRAM tunnel set-ups (three rounds,
# server-final verified, scram PSK derived, ACK, BYE)
#   1. through one gateway on SQLite, then one on PostgreSQL: CPU per set-up of the gateway
#      (and of PostgreSQL's processes, reported apart);
#   2. through Kamailio's dispatcher (deploy/cluster/kamailio.cfg, unchanged) in front of 1, 2
#      and 3 gateways on PostgreSQL: set-ups per second at an offered rate above what one
#      gateway takes (on a 2-core machine the gateways share the cores: indicative only);
#   3. the failover gap: kill -9 of one of three gateways in the middle of a run; the slowest
#      set-ups are the ones whose gateway died (the balancer waits FR_TIMER_MS, 1000 here).
#
# Usage: cluster.sh [RATE=300] [COUNT=3000]
# Needs: root (PostgreSQL runs as the `postgres` user in a scratch folder), postgresql,
# kamailio, release builds of gatehouse and gatehouse-load (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-300}; count=${2:-3000}
command -v kamailio >/dev/null 2>&1 || { echo "kamailio not installed: apt-get install kamailio" >&2; exit 1; }
# Debian keeps the server programs out of PATH, in /usr/lib/postgresql/VERSION/bin.
if command -v pg_ctl >/dev/null 2>&1; then
    pgbin=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
else
    pgbin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)
fi
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL not installed: apt-get install postgresql" >&2; exit 1; }

# --- PostgreSQL in the scratch folder, as `postgres`, on a free port.
chmod 755 "$work"; mkdir "$work/pg"; chown postgres:postgres "$work/pg"
pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
    -o "-p $pgport -k $work/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
trap 'runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
pgurl="postgres://postgres@127.0.0.1:$pgport/postgres"
pg_ticks() {
    local total=0 p
    for p in $(pgrep -u postgres); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

echo alice-secret >"$work/password"
# The answerer behind every gateway.
sipp -sf "$repo/tests/sipp/uas.xml" -i 127.0.0.1 -p 5070 -nostdin -timeout 900 \
    -default_behaviors all,-abortunexp >"$work/uas.log" 2>&1 &
uas=$!
wait_udp 5070

# gateway N STORE: starts gateway N on 127.0.0.(10+N):5066; its PID in gw_pid[N].
declare -A gw_pid
gateway() {
    local n=$1 store=$2 ip="127.0.0.$((10 + $1))"
    sasl_gateway "$ip:5066" "$store" "[cluster]
balancers = [\"127.0.0.10\"]" >"$work/gw$n.toml"
    # LIMITS=1: the rule (the file's last table) gets a limit, counted cluster-wide on PostgreSQL.
    [ -n "${LIMITS:-}" ] && echo 'max_tunnels_per_identity = 1000000' >>"$work/policy.toml"
    "$gh" run --config "$work/gw$n.toml" >"$work/gw$n.log" 2>&1 &
    gw_pid[$n]=$!
    for _ in $(seq 100); do ss -lun | grep -q "$ip:5066 " && return 0; sleep 0.1; done
    echo "gateway $n did not start:" >&2; cat "$work/gw$n.log" >&2; return 1
}
stop_gateways() {
    for p in "${gw_pid[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    gw_pid=()
}
# loadrun TARGET RATE COUNT: gatehouse-load against TARGET; its summary in $work/load.log.
loadrun() {
    "$load" --gateway "$1" --password-file "$work/password" --rate "$2" --count "$3" \
        --concurrency 200 --quiet >"$work/load.log" 2>&1 || true
    ok=$(awk '/^set-ups:/ {print $4}' "$work/load.log")
    failed=$(awk '/^set-ups:/ {print $6}' "$work/load.log")
    persec=$(sed -n 's/.* in [0-9.]* s (\([0-9.]*\)\/s).*/\1/p' "$work/load.log" | head -1)
}

# --- 1. One gateway: SQLite, then PostgreSQL, then PostgreSQL with a tunnel limit (each set-up
# counted by the database before it is relayed).
for kind in sqlite postgres postgres+limits; do
    store="$work/store.sqlite"; [ "$kind" != sqlite ] && store="$pgurl"
    LIMITS=""; [ "$kind" = postgres+limits ] && LIMITS=1
    gateway 1 "$store"
    LIMITS=""
    g0=$(cpu_ticks "${gw_pid[1]}"); p0=$(pg_ticks)
    loadrun 127.0.0.11:5066 "$rate" "$count"
    g1=$(cpu_ticks "${gw_pid[1]}"); p1=$(pg_ticks)
    python3 -c 'import sys; g0,g1,p0,p1,tck,ok=map(int,sys.argv[1:7]); print(f"one gateway on {sys.argv[7]}: rate={sys.argv[8]} set-ups={sys.argv[9]} ok={ok} failed={sys.argv[10]} gateway_cpu_ms_per_setup={(g1-g0)*1000/tck/max(ok,1):.4f} postgres_cpu_ms_per_setup={(p1-p0)*1000/tck/max(ok,1):.4f}")' \
        "$g0" "$g1" "$p0" "$p1" "$tck" "${ok:-0}" "$kind" "$rate" "$count" "${failed:-?}"
    stop_gateways
done

# --- 2. 1, 2, 3 gateways behind the dispatcher, offered twice the rate.
balancer() {
    local n list="$work/dispatcher.list"
    : >"$list"
    for n in $(seq "$1"); do echo "1 sip:127.0.0.$((10 + n)):5066" >>"$list"; done
    mkdir -p "$work/kam"
    kamailio -f "$repo/deploy/cluster/kamailio.cfg" -DD -E -n 2 -m 256 -M 16 \
        -l udp:127.0.0.10:5066 -A "DISPATCHER_LIST=\"$list\"" -A PING_INTERVAL=1 -A FR_TIMER_MS=1000 \
        -P "$work/kam/kamailio.pid" -Y "$work/kam" >"$work/kamailio.log" 2>&1 &
    kam=$!
    for _ in $(seq 100); do ss -lun | grep -q "127.0.0.10:5066 " && return 0; sleep 0.1; done
    echo "kamailio did not start" >&2; return 1
}
for n in 1 2 3; do
    for i in $(seq "$n"); do gateway "$i" "$pgurl"; done
    balancer "$n"
    loadrun 127.0.0.10:5066 $((rate * 2)) "$count"
    echo "dispatcher + $n gateway(s) on PostgreSQL: offered=$((rate * 2))/s set-ups=$count ok=${ok:-0} failed=${failed:-?} setups_per_s=${persec:-?}"
    sed -n 's/^set-up time ms: /  set-up time ms: /p; s/^failed: /  failed: /p' "$work/load.log"
    kill "$kam"; wait "$kam" 2>/dev/null || true
    stop_gateways
done

# --- 3. Failover gap: gateway 2 of 3 killed with -9 a second into the run.
for i in 1 2 3; do gateway "$i" "$pgurl"; done
balancer 3
( sleep 1; kill -9 "${gw_pid[2]}" ) &
loadrun 127.0.0.10:5066 "$rate" $((rate * 4))
# (Set-ups in flight on the dead gateway may be lost: reported as lost, not as failures.)
echo "kill -9 of 1 of 3 gateways mid-run: set-ups=$((rate * 4)) ok=${ok:-0} lost=${failed:-?}"
sed -n 's/^set-up time ms: /  set-up time ms (the slowest waited for the failover): /p; s/^failed: /  lost: /p' "$work/load.log"
kill "$kam" 2>/dev/null || true; wait "$kam" 2>/dev/null || true
stop_gateways
kill "$uas" 2>/dev/null || true
