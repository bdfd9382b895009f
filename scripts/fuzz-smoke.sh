#!/usr/bin/env bash
# Fuzz smoke test: runs every cargo-fuzz target in fuzz/ for a short time and
# fails if any target crashes (panic, failed invariant, sanitizer report,
# timeout or OOM). Meant for CI; see fuzz/README.md.
#
#   scripts/fuzz-smoke.sh                 # every target, 20 s each
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh
#   FUZZ_TARGETS="flow_key gso" scripts/fuzz-smoke.sh
#
# Environment:
#   FUZZ_SECONDS      seconds per target (default 20)
#   FUZZ_TARGETS      space-separated subset (default: cargo fuzz list)
#   CARGO_TARGET_DIR  build directory (default fuzz/target)
#   FUZZ_SANITIZER    address (default) or none
#   FUZZ_LOG_DIR      keep each target's libFuzzer log here (default: discarded)
#   CARGO_FUZZ_VERSION  cargo-fuzz version installed when `cargo fuzz` is
#                     missing (default 0.13.2; an installed one is used as is)
#
# Needs only the stable toolchain: cargo-fuzz's -Zsanitizer flags are allowed
# through RUSTC_BOOTSTRAP=1. The seed corpora in fuzz/corpus/<target> are
# read, never written: new inputs go to a scratch directory that is removed
# on exit. Crash reproducers land in fuzz/artifacts/<target>/; for a failed
# target the script prints the reproducer's path, its bytes in hex (so a CI
# log is enough to recreate it) and the command that replays it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
TARGET_DIR="${CARGO_TARGET_DIR:-$FUZZ_DIR/target}"
SANITIZER="${FUZZ_SANITIZER:-address}"
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
export RUSTC_BOOTSTRAP=1

case "$SECONDS_PER_TARGET" in
    '' | *[!0-9]*) echo "FUZZ_SECONDS must be a whole number of seconds" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
echo "== $(cargo fuzz --version)"

cd "$FUZZ_DIR"
if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
[ "${#targets[@]}" -gt 0 ] || { echo "no fuzz targets found" >&2; exit 2; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/vswitch-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
LOG_DIR="${FUZZ_LOG_DIR:-$scratch}"
mkdir -p "$LOG_DIR"

start=$(date +%s)
echo "== building ${#targets[@]} targets (sanitizer: $SANITIZER, target dir: $TARGET_DIR)"
# `cargo fuzz build` without a name builds every target in one cargo run.
if [ -n "${FUZZ_TARGETS:-}" ]; then
    for t in "${targets[@]}"; do
        cargo fuzz build --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" "$t"
    done
else
    cargo fuzz build --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR"
fi
built=$(date +%s)

failed=()
summary=()
repro_targets=()
repro_files=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    log="$LOG_DIR/$t.log"
    args=(-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    [ -f "dicts/$t.dict" ] && args+=(-dict="dicts/$t.dict")
    seeds=()
    [ -d "corpus/$t" ] && seeds=("corpus/$t")
    echo "== $t: ${SECONDS_PER_TARGET}s"
    if cargo fuzz run --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" "$t" "$scratch/$t" "${seeds[@]}" \
        -- "${args[@]}" >"$log" 2>&1; then
        done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
        summary+=("$(printf '%-16s ok     %s' "$t" "${done_line:-"(no DONE line)"}")")
    else
        failed+=("$t")
        # libFuzzer names the input it stopped on: "Test unit written to <path>".
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        summary+=("$(printf '%-16s FAILED %s' "$t" "${crash:-"(no reproducer written; see the log above)"}")")
        echo "---- $t failed; last lines of its log:" >&2
        tail -n 40 "$log" >&2
        echo "---- $t: what failed" >&2
        grep -E -A2 'panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|^SUMMARY:' "$log" | head -n 20 >&2 || true
        if [ -n "$crash" ] && [ -f "$crash" ]; then
            repro_targets+=("$t")
            repro_files+=("$crash")
            size=$(wc -c <"$crash")
            echo "---- $t reproducer: $crash ($size bytes)" >&2
            if [ "$size" -le 8192 ]; then
                echo "hex: $(od -An -v -tx1 "$crash" | tr -d ' \n')" >&2
            fi
        fi
    fi
done
end=$(date +%s)

echo
echo "== fuzz smoke summary (build $((built - start))s, total $((end - start))s)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]}" >&2
    for i in "${!repro_targets[@]}"; do
        echo "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $SANITIZER --target-dir $TARGET_DIR ${repro_targets[$i]} ${repro_files[$i]})" >&2
    done
    [ "${#repro_targets[@]}" -gt 0 ] ||
        echo "reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<crash-file>" >&2
    exit 1
fi
