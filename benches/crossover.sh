#!/usr/bin/env bash
# Realm crossover under load (issue 19): gatehouse-load runs complete SXOVER-PLUS set-ups by bob,
# who has an account only at partner.example, through org.example's gateway (the foreign side) to
# partner.example's crossover service (the home), each gateway a process of its own, over one TLS
# connection: CPU per set-up at each side and set-up time quantiles. Then, through the same
# gateway, local SCRAM-SHA-256-PLUS set-ups of its own user alice over TLS, for comparison.
# Certificates from a scratch CA (openssl), the home key from `gatehouse xover-key`.
#
# Usage: crossover.sh [RATE=50] [COUNT=1000]
# Needs: sipp, openssl, release builds of gatehouse and gatehouse-load (built when missing).
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
rate=${1:-50}; count=${2:-1000}
cd "$work"

# --- A scratch CA and the two domains' certificates (server and client use).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj /CN=bench-ca 2>/dev/null
issue() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=$2" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$2" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
}
issue org org.example
issue partner partner.example
home_key=$("$gh" xover-key home.key)
echo bob-secret | "$gh" user add bob --aor sip:bob@partner.example --store home.sqlite >/dev/null
echo alice-secret | "$gh" user add alice --aor sip:alice@org.example --store org.sqlite >/dev/null

# --- partner.example: bob's home.
cat >home.toml <<TOML
[sip]
domains = ["partner.example"]
[[listen]]
transport = "udp"
address = "127.0.0.1:5091"
[tls]
certificate = "partner.pem"
private_key = "partner.key"
[auth]
store = "home.sqlite"
[crossover]
trusted_cas = "ca.pem"
[crossover.home]
listen = "127.0.0.1:8443"
key_file = "home.key"
foreign_domains = ["org.example"]
rate_per_domain = 100000
[log]
level = "warn"
TOML

# --- org.example: the foreign side for bob, the gateway of its own user alice.
cat >policy.toml <<'TOML'
[[rule]]
name = "partners-by-crossover"
kind = "tunnel"
callers = ["*@partner.example"]
crossover = ["partner.example"]
targets = ["sip:vpn@org.example"]
pskmth = ["xover"]
require_psk = true
prefixes = ["2001:db8:456::/48"]
[[rule]]
name = "staff"
kind = "tunnel"
callers = ["*@org.example"]
targets = ["sip:vpn@org.example"]
pskmth = ["scram", "none"]
prefixes = ["2001:db8:456::/48"]
TOML
cat >org.toml <<TOML
[sip]
domains = ["org.example"]
[[listen]]
transport = "tls"
address = "127.0.0.1:5061"
[[listen]]
transport = "udp"
address = "127.0.0.1:5066"
[tls]
certificate = "org.pem"
private_key = "org.key"
[auth]
store = "org.sqlite"
# One load client on one address runs every exchange.
max_pending_per_source = 10000
[tunnels]
policy = "policy.toml"
internal_networks = ["127.0.0.0/8"]
[crossover]
enabled = true
certificate = "org.pem"
private_key = "org.key"
trusted_cas = "ca.pem"
allow_private = true
deadline_ms = 5000
max_pending = 10000
max_pending_per_realm = 10000
[crossover.homes]
"partner.example" = "127.0.0.1:8443"
[rate_limit]
enabled = false
[limits]
max_transactions = 500000
[[route]]
aor = "sip:vpn@org.example"
target = "sip:vpn@127.0.0.1:5070"
[log]
level = "warn"
TOML

"$gh" run --config home.toml >home.log 2>&1 &
home=$!
"$gh" run --config org.toml >org.log 2>&1 &
org=$!
sipp -sf "$repo/tests/sipp/uas.xml" -i 127.0.0.1 -p 5070 -nostdin -timeout 600 \
    -default_behaviors all,-abortunexp >uas.log 2>&1 &
uas=$!
wait_udp 5091; wait_udp 5066; wait_udp 5070

# Runs gatehouse-load with ARGS; prints the CPU per set-up of org.example's gateway and of the
# home, and the load client's summary.
measure() {
    local label=$1; shift
    local o0 h0 o1 h1 ok failed
    o0=$(cpu_ticks "$org"); h0=$(cpu_ticks "$home")
    "$load" --gateway 127.0.0.1:5061 --tls-ca ca.pem --tls-server-name org.example \
        --rate "$rate" --count "$count" --concurrency 200 --quiet "$@" >load.log 2>&1 || true
    o1=$(cpu_ticks "$org"); h1=$(cpu_ticks "$home")
    ok=$(awk '/^set-ups:/ {print $4}' load.log)
    failed=$(awk '/^set-ups:/ {print $6}' load.log)
    python3 -c 'import sys; o0, o1, h0, h1, tck, ok = map(int, sys.argv[1:7]); n = max(ok, 1); print(f"{sys.argv[7]}: rate={sys.argv[8]} set-ups={sys.argv[9]} ok={ok} failed={sys.argv[10]} cpu_ms_per_setup org.example={(o1 - o0) * 1000 / tck / n:.3f} home={(h1 - h0) * 1000 / tck / n:.3f}")' \
        "$o0" "$o1" "$h0" "$h1" "$tck" "${ok:-0}" "$label" "$rate" "$count" "${failed:-?}"
    sed 's/^/  /' load.log
}

echo bob-secret >bob.password
measure "crossover (SXOVER-PLUS, bob by his home)" --user bob --password-file bob.password \
    --from sip:bob@partner.example --home-key "$home_key" --identity bob@partner.example
echo alice-secret >alice.password
measure "local SCRAM-SHA-256-PLUS (alice)" --user alice --password-file alice.password \
    --from sip:alice@org.example

kill "$org" "$home" "$uas" 2>/dev/null || true
wait "$org" "$home" "$uas" 2>/dev/null || true
