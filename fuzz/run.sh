#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 5: the CI smoke) from its seeds, in a
# fresh corpus directory, and prints the executions and findings of each. A crash fails the
# script and leaves its input under fuzz/artifacts/TARGET/.
#   fuzz/run.sh [SECONDS] [TARGET...]
# RUNS=N stops a target after N executions if that comes first (long campaigns:
# RUNS=10000000 fuzz/run.sh 900).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-5}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
# Seed directories of a target: its seeds, and every input that once crashed it.
seeds_of() {
    case "$1" in
        sip_message | stream_framer) echo ../tests/fixtures/rfc4475 ;;
        policy_file) echo ../deploy/examples ;;
        *) if [ -d "seeds/$1" ]; then echo "seeds/$1"; fi ;;
    esac
    if [ -d "regressions/$1" ]; then echo "regressions/$1"; fi
}
# FUZZ_DEV=1: build without optimisations (CI's smoke: the build takes half the time; the
# targets run slower, which a few seconds of smoke does not mind). Campaigns keep the default.
build=(-s none)
if [ -n "${FUZZ_DEV:-}" ]; then build+=(--dev); fi
cargo +nightly fuzz build "${build[@]}" >/dev/null
status=0
for t in "${targets[@]}"; do
    corpus=$(mktemp -d)
    # shellcheck disable=SC2046
    if ! out=$(cargo +nightly fuzz run "${build[@]}" "$t" "$corpus" $(seeds_of "$t") -- \
        -max_total_time="$secs" ${RUNS:+-runs="$RUNS"} -print_final_stats=1 -rss_limit_mb=4096 2>&1); then
        status=1
        echo "$t: FAILED"
        echo "$out" | grep -E "panicked|SUMMARY|artifact|Test unit written" | head -20
    fi
    runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
    took=$(echo "$out" | sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' | tail -1)
    echo "$t: ${runs:-?} executions in ${took:-$secs}s, corpus $(find "$corpus" -type f | wc -l) inputs"
    rm -rf "$corpus"
done
exit $status
