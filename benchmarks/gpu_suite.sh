#!/usr/bin/env bash
# Every GPU check of this repo in one call, for a GPU machine lent for a few minutes: the most
# valuable figures first, each stage under its own cap, everything packed after every stage.
#
#   bash benchmarks/gpu_suite.sh [STAGE ...]     default: every stage, in the order below
#   DRY=1 bash benchmarks/gpu_suite.sh           the same stages on the CPU with tiny shapes (CI)
#   PLAN_ONLY=1 bash benchmarks/gpu_suite.sh     print the stage plan (caps, latest start) and exit
#
# Stages, in order (cap in seconds; a stage runs for min(cap, time left before DEADLINE_S)):
#   env            versions, TF32 switches, clocks, measured ceilings (copy GB/s, bf16 GEMM TFLOP/s)
#   install        pip install --no-deps --no-build-isolation -e . (offline)
#   verify         datadam-fast backends --verify --device cuda --require triton,cuda,epilogue:triton,stats:triton
#   loss           the fused loss fwd+bwd at DataDAM shapes, fp32, vs eager and torch.compile(reference)
#   loss_bf16      the same in bf16 (CIFAR-10 and TinyImageNet shapes)
#   kernels        each streaming kernel's bytes / time against the copy bandwidth of this run
#   iteration      one whole iteration at the CIFAR-10 shape: official structure, paper (default),
#                  eager / compiled, fused real side on / off, bf16 real side, reduce-overhead
#   tests          the GPU tests (TRITON_INTERPRET=0; no host emulation) with a junit XML
#   iter_imagenet  the ImageNet-1K 64 px iteration, eager, a fixed 40 GB memory budget
#   profile        distill --profile 2 --nvtx on digits (torch.profiler trace with the NVTX names)
# The CUDA extension's nvcc build starts in the background at t = 0 and overlaps env, install and
# the Triton half of verify (verify's CUDA rows wait on its lock).
#
# What comes back: $OUT/summary.txt (one line per stage: ok / failed / cut at N s / not reached)
# and $OUT/gpu_suite.tgz (every log and JSON), both rewritten after every stage, so 2 files
# come back whatever happens. A stage over its cap gets SIGINT (its Python writes what it
# measured and exits; every benchmark rewrites its JSON after each row) and SIGKILL 10 s later.
#
# Environment:
#   OUT          where summary.txt and gpu_suite.tgz go (default benchmarks/results/gpu_suite_<date>)
#   DEADLINE_S   seconds for the whole suite (default 530: one device command is at most 600)
#   PYTHON       the interpreter (default python3; its folder goes first on PATH for ninja)
#   SUITE_WORK   the scratch folder that is packed (default: a fresh temporary folder)
#   CAP_<stage>  override one stage's cap, e.g. CAP_loss=60
#   SUITE_LOSS_ARGS  replace the loss stage's benchmark arguments (tests use it)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=${DRY:-0}
DEADLINE_S=${DEADLINE_S:-530}
ALL_STAGES=(env install verify loss loss_bf16 kernels iteration tests iter_imagenet profile)
declare -A CAP=([env]=20 [install]=25 [verify]=95 [loss]=85 [loss_bf16]=30 [kernels]=35 [iteration]=110
                [tests]=70 [iter_imagenet]=45 [profile]=15)
# a stage starts only with at least this many seconds left (less would return nothing useful)
declare -A MIN_START=([env]=10 [install]=10 [verify]=40 [loss]=30 [loss_bf16]=15 [kernels]=15 [iteration]=40
                      [tests]=30 [iter_imagenet]=30 [profile]=10)
for s in "${ALL_STAGES[@]}"; do
    v="CAP_$s"
    [ -n "${!v:-}" ] && CAP[$s]=${!v}
done

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
for s in "${STAGES[@]}"; do
    if [ -z "${CAP[$s]:-}" ]; then
        echo "gpu_suite: unknown stage '$s' (expected: ${ALL_STAGES[*]})" >&2
        exit 2
    fi
done

plan() {
    local t=0 s
    printf '%-14s %6s %8s %8s\n' stage cap_s start_s end_s
    for s in "${STAGES[@]}"; do
        printf '%-14s %6d %8d %8d\n' "$s" "${CAP[$s]}" "$t" $(( t + CAP[$s] ))
        t=$(( t + CAP[$s] ))
    done
    printf 'caps add up to %d s of DEADLINE_S=%d s\n' "$t" "$DEADLINE_S"
}
if [ "${PLAN_ONLY:-0}" = 1 ]; then plan; exit 0; fi

PY=${PYTHON:-python3}
PYBIN=$(command -v "$PY") || { echo "gpu_suite: no '$PY' on PATH (set PYTHON)" >&2; exit 2; }
export PATH="$(dirname "$PYBIN"):$PATH"   # cpp_extension needs the ninja of this environment
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONFAULTHANDLER=1
OUT=${OUT:-benchmarks/results/gpu_suite_$(date -u +%F)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${SUITE_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
# the extension cache outside the packed folder; its key keeps checkouts and torch versions apart
export DATADAM_FAST_EXT_DIR=${DATADAM_FAST_EXT_DIR:-${TMPDIR:-/tmp}/datadam_fast_ext}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/datadam_fast_triton_cache}
T0=$(date +%s)
DEADLINE=$(( T0 + DEADLINE_S ))
declare -A STATUS=()

if [ "$DRY" = 1 ]; then
    DEV=cpu
    export DATADAM_FAST_COMPILE=0
else
    DEV=cuda
fi

write_summary() {
    local f="$OUT/summary.txt.part" s
    {
        echo "gpu_suite $(date -u +%FT%TZ) dry=$DRY device=$DEV deadline=${DEADLINE_S}s elapsed=$(( $(date +%s) - T0 ))s"
        echo "build (background): ${STATUS[build]:-running}"
        for s in "${STAGES[@]}"; do
            echo "$s: ${STATUS[$s]:-not reached}"
        done
    } > "$f"
    mv -f "$f" "$OUT/summary.txt"
}

pack() {
    cp -f "$OUT/summary.txt" "$WORK/summary.txt" 2>/dev/null
    tar -czf "$OUT/gpu_suite.tgz.part" -C "$WORK" . 2>/dev/null && mv -f "$OUT/gpu_suite.tgz.part" "$OUT/gpu_suite.tgz"
}

# stage NAME CMD...: run CMD under min(cap, time left) with SIGINT at the limit; log to $WORK/NAME.log
stage() {
    local name=$1; shift
    local left=$(( DEADLINE - $(date +%s) )) cap=${CAP[$name]}
    if [ "$left" -lt "${MIN_START[$name]}" ]; then
        STATUS[$name]="not reached (deadline: ${left} s left, needs ${MIN_START[$name]})"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    STATUS[$name]="running (cap $cap s)"
    write_summary
    local t=$(date +%s)
    timeout -s INT -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t ))
    if [ $rc -eq 0 ]; then
        STATUS[$name]="ok in $dt s (cap $cap s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        STATUS[$name]="cut at $dt s (cap $cap s); $(tail -n 1 "$WORK/$name.log" | cut -c1-160)"
    else
        STATUS[$name]="failed (rc $rc) in $dt s (cap $cap s); $(tail -n 1 "$WORK/$name.log" | cut -c1-160)"
    fi
    write_summary
    pack
}

# ---------------------------------------------------------------------------------- t = 0: the build
if [ "$DRY" = 1 ]; then BUILD_BACKEND=cpu; else BUILD_BACKEND=cuda; fi
(
    t=$(date +%s)
    timeout -s INT -k 10 300 "$PY" -c "from datadam_fast.loss.backends import get_backend; get_backend('$BUILD_BACKEND')" \
        > "$WORK/build.log" 2>&1
    echo "rc $? in $(( $(date +%s) - t )) s" > "$WORK/build.status"
) &
BUILD_PID=$!
write_summary
plan > "$WORK/plan.txt"

# --------------------------------------------------------------------------------- the stages
if [ "$DRY" = 1 ]; then
    LOSS_ARGS=(--device cpu --shapes tiny --no-compile --repeat 2 --warmup 1)
    LOSS16_ARGS=(--device cpu --shapes tiny --no-compile --repeat 2 --warmup 1 --dtype bfloat16)
    KERNEL_ARGS=(--device cpu --problems tiny --backends cpu triton epilogue --dtypes fp32 --repeat 2)
    ITER_ARGS=(--device cpu --shape 3,1,8 --ipc 1 --batch-real 2 --width 8 --iterations 1 --warmup 1 --order blocks
               --phase-iterations 1 --base "paper,compile=0,real_epilogue=off"
               --variants "paper,compile=0,real_epilogue=off" "paper,compile=0")
    INET_ARGS=(--device cpu --shape 5,1,8 --ipc 1 --batch-real 2 --width 8 --iterations 1 --warmup 1 --no-limit
               --no-official --phase-iterations 0 --base "paper,compile=0,real_epilogue=off,memory_budget=4"
               --variants "paper,compile=0,memory_budget=4" "paper,compile=0,real_epilogue=off,memory_budget=4")
    VERIFY_REQUIRE=cpu,triton,epilogue:cpu,epilogue:triton,stats:cpu,stats:triton
    KERNEL_ENV=(TRITON_INTERPRET=1)
    VERIFY_ENV=(TRITON_INTERPRET=1)
    VERIFY_ARGS=(--quick)  # the plumbing is what a dry run checks; the full CPU matrix is a test
    TEST_K="not emulated and (device_checked or registry_and_supports or bad_arguments)"
else
    LOSS_ARGS=(--device cuda --repeat 10)
    LOSS16_ARGS=(--device cuda --repeat 10 --dtype bfloat16 --shapes convnet3-32px-K10 convnetd4-64px-K200)
    KERNEL_ARGS=(--device cuda --repeat 20)
    ITER_ARGS=(--device cuda --shape 10,3,32 --iterations 5 --warmup 2 --order blocks --phase-iterations 3
               --base "paper,compile=0,real_epilogue=off"
               --variants "paper,compile=0,real_epilogue=off" "paper,compile=0" "paper" "paper,real_dtype=bf16"
                          "paper,compile_mode=reduce-overhead")
    INET_ARGS=(--device cuda --shape 1000,3,64 --iterations 2 --warmup 1 --no-limit --no-official --order blocks
               --phase-iterations 0 --base "paper,compile=0,real_epilogue=off,memory_budget=40"
               --variants "paper,compile=0,memory_budget=40" "paper,compile=0,real_epilogue=off,memory_budget=40")
    VERIFY_REQUIRE=triton,cuda,epilogue:triton,stats:triton
    KERNEL_ENV=(TRITON_INTERPRET=0)
    VERIFY_ENV=(TRITON_INTERPRET=0)
    VERIFY_ARGS=()
    TEST_K="not emulated"
fi
[ -n "${SUITE_LOSS_ARGS:-}" ] && read -r -a LOSS_ARGS <<< "$SUITE_LOSS_ARGS"

for s in "${STAGES[@]}"; do
    case $s in
    env)
        nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi here" > "$WORK/nvidia-smi.txt"
        stage env "$PY" benchmarks/gpu_env.py --device "$DEV" --json "$WORK/env.json" ;;
    install)
        stage install "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . ;;
    verify)
        stage verify env "${VERIFY_ENV[@]}" "$PY" -m datadam_fast backends --verify --device "$DEV" \
            --require "$VERIFY_REQUIRE" ${VERIFY_ARGS[@]+"${VERIFY_ARGS[@]}"} --json "$WORK/verify.json" ;;
    loss)
        stage loss "$PY" benchmarks/bench_loss.py "${LOSS_ARGS[@]}" --json "$WORK/bench_loss_fp32.json" ;;
    loss_bf16)
        stage loss_bf16 "$PY" benchmarks/bench_loss.py "${LOSS16_ARGS[@]}" --json "$WORK/bench_loss_bf16.json" ;;
    kernels)
        stage kernels env "${KERNEL_ENV[@]}" "$PY" benchmarks/bench_kernels.py "${KERNEL_ARGS[@]}" \
            --json "$WORK/bench_kernels.json" ;;
    iteration)
        stage iteration "$PY" benchmarks/bench_iteration.py "${ITER_ARGS[@]}" --json "$WORK/bench_iteration_cifar10_shape.json" ;;
    tests)
        stage tests env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider tests/loss/test_backend_triton.py \
            tests/loss/test_real_epilogue.py tests/loss/test_backend_cuda.py tests/distill/test_compiled.py::test_cuda_graphs_equal_eager_on_gpu \
            -k "$TEST_K" --junitxml="$WORK/tests_gpu.xml" ;;
    iter_imagenet)
        stage iter_imagenet "$PY" benchmarks/bench_iteration.py "${INET_ARGS[@]}" \
            --json "$WORK/bench_iteration_imagenet64_shape.json" ;;
    profile)
        rm -rf "$WORK/profile_run"
        stage profile "$PY" -m datadam_fast distill --dataset digits --iterations 3 --profile 2 --nvtx --no-progress \
            --eval-every -1 --checkpoint-every 0 --device "$DEV" --out "$WORK/profile_run" ;;
    esac
    if [ -f "$WORK/build.status" ]; then STATUS[build]=$(cat "$WORK/build.status"); fi
done

# the background build, if it is still going, is not waited for
if kill -0 "$BUILD_PID" 2>/dev/null; then
    STATUS[build]="still running at the end: stopped"
    kill -INT "$BUILD_PID" 2>/dev/null
    pkill -INT -P "$BUILD_PID" 2>/dev/null
else
    wait "$BUILD_PID" 2>/dev/null
    [ -f "$WORK/build.status" ] && STATUS[build]=$(cat "$WORK/build.status")
fi
write_summary
pack
cat "$OUT/summary.txt"
echo "packed: $OUT/gpu_suite.tgz ($(du -k "$OUT/gpu_suite.tgz" | cut -f1) KB); unpack with: tar -xzf gpu_suite.tgz"
for s in "${STAGES[@]}"; do
    case "${STATUS[$s]:-not reached}" in ok*) ;; *) exit 1 ;; esac
done
exit 0
