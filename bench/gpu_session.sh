#!/usr/bin/env bash
# The GPU session on a bare, offline machine, from the repo root, in phases that each fit one
# 600-s device call:
#
#   bash bench/gpu_session.sh PHASE... [OUT_DIR]
#     tests    install (builds the CUDA extension), dlh info, dlh check, the gpu-marked tests,
#              then the whole suite (xdist, per-test timeout)
#     bench    dlh bench --quick for every op family (layer_norm, gelu, linear_gelu, attention,
#              conv2d, group_norm, diffusion), overhead, then the roofline summary
#     models   the reference models (eager / patched / torch.compile / patched + compile),
#              cold-start first calls, an ncu check of the NVTX filters, the summary and the
#              README block rendered from this run
#     all      tests bench models, one after the other (a machine without the 600-s limit)
#   OUT_DIR: default $OUT (the lent machine's), else ./gpu_out.
#
# Through the device tool, one call per phase (every phase installs first if the build it finds
# is missing or stale, so each also works on a fresh machine; a warm machine reuses the build
# and the Triton/dlh caches in /tmp from the call before):
#   run(command="DLH_GIT_SHA=$(git rev-parse --short=12 HEAD) bash bench/gpu_session.sh tests", carry=[".whl"], timeout_s=600)
#   run(command="DLH_GIT_SHA=<sha> bash bench/gpu_session.sh bench", carry=[".whl"], timeout_s=600)
#   run(command="DLH_GIT_SHA=<sha> bash bench/gpu_session.sh models", carry=[".whl"], timeout_s=600)
# (the shell in `command` runs there, so put the sha in literally). The third only when status
# says >= 11 minutes of device time are left. `.whl/` is optional: wheels there (Liger-Kernel,
# nvtx, diffusers: bench/fetch_wheels.sh downloads them here) are installed into /tmp/site.
#
# What comes back: $OUT/<phase>.log and $OUT/results-<phase>.tar.gz, which holds one folder
# <date>-<gpu>/ (csv, json, png per benchmark; _cache/: the autotuning choices). Unpack into
# bench/results/ and commit; `python -m dlh_kernels.bench.report` then rewrites the README's
# results from them:
#   tar -xzf /path/results-bench.tar.gz -C bench/results/ && python -m dlh_kernels.bench.report
#
# Time: each phase's steps have caps (seconds; DLH_CAP_<STEP> overrides one) inside a budget of
# DLH_SESSION_BUDGET (default 540 s) for the whole call; a step never starts with less than the
# minimum time of the steps after it left over (their sum is kept back). A step at its cap gets
# SIGINT (the benchmarks write what they measured), then 20 s, then KILL. A failing step never
# stops the later ones; the summary printed last gives each step's exit code and time
# (124/130: hit its cap). DLH_DRY_RUN=1 prints the plan and runs nothing.
set -u -o pipefail

PHASES=()
OUT_DIR=${OUT:-./gpu_out}
for arg in "$@"; do
    case $arg in
        tests | bench | models) PHASES+=("$arg") ;;
        all) PHASES+=(tests bench models) ;;
        *) OUT_DIR=$arg ;;
    esac
done
((${#PHASES[@]})) || PHASES=(tests)
DRY=${DLH_DRY_RUN:-0}
BUDGET=${DLH_SESSION_BUDGET:-540}
NAME=$(IFS=-; echo "${PHASES[*]}")
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/$NAME.log
: >"$LOG"
export PYTHONUNBUFFERED=1
SESSION_START=$(date +%s)
SUMMARY=()

# The run folder: <date>-<gpu>, as `dlh bench` names it (bench/common.py default_out_dir).
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(echo "${GPU_NAME:-unknown gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
RUN=$(date -u +%Y-%m-%d)-$SLUG
RESULTS=$OUT_DIR/$RUN
mkdir -p "$RESULTS"

# Caches that outlive one call while the machine stays warm ($OUT is emptied between calls).
export DLH_CACHE_DIR=${DLH_CACHE_DIR:-/tmp/dlh_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
# Build only for this GPU's architecture: half the nvcc time of the default 80;90.
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
export DLH_CUDA_ARCHS=${DLH_CUDA_ARCHS:-${CC:-90}}
export MAX_JOBS=${MAX_JOBS:-16}

# Wheels carried in .whl/ go to /tmp/site: the image's own site-packages stay as they are.
if compgen -G ".whl/*.whl" >/dev/null; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The install is reused when dlh_kernels imports from this checkout with its extension and the
# stamp of the sources it was built from matches.
STAMP_FILE=build/.dlh_session_stamp
STAMP=$(cat setup.py csrc/* 2>/dev/null | sha256sum | cut -c1-16)
installed() {
    [[ -f $STAMP_FILE && $(cat "$STAMP_FILE") == "$STAMP" ]] || return 1
    python3 - <<'EOF' 2>/dev/null
import pathlib, sys
import dlh_kernels
from dlh_kernels import _ext
here = pathlib.Path.cwd().resolve()
sys.exit(0 if pathlib.Path(dlh_kernels.__file__).resolve().parent.parent == here
         and _ext.load_error() is None else 1)
EOF
}
NEED_INSTALL=1
[[ ${DLH_FORCE_INSTALL:-0} == 0 ]] && [[ $DRY == 0 ]] && installed && NEED_INSTALL=0

# The plan is built twice: a first pass records each step's minimum, the second runs the steps,
# each capped at min(its cap, budget left - the minimums of the steps after it).
PASS=plan
MINS=()
INDEX=0

SIMULATED=0
elapsed() {  # seconds since the start; a dry run counts every step as having run to its cap
    if [[ $DRY != 0 ]]; then echo "$SIMULATED"; else echo $(($(date +%s) - SESSION_START)); fi
}

# step NAME CAP MIN COMMAND...
step() {
    local name=$1 cap=$2 min=$3
    shift 3
    if [[ $PASS == plan ]]; then
        MINS+=("$min")
        return 0
    fi
    local reserve=0 i
    for ((i = INDEX + 1; i < ${#MINS[@]}; i++)); do reserve=$((reserve + MINS[i])); done
    INDEX=$((INDEX + 1))
    local left=$((BUDGET - $(elapsed) - reserve))
    ((cap > left)) && cap=$left
    ((cap < min)) && cap=$min
    echo -e "\n=== $name (cap ${cap}s): $*" | tee -a "$LOG"
    if [[ $DRY != 0 ]]; then  # the worst case: every step runs to its cap
        SIMULATED=$((SIMULATED + cap))
        SUMMARY+=("$(printf '%-20s dry run, cap %4ss' "$name" "$cap")")
        return 0
    fi
    local t0
    t0=$(date +%s)
    timeout -s INT -k 20 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-20s rc=%-4s %4ss' "$name" "$rc" $(($(date +%s) - t0)))")
    return 0
}

cap() {  # cap NAME DEFAULT: DLH_CAP_<NAME> or the default
    local var="DLH_CAP_${1^^}"
    echo "${!var:-$2}"
}

# the module form: works whether or not pip put the `dlh` script on PATH
DLH=(python3 -m dlh_kernels)
BENCH=("${DLH[@]}" bench)
# the tests tune for themselves (the autotuner's reset_to_zero path is under test): no saved choices
PYTEST=(env DLH_CACHE_DIR=off python3 -m pytest -q -p no:cacheprovider -o addopts= -rfE)

prelude() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        step wheels 60 15 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
    fi
    step nvidia-smi 20 5 nvidia-smi
    if [[ $NEED_INSTALL == 1 ]]; then
        step install "$(cap install 240)" 150 bash -c \
            "python3 -m pip install --no-build-isolation --no-deps -e . && mkdir -p build && echo $STAMP > $STAMP_FILE"
    else
        step install-reused 5 5 echo "reusing the install of this checkout (stamp $STAMP)"
    fi
    step "dlh info" 30 10 "${DLH[@]}" info
}

phase_tests() {
    step "dlh check" "$(cap check 90)" 30 "${DLH[@]}" check
    step "tests (gpu)" "$(cap gpu_tests 150)" 40 "${PYTEST[@]}" -m gpu tests/
    local extra=()
    python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)
    python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
    step "tests (all)" "$(cap all_tests 300)" 60 "${PYTEST[@]}" "${extra[@]}" tests/
}

phase_bench() {
    # the quick sweeps' time goes mostly to torch.compile and Triton's first compiles
    step "bench layer_norm" "$(cap layer_norm 110)" 30 "${BENCH[@]}" layer_norm --quick --out "$RESULTS"
    step "bench gelu" "$(cap gelu 70)" 25 "${BENCH[@]}" gelu --quick --out "$RESULTS"
    step "bench linear_gelu" "$(cap linear_gelu 60)" 25 "${BENCH[@]}" linear_gelu --quick --out "$RESULTS"
    step "bench attention" "$(cap attention 90)" 30 "${BENCH[@]}" attention --quick --out "$RESULTS"
    step "bench conv2d" "$(cap conv2d 60)" 25 "${BENCH[@]}" conv2d --quick --out "$RESULTS"
    step "bench group_norm" "$(cap group_norm 50)" 20 "${BENCH[@]}" group_norm --quick --out "$RESULTS"
    step "bench diffusion" "$(cap diffusion 50)" 20 "${BENCH[@]}" diffusion --quick --out "$RESULTS"
    step "bench overhead" "$(cap overhead 25)" 15 "${BENCH[@]}" overhead --out "$RESULTS"
    step "bench summary" 20 10 "${BENCH[@]}" summary --save-auto --out "$RESULTS"
}

phase_models() {
    step "bench models" "$(cap models 300)" 60 "${BENCH[@]}" models --quick --budget-s 240 --out "$RESULTS"
    step "bench coldstart" "$(cap coldstart 120)" 30 "${BENCH[@]}" coldstart --out "$RESULTS"
    # does ncu find our ranges? kernels profiled inside dlh::layer_norm[triton] (escaped brackets)
    if command -v ncu >/dev/null || [[ $DRY != 0 ]]; then
        step "ncu nvtx filter" "$(cap ncu 60)" 20 bash -c "$(ncu_check)"
    fi
    step "bench summary" 20 10 "${BENCH[@]}" summary --out "$RESULTS"
    step "report" 15 5 python3 -m dlh_kernels.bench.report --results "$OUT_DIR" --stdout
}

ncu_check() {  # the filter from dlh_kernels.profiling.ncu_filter, in both domains
    cat <<EOF
for filter in 'dlh@dlh::layer_norm\[triton\]/' 'dlh::layer_norm\[triton\]/'; do
  echo "--- ncu --nvtx-include \$filter"
  ncu --profile-from-start off --nvtx --nvtx-include "\$filter" --clock-control none \
      --metrics gpu__time_duration.sum --csv ${DLH[*]} profile layer_norm --backend triton \
      --iters 2 --warmup 1 2>&1 | tee -a "$RESULTS/ncu_filter.log" | grep -c 'gpu__time_duration' || true
done
EOF
}

run_all() {
    prelude
    local p
    for p in "${PHASES[@]}"; do "phase_$p"; done
}

run_all
PASS=run
run_all

# Results (and the autotuning choices) into one archive: few files come back from $OUT.
if [[ $DRY == 0 ]]; then
    if [[ -d $DLH_CACHE_DIR ]]; then mkdir -p "$RESULTS/_cache" && cp -r "$DLH_CACHE_DIR"/. "$RESULTS/_cache/"; fi
    tar -czf "$OUT_DIR/results-$NAME.tar.gz" -C "$OUT_DIR" "$RUN" && rm -rf "$RESULTS"
fi

{
    echo -e "\n=== summary of $NAME ($(elapsed) s of a ${BUDGET}-s budget; rc 124/130: hit its cap)"
    printf '%s\n' "${SUMMARY[@]}"
    ls -l "$OUT_DIR"
    [[ -f $OUT_DIR/results-$NAME.tar.gz ]] && tar -tzf "$OUT_DIR/results-$NAME.tar.gz" | head -60
} | tee -a "$LOG"
for line in "${SUMMARY[@]}"; do [[ $line == *"rc=0 "* || $line == *"dry run"* ]] || exit 1; done
exit 0
