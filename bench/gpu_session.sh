#!/usr/bin/env bash
# The GPU session on a bare, offline machine, from the repo root, sized for what we get: 15
# minutes of device time in all (start-up and idle included), at most 10 minutes a command.
#
#   bash bench/gpu_session.sh PHASE [OUT_DIR]
#     first   ONE command of at most 8 minutes (budget 480 s), in this order:
#               versions   driver, nvcc, torch, triton, git sha
#               install    the CUDA build for this GPU's architecture only (sm_90a on an H200),
#                          all .cu files in parallel
#               checks     every op's GPU correctness tests (each op family its own pytest,
#                          fastest first, several at once: a failing or hanging op never stops
#                          the others) and compute-sanitizer memcheck / racecheck / synccheck
#                          on one small case per CUDA kernel (bench/sanitize.py)
#               bench      one benchmark row per op family against its peers (dlh bench --smoke)
#     second  an optional command of at most 4 minutes (budget 240 s): the quick benchmark
#             sweeps against their peers (torch.compile included), host cost per call, the
#             reference models, the roofline summary and the README block
#     all     first then second (a machine without the 600-s limit)
#   OUT_DIR: default $OUT (the lent machine's), else ./gpu_out.
#
# Through the device tool (the sha literally: the shell in `command` runs there):
#   run(command="DLH_GIT_SHA=<sha> bash bench/gpu_session.sh first", carry=[".whl"], timeout_s=560)
#   run(command="DLH_GIT_SHA=<sha> bash bench/gpu_session.sh second", carry=[".whl"], timeout_s=300)
# Issue the second at once after the first (the machine stays warm for ~30 s only, and a warm
# machine reuses the first call's build and caches in /tmp: without them the second rebuilds),
# then give the machine back and read the results. `.whl/` is optional: wheels there
# (Liger-Kernel, nvtx, diffusers: bench/fetch_wheels.sh downloads them here) go to /tmp/site.
#
# What comes back (the tool returns at most 8 files from $OUT), rewritten after EVERY step so
# that a command stopped at its limit still returns what it did:
#   $OUT/<phase>.log              everything the steps printed
#   $OUT/<phase>-summary.txt      one line per step (and per check group): exit code, seconds
#   $OUT/results-<phase>.tar.gz   the folder <date>-<gpu>/: versions, per-check logs and junit
#                                 xml, sanitizer reports, benchmark csv/json/png, _cache/
# Unpack into bench/results/ and commit; `python -m dlh_kernels.bench.report` then rewrites the
# README's results from them:
#   tar -xzf results-first.tar.gz -C bench/results/ && python -m dlh_kernels.bench.report
#
# Time: each step has a cap (seconds; DLH_CAP_<STEP> overrides one) inside the phase's budget
# (DLH_SESSION_BUDGET overrides it); a step never starts with less than the minimum time of the
# steps after it left over (their sum is kept back). A step at its cap gets SIGINT (the
# benchmarks write what they measured), then 15 s, then KILL. A failing step never stops the
# later ones. DLH_DRY_RUN=1 prints the plan (every step and check group at its cap: the worst
# case) and runs nothing; tests/test_bench.py checks that it fits each phase's budget.
set -u -o pipefail

# ---- internal: the parallel check groups of the `checks` step (the script runs itself) ---------
# bash bench/gpu_session.sh __checks RESULTS CAP
if [[ ${1:-} == __checks ]]; then
    RESULTS=$2 CAP=$3
    DRY=${DLH_DRY_RUN:-0}
    CHECKS=$RESULTS/checks
    mkdir -p "$CHECKS"
    DEADLINE=$(($(date +%s) + CAP - 15))  # leave the step's own SIGINT/KILL margin
    PARALLEL=${DLH_CHECK_PARALLEL:-6}
    PYTEST=(env DLH_CACHE_DIR=off python3 -m pytest -q -p no:cacheprovider -o addopts= -rfE)
    python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
    XDIST=()
    python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4)
    SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    SAN=("$SANITIZER" --error-exitcode 1 --print-limit 20)
    SANE=(python3 -m dlh_kernels.bench.sanitize)

    # name, command: fastest first (the order they start in)
    GROUPS_=(diffusion_step gelu activation rotary layer_norm group_norm memcheck racecheck synccheck linear conv2d
             cuda_ext attention autotune)
    group_cmd() {
        if [[ -n ${DLH_CHECK_STUB:-} ]]; then echo "bash $DLH_CHECK_STUB $1"; return; fi  # tests
        case $1 in
            diffusion_step | gelu | activation | rotary | linear | layer_norm | group_norm)
                echo "${PYTEST[*]} --junitxml=$CHECKS/$1.xml tests/test_$1.py" ;;
            conv2d | attention)
                echo "${PYTEST[*]} ${XDIST[*]} --junitxml=$CHECKS/$1.xml tests/test_$1.py" ;;
            cuda_ext)  # the CUDA C++ kernels' own GPU tests (the emulated ones skip on a GPU)
                echo "${PYTEST[*]} -m gpu --junitxml=$CHECKS/$1.xml $(ls tests/test_cuda_*.py | tr '\n' ' ')" ;;
            autotune)  # the tuning path for real: every autotune list, the persistent cache
                echo "${PYTEST[*]} --junitxml=$CHECKS/$1.xml tests/test_autotune.py" ;;
            memcheck)  # real allocation bounds: no caching allocator
                echo "env PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${SAN[*]} --tool memcheck ${SANE[*]} --backends cuda,triton" ;;
            racecheck | synccheck)
                echo "${SAN[*]} --tool $1 ${SANE[*]} --backends cuda" ;;
        esac
    }
    run_group() {
        local name=$1 left=$((DEADLINE - $(date +%s))) t0 rc cmd
        cmd=$(group_cmd "$name")
        if [[ $DRY != 0 ]]; then
            printf '%-16s dry run, cap %4ss: %s\n' "$name" "$CAP" "$cmd" | tee -a "$CHECKS/summary.txt"
            return
        fi
        if ((left < 10)); then
            printf '%-16s not started: %ss left\n' "$name" "$left" | tee -a "$CHECKS/summary.txt"
            return
        fi
        t0=$(date +%s)
        # shellcheck disable=SC2086  # cmd is a word list built above (no spaces inside words)
        timeout -s INT -k 10 "$left" $cmd >"$CHECKS/$name.log" 2>&1
        rc=$?
        printf '%-16s rc=%-4s %4ss  %s\n' "$name" "$rc" $(($(date +%s) - t0)) \
            "$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)|ERROR SUMMARY' "$CHECKS/$name.log" | tail -1)" \
            | tee -a "$CHECKS/summary.txt"
        [[ -n ${DLH_FLUSH:-} ]] && bash -c "$DLH_FLUSH"
    }
    : >"$CHECKS/summary.txt"
    trap 'kill $(jobs -p) 2>/dev/null; wait; exit 130' INT TERM
    for name in "${GROUPS_[@]}"; do
        [[ $name == autotune && ! -f tests/test_autotune.py ]] && continue
        while (($(jobs -rp | wc -l) >= PARALLEL)); do wait -n; done
        run_group "$name" &
    done
    wait
    ! grep -qvE 'rc=0 |dry run' "$CHECKS/summary.txt"
    exit $?
fi

PHASES=()
OUT_DIR=${OUT:-./gpu_out}
for arg in "$@"; do
    case $arg in
        first | second) PHASES+=("$arg") ;;
        all) PHASES+=(first second) ;;
        *) OUT_DIR=$arg ;;
    esac
done
((${#PHASES[@]})) || PHASES=(first)
DRY=${DLH_DRY_RUN:-0}
NAME=$(IFS=-; echo "${PHASES[*]}")
declare -A PHASE_BUDGET=([first]=480 [second]=240)
BUDGET=0
for p in "${PHASES[@]}"; do BUDGET=$((BUDGET + PHASE_BUDGET[$p])); done
BUDGET=${DLH_SESSION_BUDGET:-$BUDGET}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/$NAME.log
SUMMARY_FILE=$OUT_DIR/$NAME-summary.txt
: >"$LOG"
: >"$SUMMARY_FILE"
export PYTHONUNBUFFERED=1
SESSION_START=$(date +%s)

# The run folder: <date>-<gpu>, as `dlh bench` names it (bench/common.py default_out_dir).
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(echo "${GPU_NAME:-unknown gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
RUN=$(date -u +%Y-%m-%d)-$SLUG
RESULTS=$OUT_DIR/$RUN
mkdir -p "$RESULTS"

# Caches that outlive one call while the machine stays warm ($OUT is emptied between calls).
export DLH_CACHE_DIR=${DLH_CACHE_DIR:-/tmp/dlh_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
# Build only for this GPU's architecture, with the arch-specific features (9.0 -> 90a: wgmma).
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
[[ ${CC:-} == 90 ]] && CC=90a
export DLH_CUDA_ARCHS=${DLH_CUDA_ARCHS:-${CC:-90a}}
export MAX_JOBS=${MAX_JOBS:-16}

# Wheels carried in .whl/ go to /tmp/site: the image's own site-packages stay as they are.
if compgen -G ".whl/*.whl" >/dev/null; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The install is reused when dlh_kernels imports from this checkout with its extension and the
# stamp of the sources it was built from matches.
STAMP_FILE=build/.dlh_session_stamp
STAMP=$( (cat setup.py csrc/*; echo "$DLH_CUDA_ARCHS") 2>/dev/null | sha256sum | cut -c1-16)
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

# Everything so far into $OUT: the summary is rewritten by each step; the archive replaced
# atomically (a command killed mid-tar leaves the previous archive).
flush() {
    [[ $DRY != 0 ]] && return 0
    if [[ -d $DLH_CACHE_DIR ]]; then mkdir -p "$RESULTS/_cache" && cp -r "$DLH_CACHE_DIR"/. "$RESULTS/_cache/" 2>/dev/null; fi
    local tmp
    tmp=$(mktemp "$OUT_DIR/.results.XXXXXX")
    tar -czf "$tmp" -C "$OUT_DIR" "$RUN" 2>/dev/null && mv -f "$tmp" "$OUT_DIR/results-$NAME.tar.gz" || rm -f "$tmp"
}
# the same archive from inside the checks step, after each check group (groups end concurrently:
# one temp file per flushing process)
export DLH_FLUSH="t='$OUT_DIR/.results.'\$\$; tar -czf \"\$t\" -C '$OUT_DIR' '$RUN' 2>/dev/null && mv -f \"\$t\" '$OUT_DIR/results-$NAME.tar.gz' || rm -f \"\$t\""

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
        printf '%-20s dry run, cap %4ss\n' "$name" "$cap" >>"$SUMMARY_FILE"
        [[ $name == checks ]] && "$@" "$cap" 2>&1 | tee -a "$LOG"
        return 0
    fi
    local t0 rc
    t0=$(date +%s)
    if [[ $name == checks ]]; then
        timeout -s INT -k 15 "$cap" "$@" "$cap" 2>&1 | tee -a "$LOG"
    else
        timeout -s INT -k 15 "$cap" "$@" 2>&1 | tee -a "$LOG"
    fi
    rc=${PIPESTATUS[0]}
    printf '%-20s rc=%-4s %4ss\n' "$name" "$rc" $(($(date +%s) - t0)) >>"$SUMMARY_FILE"
    [[ $name == checks && -f $RESULTS/checks/summary.txt ]] && sed 's/^/    /' "$RESULTS/checks/summary.txt" >>"$SUMMARY_FILE"
    flush
    return 0
}

cap() {  # cap NAME DEFAULT: DLH_CAP_<NAME> or the default
    local var="DLH_CAP_${1^^}"
    echo "${!var:-$2}"
}

# the module form: works whether or not pip put the `dlh` script on PATH
DLH=(python3 -m dlh_kernels)
BENCH=("${DLH[@]}" bench)

versions() {
    cat <<'EOF'
set -x
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv
nvcc --version | tail -2
git rev-parse HEAD 2>/dev/null || echo "DLH_GIT_SHA=${DLH_GIT_SHA:-unknown}"
python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
EOF
}

prelude() {
    step versions 20 5 bash -c "{ $(versions)
} 2>&1 | tee '$RESULTS/versions.txt'"
    if compgen -G ".whl/*.whl" >/dev/null; then
        step wheels 40 10 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
    fi
    if [[ $NEED_INSTALL == 1 ]]; then
        step install "$(cap install 150)" 90 bash -c \
            "python3 -m pip install -v --no-build-isolation --no-deps -e . >'$RESULTS/install.log' 2>&1; rc=\$?
             grep -E 'dlh-kernels setup|rror|Successfully installed' '$RESULTS/install.log' | tail -30
             [[ \$rc == 0 ]] && mkdir -p build && echo $STAMP >$STAMP_FILE; exit \$rc"
    else
        step install-reused 5 5 echo "reusing the install of this checkout (stamp $STAMP)"
    fi
    step "dlh info" 20 10 "${DLH[@]}" info
}

phase_first() {
    step checks "$(cap checks 230)" 120 bash "$0" __checks "$RESULTS"
    step "bench smoke" "$(cap smoke 70)" 40 "${BENCH[@]}" \
        layer_norm,gelu,linear_gelu,attention,conv2d,group_norm,diffusion --smoke --out "$RESULTS"
}

phase_second() {
    step "bench quick" "$(cap quick 120)" 60 "${BENCH[@]}" \
        layer_norm,gelu,linear_gelu,attention,conv2d,group_norm,diffusion --quick --out "$RESULTS"
    step "bench overhead" "$(cap overhead 30)" 10 "${BENCH[@]}" overhead --out "$RESULTS"
    step "bench models" "$(cap models 50)" 30 "${BENCH[@]}" models --quick --budget-s 40 --out "$RESULTS"
    step "bench summary" 10 5 "${BENCH[@]}" summary --save-auto --out "$RESULTS"
    # measured / predicted per benchmark row (bench/results/perf_model.md): which kernel is off
    step "perf model" 10 5 python3 -m dlh_kernels.bench.perf_model --compare "$RESULTS"
    step report 10 5 python3 -m dlh_kernels.bench.report --results "$OUT_DIR" --stdout
}

run_all() {
    prelude
    local p
    for p in "${PHASES[@]}"; do "phase_$p"; done
}

run_all
PASS=run
run_all

{
    echo -e "\n=== summary of $NAME ($(elapsed) s of a ${BUDGET}-s budget; rc 124/130: hit its cap)"
    cat "$SUMMARY_FILE"
    ls -l "$OUT_DIR"
} | tee -a "$LOG"
! grep -E '^[^ ]' "$SUMMARY_FILE" | grep -qvE 'rc=0 |dry run'
