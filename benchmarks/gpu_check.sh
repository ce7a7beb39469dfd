#!/usr/bin/env bash
# The GPU check of longnet: one script, at most ~10 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run   # every step at tiny sizes on CPU (tests the script)
#
# Steps, each under its own `timeout` (a step that fails or runs out of time does not stop the
# others):
#   1. pytest     python -m pytest -m cuda -q
#   2. attention  longnet bench attention, bf16, dilated vs SDPA (flash), N = 8K ... 1M
#   3. train_8k   benchmarks/train_speed.py, preset base, seq 8K, eager and compiled (tokens/s, MFU)
#   4. train_32k  the same at seq 32K
#   5. decode     benchmarks/decode.py, preset base, a short setting (ms/token vs position)
#   6. anchors    benchmarks/anchors.py at 16K, causal: dense SDPA, longnet and FlexAttention computing
#                 longnet's function, forward and forward + backward (Flex's backward runs on CUDA only)
#
# Everything goes to benchmarks/results/gpu_check_<device>/ (<device> from
# `nvidia-smi --query-gpu=name`): each step's log, its JSON/PNG, env.txt, and summary.txt /
# summary.json saying which steps passed; a rerun replaces them (the steps get --overwrite: the folder
# is this script's own). Exit status 0 when every step passed, 1 otherwise,
# 2 when the script could not start.
#
# Environment (all optional):
#   GPU_CHECK_OUT      results root (default: benchmarks/results of this checkout)
#   GPU_CHECK_PYTHON   python to use (default: python3)
#   GPU_CHECK_STEPS    space-separated subset of: pytest attention train_8k train_32k decode anchors
#   GPU_CHECK_TIMEOUT_<STEP>  seconds for one step, e.g. GPU_CHECK_TIMEOUT_ATTENTION=200
#                      (defaults: pytest 75, attention 110, train_8k 110, train_32k 125, decode 60,
#                      anchors 120)
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
[ "${GPU_CHECK_DRY_RUN:-0}" = "1" ] && DRY_RUN=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${GPU_CHECK_PYTHON:-python3}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# one python start: can it import torch and longnet, is CUDA there, the CPU's file-name slug
PROBE="$("$PY" -c 'import torch; from longnet.bench.report import device_slug
print(int(torch.cuda.is_available()), device_slug(torch.device("cpu")))' 2>/dev/null)"
if [ -z "$PROBE" ]; then
    echo "gpu_check.sh: '$PY' cannot import torch and longnet; set GPU_CHECK_PYTHON to a python with torch" >&2
    exit 2
fi
read -r HAS_CUDA CPU_SLUG <<< "$PROBE"

if [ "$DRY_RUN" = "1" ]; then
    DEVICE="cpu"
    SLUG="dryrun-$CPU_SLUG"
else
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check.sh: nvidia-smi not found: this is not a GPU machine (use --dry-run to test the script on CPU)" >&2
        exit 2
    fi
    if [ "$HAS_CUDA" != "1" ]; then
        echo "gpu_check.sh: torch.cuda.is_available() is False for '$PY' (CPU-only torch build?)" >&2
        exit 2
    fi
    DEVICE="cuda"
    NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
    SLUG="cuda-$(echo "$NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
fi
[ -n "$SLUG" ] || SLUG="unknown"

ROOT="${GPU_CHECK_OUT:-$REPO/benchmarks/results}"
OUT="$ROOT/gpu_check_$SLUG"
mkdir -p "$OUT" || exit 2
echo "gpu_check.sh: device $DEVICE ($SLUG), results in $OUT$( [ "$DRY_RUN" = "1" ] && echo ', DRY RUN (tiny sizes on CPU)')"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "dry_run: $DRY_RUN"
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$( [ -n "$(git -C "$REPO" status --porcelain -- src benchmarks 2>/dev/null)" ] && echo '+dirty')"
    "$PY" -c 'import sys, torch; print("python:", sys.version.split()[0]); print("torch:", torch.__version__, "cuda:", torch.version.cuda); print("cuda_available:", torch.cuda.is_available()); [print(f"gpu{i}:", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
    if [ "$DRY_RUN" = "0" ]; then nvidia-smi; fi
} > "$OUT/env.txt" 2>&1

# --------------------------------------------------------------------------- step settings
if [ "$DRY_RUN" = "1" ]; then
    ATTN_ARGS=(--quick --device cpu --dtype float32 --threads 1)
    TRAIN_COMMON=(--presets tiny --steps 1 --warmup 0 --device cpu --threads 1 --compile-backend eager)
    TRAIN_8K=(--seq-len 128 --tag 8k)
    TRAIN_32K=(--seq-len 256 --tag 32k)
    DECODE_ARGS=(--preset tiny --positions 1024 --steps 1 --rounds 1 --warmup 1 --dense-max 1024 --no-compact
                 --device cpu --threads 1)
    ANCHOR_ARGS=(--device cpu --threads 1 --seq-lens 1024 --heads 2 --flex-max-seq-len 1024 --repeats 1
                 --min-rounds 1 --max-rounds 1)
    DEFAULT_TIMEOUT=120
else
    ATTN_ARGS=(--device cuda --dtype bfloat16 --causal --mode both
               --seq-lens 8192,16384,32768,65536,131072,262144,524288,1048576 --dense-max-seq-len 262144
               --repeats 3 --warmup 1)
    TRAIN_COMMON=(--presets base --steps 5 --warmup 2 --device cuda --dtype bfloat16)
    TRAIN_8K=(--seq-len 8192 --tag 8k)
    TRAIN_32K=(--seq-len 32768 --tag 32k)
    DECODE_ARGS=(--preset base --positions 8192,65536,262144,1048576 --steps 4 --rounds 3 --warmup 2
                 --dense-max 262144 --no-compact --device cuda)
    ANCHOR_ARGS=(--device cuda --seq-lens 16384 --flex-max-seq-len 16384 --repeats 3 --min-rounds 1 --max-rounds 1)
    DEFAULT_TIMEOUT=
fi

timeout_for() {  # step name -> seconds
    local var="GPU_CHECK_TIMEOUT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
    local default
    case "$1" in
        pytest) default=75 ;; attention) default=110 ;; train_8k) default=110 ;;
        train_32k) default=125 ;; decode) default=60 ;; anchors) default=120 ;; *) default=60 ;;
    esac
    echo "${!var:-${DEFAULT_TIMEOUT:-$default}}"
}

STEPS="${GPU_CHECK_STEPS:-pytest attention train_8k train_32k decode anchors}"
RESULTS=()  # "name|status|seconds|rc"

run_step() {  # name, command...: runs under timeout, logs to $OUT/<name>.log
    local name="$1"; shift
    local limit; limit="$(timeout_for "$name")"
    local log="$OUT/$name.log"
    echo "=== $name (timeout ${limit}s): $*" | tee "$log"
    local t0=$SECONDS
    # SIGINT first: the benchmarks catch it and still write their table, JSON and plot
    timeout -s INT -k 20 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    local status
    case "$rc" in
        0) status="passed" ;;
        124|137) status="timeout" ;;  # timeout(1): 124 after the signal, 137 after -k's SIGKILL
        *) status="failed" ;;
    esac
    RESULTS+=("$name|$status|$took|$rc")
    echo "--- $name: $status (rc $rc, ${took}s); last lines of $log:"
    tail -n 4 "$log" | cut -c1-200
}

for step in $STEPS; do
    case "$step" in
        pytest)
            run_step pytest "$PY" -m pytest -m cuda -q -p no:cacheprovider tests ;;
        attention)
            run_step attention "$PY" -m longnet bench attention "${ATTN_ARGS[@]}" --out "$OUT" --overwrite --no-progress ;;
        train_8k)
            run_step train_8k "$PY" benchmarks/train_speed.py "${TRAIN_COMMON[@]}" "${TRAIN_8K[@]}" --out "$OUT" \
                --overwrite --no-progress ;;
        train_32k)
            run_step train_32k "$PY" benchmarks/train_speed.py "${TRAIN_COMMON[@]}" "${TRAIN_32K[@]}" --out "$OUT" \
                --overwrite --no-progress ;;
        decode)
            run_step decode "$PY" benchmarks/decode.py "${DECODE_ARGS[@]}" --out "$OUT" --overwrite ;;
        anchors)
            run_step anchors "$PY" benchmarks/anchors.py "${ANCHOR_ARGS[@]}" --out "$OUT" --overwrite ;;
        *)
            echo "gpu_check.sh: unknown step '$step' in GPU_CHECK_STEPS" >&2
            RESULTS+=("$step|unknown step|0|2") ;;
    esac
done

# --------------------------------------------------------------------------------- summary
{
    echo "gpu_check on $SLUG$( [ "$DRY_RUN" = "1" ] && echo ' (DRY RUN: tiny sizes on CPU, not GPU numbers)')"
    printf '%-10s %-13s %8s %4s\n' step status seconds rc
    for r in "${RESULTS[@]}"; do
        IFS='|' read -r n s t c <<< "$r"
        printf '%-10s %-13s %8s %4s\n' "$n" "$s" "$t" "$c"
    done
} > "$OUT/summary.txt"
{
    printf '{"benchmark": "gpu_check", "device": "%s", "dry_run": %s, "steps": [' "$SLUG" \
        "$( [ "$DRY_RUN" = "1" ] && echo true || echo false)"
    sep=""
    for r in "${RESULTS[@]}"; do
        IFS='|' read -r n s t c <<< "$r"
        printf '%s{"step": "%s", "status": "%s", "seconds": %s, "rc": %s}' "$sep" "$n" "$s" "$t" "$c"
        sep=", "
    done
    printf ']}\n'
} > "$OUT/summary.json"
cat "$OUT/summary.txt"
echo "wrote $OUT"
cat "$OUT/summary.json"

for r in "${RESULTS[@]}"; do
    IFS='|' read -r _ s _ _ <<< "$r"
    [ "$s" = "passed" ] || exit 1
done
exit 0
