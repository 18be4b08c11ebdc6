#!/usr/bin/env bash
# The GPU check of issue 11, in one script that finishes in under 8 minutes on a CUDA machine:
#
#   1. gridgraph verify --device cuda      every layer and the reference networks against torch on the GPU
#   2. pytest -k cuda                       the CUDA cases of the test suite (the device-parametrised tests)
#   3. benchmarks/run.py --device cuda      the dense suite on the GPU, TF32 off, against cuDNN (run.py's
#                                           conv2d reference; both layouts where run.py times both)
#   4. benchmarks/networks.py --device cuda whole converted networks against the originals on cuDNN (TF32
#                                           off; needs timm: pip install -e ".[bench]"), one pass
#
# Each step has its own time limit (VERIFY_S, TESTS_S, BENCH_S, NETWORKS_S seconds; 90 + 210 + 150 + 270
# by default: the networks step alone stays under 5 minutes); a step that fails or runs out of time is
# reported and the next one still runs. Logs, the benchmark's JSON and chart, the machine's description
# and a summary go to a fresh folder, benchmarks/results/gpu-<date>/ (or $OUT_DIR).
#
# Usage (from the repository root, with gridgraph installed: pip install -e ".[test]"):
#   bash benchmarks/gpu.sh               # on a CUDA machine
#   DEVICE=cpu bash benchmarks/gpu.sh    # the same steps on the CPU, quick variants (checks the script)
#   bash benchmarks/gpu.sh --dry-run     # print the commands, run nothing
#
# Exit status: 0 when every step passed, 1 otherwise (see summary.txt).
set -u -o pipefail

DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
VERIFY_S="${VERIFY_S:-90}"
TESTS_S="${TESTS_S:-210}"
BENCH_S="${BENCH_S:-150}"
NETWORKS_S="${NETWORKS_S:-270}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"

# The benchmark's methods: run.py's own list without the slow PyG baselines (rgcn, naive), so that any
# reference run.py adds (e.g. F.conv2d channels-last) is kept.
if [ "$DRY_RUN" = 1 ]; then
  METHODS="<run.py's METHODS without rgcn and naive>"
else
  METHODS="$("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); import run; print(",".join(m for m in run.METHODS if m not in ("rgcn", "naive")))')" \
    || { echo "gpu.sh: cannot import benchmarks/run.py with $PYTHON" >&2; exit 2; }
fi

if [ "$DEVICE" = "cpu" ]; then  # quick stand-ins of the same three steps
  VERIFY=("$PYTHON" -m gridgraph verify --device cpu --quick --no-progress)
  TESTS=("$PYTHON" -m pytest -q -p no:cacheprovider tests/test_masked.py -k "cpu and submanifold and float64")
  BENCH=("$PYTHON" benchmarks/run.py --device cpu --quick --threads 1 --methods "$METHODS" --out-dir "$OUT_DIR/bench")
  NETWORKS=("$PYTHON" benchmarks/networks.py --device cpu --quick --cases unet-b1,tiny-conv --out-dir "$OUT_DIR/networks")
else
  VERIFY=("$PYTHON" -m gridgraph verify --device "$DEVICE" --no-progress --json "$OUT_DIR/verify.json")
  TESTS=("$PYTHON" -m pytest -q -p no:cacheprovider -k cuda -rs)
  BENCH=("$PYTHON" benchmarks/run.py --device "$DEVICE" --methods "$METHODS" --rounds 3 --budget 0.6
         --no-construction --out-dir "$OUT_DIR/bench")
  NETWORKS=("$PYTHON" benchmarks/networks.py --device "$DEVICE" --runs 1 --rounds 3 --min-block 0.1
            --out-dir "$OUT_DIR/networks")
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu.sh --dry-run: DEVICE=$DEVICE, logs would go to $OUT_DIR"
  echo "  1. (limit ${VERIFY_S}s) ${VERIFY[*]}"
  echo "  2. (limit ${TESTS_S}s) ${TESTS[*]}"
  echo "  3. (limit ${BENCH_S}s) ${BENCH[*]}"
  echo "  4. (limit ${NETWORKS_S}s) ${NETWORKS[*]}"
  exit 0
fi

mkdir -p "$OUT_DIR" || exit 2
if [ "$DEVICE" != "cpu" ]; then
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu.sh: torch sees no CUDA device (DEVICE=$DEVICE); use DEVICE=cpu to check the script" >&2; exit 2; }
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "device: $DEVICE"
  "$PYTHON" -c 'import torch, torch_geometric, gridgraph, platform
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| torch_geometric", torch_geometric.__version__,
      "| gridgraph", gridgraph.__version__)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print("gpu", i, torch.cuda.get_device_name(i))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
} > "$OUT_DIR/environment.txt" 2>&1

status=0
: > "$OUT_DIR/summary.txt"
run_step() {  # name, time limit (s), log file, command...
  local name="$1" limit="$2" log="$3"; shift 3
  local start end rc
  start=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  end=$(date +%s)
  case $rc in
    0) verdict="passed" ;;
    124|137) verdict="TIMED OUT after ${limit}s"; status=1 ;;
    *) verdict="FAILED (exit $rc)"; status=1 ;;
  esac
  echo "   $verdict in $((end - start)) s; log: $log; last line: $(tail -n 1 "$log")" | tee -a "$OUT_DIR/summary.txt"
}

t0=$(date +%s)
run_step "1. gridgraph verify" "$VERIFY_S" "$OUT_DIR/verify.log" "${VERIFY[@]}"
run_step "2. tests on $DEVICE" "$TESTS_S" "$OUT_DIR/tests.log" "${TESTS[@]}"
run_step "3. benchmark on $DEVICE" "$BENCH_S" "$OUT_DIR/bench.log" "${BENCH[@]}"
run_step "4. networks on $DEVICE" "$NETWORKS_S" "$OUT_DIR/networks.log" "${NETWORKS[@]}"
echo "total: $(( $(date +%s) - t0 )) s; results in $OUT_DIR" | tee -a "$OUT_DIR/summary.txt"
exit $status
