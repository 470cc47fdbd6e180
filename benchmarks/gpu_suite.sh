#!/usr/bin/env bash
# Every GPU check of this repo in one call, for a lent GPU machine with a short budget
# (correctness first, then speed). Each stage runs under its own timeout, capped by a deadline for
# the whole script, and a failing stage does not stop the next: the summary says what ran.
#
#   bash benchmarks/gpu_suite.sh [STAGE ...]        stages: verify env install tests loss iteration eval
#                                                    (default: all, in that order)
#
# verify (first): `datadam-fast backends --verify --device cuda`, every fused kernel against the
# reference on this GPU (table in verify.log, rows in verify_cuda.json); it also builds the CUDA
# extension and compiles the Triton kernels the later stages use.
#
# Environment:
#   OUT                where logs and JSON go (default benchmarks/results/gpu_<date>; the device
#                      tool's $OUT works: copy the JSON into benchmarks/results/ and commit it)
#   DEADLINE_S         seconds for the whole script (default 540: one device call is at most 600)
#   DATADAM_FAST_DATA  folder holding mnist/ (the MNIST iteration row; skipped, with a line, if absent)
#
# The device tool sends only the checkout, not ../shared: copy the data into an ignored folder and
# carry it, e.g.
#   mkdir -p .device-data && cp -r ../shared/datasets/mnist .device-data/   (12 MB; .device-data/ is ignored)
#   run: DATADAM_FAST_DATA=.device-data bash benchmarks/gpu_suite.sh     carry: [".device-data"]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_$(date -u +%F)}
mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-540} ))
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(verify env install tests loss iteration eval)
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME CAP_S CMD...: run CMD with timeout min(CAP_S, time left), log to $OUT/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 20 ]; then echo "$name: not run (deadline)" | tee -a "$SUMMARY"; return; fi
    [ "$cap" -gt "$left" ] && cap=$left
    local t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local msg="$name: rc=$rc in $(( $(date +%s) - t0 )) s (cap $cap s)"
    [ $rc -eq 124 ] && msg="$msg TIMED OUT"
    echo "$msg" | tee -a "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

VARIANTS=("paper,compile=0,real_epilogue=off" "paper,compile=0,real_epilogue=triton" "paper,compile=1"
          "paper,compile=1,compile_mode=reduce-overhead" "official,compile=1")
ITER=(benchmarks/bench_iteration.py --device cuda --iterations 5 --warmup 2
      --base "paper,compile=0,real_epilogue=off" --variants "${VARIANTS[@]}")

for s in "${STAGES[@]}"; do
    case $s in
    verify)
        step verify 180 "$PY" -m datadam_fast backends --verify --device cuda --json "$OUT/verify_cuda.json" ;;
    env)
        step env 60 "$PY" -c "
import datetime, json, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(json.dumps({'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  'torch': torch.__version__, 'triton': tv, 'cuda': torch.version.cuda,
                  'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None}, indent=2))"
        cp "$OUT/env.log" "$OUT/env.json" 2>/dev/null
        nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 ;;
    install)
        step install 240 "$PY" -m pip install --no-deps --no-build-isolation -e . ;;
    tests)
        step tests 240 "$PY" -m pytest -q -rs tests/test_backend_cuda.py tests/test_backend_triton.py \
            tests/test_real_epilogue.py tests/test_compiled.py --junitxml="$OUT/tests_gpu.xml" ;;
    loss)
        step loss 150 "$PY" benchmarks/bench_loss.py --device cuda --repeat 10 --json "$OUT/bench_loss_cuda.json" ;;
    iteration)
        if [ -n "${DATADAM_FAST_DATA:-}" ] && [ -d "${DATADAM_FAST_DATA}/mnist" ]; then
            step iteration_mnist 150 "$PY" "${ITER[@]}" --data-root "$DATADAM_FAST_DATA" \
                --json "$OUT/bench_iteration_cuda_mnist.json"
        else
            echo "iteration_mnist: not run (no mnist/ under DATADAM_FAST_DATA)" | tee -a "$SUMMARY"
        fi
        step iteration_cifar_shape 150 "$PY" "${ITER[@]}" --shape 10,3,32 \
            --json "$OUT/bench_iteration_cuda_cifar_shape.json"
        # 1000 classes x 64 real images at 64 px per iteration: fewer timed iterations
        step iteration_imagenet64_shape 200 "$PY" "${ITER[@]}" --shape 1000,3,64 --iterations 3 --warmup 1 \
            --json "$OUT/bench_iteration_cuda_imagenet64_shape.json" ;;
    eval)
        if [ -n "${DATADAM_FAST_DATA:-}" ] && [ -d "${DATADAM_FAST_DATA}/mnist" ]; then
            step eval 120 "$PY" benchmarks/bench_eval.py --device cuda --data-root "$DATADAM_FAST_DATA" \
                --json "$OUT/bench_eval_cuda.json"
        else
            echo "eval: not run (no mnist/ under DATADAM_FAST_DATA)" | tee -a "$SUMMARY"
        fi ;;
    *) echo "unknown stage '$s' (expected: verify env install tests loss iteration eval)" | tee -a "$SUMMARY" ;;
    esac
done
echo "logs and JSON in $OUT"
