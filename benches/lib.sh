# Shared by the load scripts of benches/ (sourced): paths, a scratch directory removed on exit
# with every background job ended, release binaries built when missing, and two helpers.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); repo=$(dirname "$here")
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# GATEHOUSE_BIN: another build's binaries (CI's smokes run the test build's, target/debug: the
# figures of a smoke mean nothing, and a second, release build would double CI's build time).
release="${GATEHOUSE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release}"
gh="$release/gatehouse"; load="$release/gatehouse-load"
if [ -n "${GATEHOUSE_BIN:-}" ]; then
    [ -x "$gh" ] && [ -x "$load" ] || { echo "no gatehouse or gatehouse-load in GATEHOUSE_BIN=$release" >&2; exit 1; }
else
    [ -x "$gh" ] && [ -x "$load" ] || (cd "$repo" && cargo build --release -p gatehouse-proxy -p wgsip --bins)
fi
tck=$(getconf CLK_TCK)

# The SASL load set-up: alice in the store STORE (a file or a postgres:// URL), the tunnel
# policy in $work/policy.toml, and on standard output a gateway configuration listening on
# ADDRESS (UDP) with STORE, routing sip:vpn@org.example to the answerer at 127.0.0.1:5070 (inside:
# the scram PSK may go to it), nobody trusted; EXTRA is appended.
sasl_gateway() {
    local address=$1 store=$2 extra=${3:-}
    echo alice-secret | "$gh" user add alice --aor sip:alice@partner.example --store "$store" >/dev/null 2>&1 || true
    cat >"$work/policy.toml" <<'TOML'
[[rule]]
name = "partners"
kind = "tunnel"
callers = ["*@partner.example"]
targets = ["sip:vpn@org.example"]
pskmth = ["scram", "none"]
prefixes = ["2001:db8:456::/48"]
TOML
    cat <<TOML
[sip]
domains = ["org.example"]
[[listen]]
transport = "udp"
address = "$address"
[auth]
store = "$store"
mechanisms = ["SCRAM-SHA-256"]
# One load client on one address runs every exchange (the default cap is 32 per source).
max_pending_per_source = 10000
[tunnels]
policy = "$work/policy.toml"
internal_networks = ["127.0.0.0/8"]
[rate_limit]
# One load client on one address sends every set-up.
enabled = false
[limits]
max_transactions = 500000
[[route]]
aor = "sip:vpn@org.example"
target = "sip:vpn@127.0.0.1:5070"
[log]
level = "warn"
$extra
TOML
}

# Waits (at most 10 s) until something is bound to UDP 127.0.0.1:PORT.
wait_udp() {
    for _ in $(seq 100); do
        ss -lun 2>/dev/null | grep -q "127.0.0.1:$1 " && return 0
        sleep 0.1
    done
    echo "nothing bound to UDP port $1" >&2
    return 1
}

# CPU ticks (user + system) of a process and its children (Kamailio forks its workers).
cpu_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Reads SIPp's final counts from its log: sets ok and fail.
sipp_counts() {
    ok=$(grep 'Successful call' "$1" | tail -1 | awk -F'|' '{print $3}' | tr -d ' ')
    fail=$(grep 'Failed call' "$1" | tail -1 | awk -F'|' '{print $3}' | tr -d ' ')
}
