#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30), one
# after the other, and fails if any of them crashed, hung or ran out of memory.
#
#   scripts/fuzz.sh          # short run: 30 s per target (make reliability)
#   scripts/fuzz.sh 3600     # long run: an hour per target
#
# Needs a nightly toolchain (rustup toolchain install nightly); installs
# cargo-fuzz if it is missing. Each target starts from its committed seeds
# in fuzz/corpus/<target> and grows a working corpus in
# fuzz/target/corpus/<target> (kept between runs, not committed). Crashing
# inputs are written to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-30}"
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
toolchain="${NIIX_FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "fuzz.sh: the $toolchain toolchain is missing: rustup toolchain install $toolchain" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Builds share the machine: one build job unless told otherwise; libFuzzer
# itself runs one process (no -jobs/-fork).
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo "+$toolchain" fuzz build

failed=()
for target in $(cargo "+$toolchain" fuzz list); do
    work="target/corpus/$target"
    mkdir -p "$work" "corpus/$target" "artifacts/$target"
    echo "== fuzz $target for ${seconds}s"
    if ! cargo "+$toolchain" fuzz run "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz.sh: FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce with" \
        "cargo +$toolchain fuzz run <target> fuzz/artifacts/<target>/<file>)" >&2
    exit 1
fi
echo "fuzz.sh: every target ran ${seconds}s without a finding"
