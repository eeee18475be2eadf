# Shared by the load scripts of benches/ (sourced): paths, a scratch directory removed on exit
# with every background job ended, release binaries built when missing, and two helpers.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); repo=$(dirname "$here")
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
release="${CARGO_TARGET_DIR:-$repo/target}/release"
gh="$release/gatehouse"; load="$release/gatehouse-load"
[ -x "$gh" ] && [ -x "$load" ] || (cd "$repo" && cargo build --release -p gatehouse-proxy -p wgsip --bins)
tck=$(getconf CLK_TCK)

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
