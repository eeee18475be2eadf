#!/usr/bin/env bash
# Single-host demo: three network namespaces, the gateway in the middle, a SIP-negotiated WireGuard
# tunnel with a SASL-derived PSK, and a ping across it. Run as root from the repository root after
# `cargo build --release`. Everything it creates is removed at exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); bin=$(cd "$here/../.." && pwd)/target/release
work=$(mktemp -d); cp "$here"/*.toml "$work"; cd "$work"
pids=()
cleanup() {
    # Newest first: the caller hangs up (BYE) while the endpoint and the gateway still run.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    for ns in gh-partner gh-gw gh-org; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

for ns in gh-partner gh-gw gh-org; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add ghp0 type veth peer name ghg0; ip link set ghp0 netns gh-partner; ip link set ghg0 netns gh-gw
ip link add gho0 type veth peer name ghg1; ip link set gho0 netns gh-org; ip link set ghg1 netns gh-gw
ip -n gh-partner -6 addr add 2001:db8:1::2/64 dev ghp0 nodad; ip -n gh-partner link set ghp0 up
ip -n gh-gw -6 addr add 2001:db8:1::1/64 dev ghg0 nodad; ip -n gh-gw link set ghg0 up
ip -n gh-org -6 addr add 2001:db8:2::2/64 dev gho0 nodad; ip -n gh-org link set gho0 up
ip -n gh-gw -6 addr add 2001:db8:2::1/64 dev ghg1 nodad; ip -n gh-gw link set ghg1 up
ip -n gh-partner -6 route add 2001:db8:2::/64 via 2001:db8:1::1
ip -n gh-org -6 route add 2001:db8:1::/64 via 2001:db8:2::1
ip netns exec gh-gw sysctl -q -w net.ipv6.conf.all.forwarding=1

umask 077
echo alice-secret > alice.password; echo vpn-secret > vpn.password
echo alice-secret | "$bin/gatehouse" user add alice --aor sip:alice@partner.example --store store.sqlite
echo vpn-secret | "$bin/gatehouse" user add vpn --aor sip:vpn@org.example --store store.sqlite

ip netns exec gh-gw "$bin/gatehouse" run --config gateway.toml & pids+=($!)
ip netns exec gh-org "$bin/wgsip" endpoint --config endpoint.toml > endpoint.log 2>&1 & pids+=($!)
for _ in $(seq 100); do grep -q registered endpoint.log && break; sleep 0.1; done
cat endpoint.log
ip netns exec gh-partner "$bin/wgsip" call sip:vpn@org.example --config caller.toml & pids+=($!)
for _ in $(seq 50); do ip netns exec gh-partner ping -6 -c 1 -W 1 2001:db8:789:1::1 >/dev/null 2>&1 && break; done
ip netns exec gh-partner ping -6 -c 3 2001:db8:789:1::1
echo "PSK in use on both sides (compare): $(ip netns exec gh-partner wg show wgpartner preshared-keys | cut -f2 | sha256sum | cut -c1-16) $(ip netns exec gh-org wg show wgorg preshared-keys | cut -f2 | sha256sum | cut -c1-16)"
