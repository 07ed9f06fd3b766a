#!/usr/bin/env bash
# One GPU session on a bare, offline machine, from the repo root, in about 9 minutes:
# install, report the machine, run the GPU tests and the suite, then the quick benchmarks.
#
#   bash bench/gpu_session.sh          # logs and results under $OUT, or ./gpu_out
#
# The tree travels without .git: put the commit in the command, DLH_GIT_SHA=<sha> bash ...,
# to have it in the results' metadata.
#
# Through the lent machine: run(command="bash bench/gpu_session.sh", carry=[".whl"]); the
# wheels in .whl/ (Liger-Kernel, pure Python) are installed first when the folder has any.
# A failing step never stops the later ones; each step has a time cap (seconds, overridable
# through the environment), a SIGINT at the cap lets the benchmarks write what they measured,
# and the summary printed last gives every step's exit code (124/130: hit its cap).
# What comes back from $OUT is at most 8 files, so everything is one log plus one archive:
#   session.log, results.tar.gz (layer_norm, gelu, linear_gelu, attention, diffusion_step,
#   group_norm: csv, json, png; diffusion_sampler, overhead: csv, json)
set -u -o pipefail

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
: >"$LOG"
export PYTHONUNBUFFERED=1
SESSION_START=$(date +%s)
# seconds for the whole script: the lent machine runs one command for at most 600 s, and a
# step at its cap gets 20 s more to write its results (timeout -k 20)
BUDGET=${DLH_SESSION_BUDGET:-540}
SUMMARY=()

# step NAME CAP COMMAND...: run COMMAND with its output teed into the log, for at most CAP
# seconds, never more than what is left of BUDGET minus RESERVE (time kept for later steps).
RESERVE=0
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - SESSION_START) - RESERVE))
    ((cap > left)) && cap=$left
    ((cap < 15)) && cap=15
    echo -e "\n=== $name (cap ${cap}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout -s INT -k 20 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-14s rc=%-4s %4ss' "$name" "$rc" $(($(date +%s) - t0)))")
    return 0
}

# Wheels carried in .whl/ go to /tmp/site: the image's own site-packages stay as they are.
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step nvidia-smi 20 nvidia-smi
RESERVE=360 step install "${DLH_CAP_INSTALL:-180}" \
    python3 -m pip install --no-build-isolation --no-deps -e .

# `dlh` lands on PATH with the install; the module forms work even where its script dir does not.
if command -v dlh >/dev/null; then DLH=(dlh); BENCH=(dlh bench)
else DLH=(python3 -m dlh_kernels); BENCH=(python3 -m dlh_kernels.bench); fi
step "dlh info" 30 "${DLH[@]}" info

# Compiled kernels, not the interpreter, from here on.
unset TRITON_INTERPRET
RESERVE=300 step "tests (gpu)" "${DLH_CAP_GPU_TESTS:-90}" \
    python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
RESERVE=270 step "tests (all)" "${DLH_CAP_ALL_TESTS:-90}" \
    python3 -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/
# the quick sweeps' time goes mostly to torch.compile and Triton's first compiles, not timing
RESERVE=150 step "bench ln" "${DLH_CAP_BENCH:-240}" \
    "${BENCH[@]}" layer_norm --quick --out "$OUT"
RESERVE=80 step "bench gelu" "${DLH_CAP_GELU:-100}" "${BENCH[@]}" gelu --quick --out "$OUT"
RESERVE=20 step "bench lin+gelu" "${DLH_CAP_LINEAR_GELU:-100}" \
    "${BENCH[@]}" linear_gelu --quick --out "$OUT"
# attention: its first calls autotune (a few configs per kernel, head dim and causal flag)
RESERVE=20 step "bench attention" "${DLH_CAP_ATTENTION:-150}" \
    "${BENCH[@]}" attention --quick --out "$OUT"
# diffusion: the step alone, then whole sampling loops with a small U-Net (eager and graphed)
RESERVE=20 step "bench diffusion" "${DLH_CAP_DIFFUSION:-90}" \
    "${BENCH[@]}" diffusion --quick --out "$OUT"
RESERVE=20 step "bench gn" "${DLH_CAP_GROUP_NORM:-90}" \
    "${BENCH[@]}" group_norm --quick --out "$OUT"
step "bench overhead" "${DLH_CAP_OVERHEAD:-60}" "${BENCH[@]}" overhead --out "$OUT"

# Everything but the log into one archive: more than 8 files would not all come back.
mapfile -t RESULTS < <(cd "$OUT" && ls -A | grep -v -x -e session.log -e results.tar.gz)
if ((${#RESULTS[@]})); then
    tar -czf "$OUT/results.tar.gz" -C "$OUT" "${RESULTS[@]}" && (cd "$OUT" && rm -rf "${RESULTS[@]}")
fi

{
    echo -e "\n=== summary ($(($(date +%s) - SESSION_START)) s; rc 124/130: hit its cap)"
    printf '%s\n' "${SUMMARY[@]}"
    ls -l "$OUT"
    [[ -f $OUT/results.tar.gz ]] && tar -tvzf "$OUT/results.tar.gz"
} | tee -a "$LOG"
for line in "${SUMMARY[@]}"; do [[ $line == *"rc=0 "* ]] || exit 1; done
exit 0
