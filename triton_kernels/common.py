"""@triton.jit helpers shared by several kernel families (as csrc/common.cuh is for CUDA C++).

- the GELU and its derivative on fp32 tiles (elementwise GELU, linear_gelu and conv2d
  epilogues): exact z * Phi(z), and PyTorch's tanh form written as z * sigmoid(2u), the same
  number without tanh and without overflow for large |u|;
- the grouped tile order of the matmul-shaped kernels (linear_gelu, conv2d): GROUP_M row tiles
  share each column tile while it is in L2;
- the shared-memory footprint of the autotuned kernels' configs and the device's limit, for the
  early prunes of their autotune lists (host-side Python, not jit).
"""
import functools
import os
from typing import Optional

import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def gelu_fp32(z, TANH: tl.constexpr):
    """gelu(z) of an fp32 tile: 0.5 z (1 + erf(z / sqrt 2)), or z * sigmoid(2u) with
    u = sqrt(2/pi) (z + 0.044715 z^3) (= 0.5 z (1 + tanh u))."""
    if TANH:
        u = SQRT_2_OVER_PI * (z + TANH_CUBIC * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    else:
        return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT_2))


@triton.jit
def gelu_grad_fp32(z, TANH: tl.constexpr):
    """gelu'(z) of an fp32 tile: Phi(z) + z phi(z), or s + 2 z s (1 - s) u'(z), s = sigmoid(2u)."""
    if TANH:
        u = SQRT_2_OVER_PI * (z + TANH_CUBIC * z * z * z)
        s = tl.sigmoid(2.0 * u)
        return s + 2.0 * z * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * z * z)
    else:
        return 0.5 * (1.0 + tl.erf(z * INV_SQRT_2)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid when GROUP_M row tiles run down each column tile in turn."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# Shared-memory footprints, for the autotune lists' early prunes: a config whose tiles cannot fit
# in the device's shared memory per block is dropped before it is compiled (a first call would
# otherwise pay a 1-25 s compile per doomed config, then Triton's OutOfResources at load).
#
# The counts follow how Triton (3.6 and 3.9, sm_80/sm_90) lays out a software-pipelined loop:
# every load in the loop that feeds a tl.dot becomes a cp.async into a ring of num_stages
# shared buffers; an operand loaded once before the loop (attention's Q, or K/V in dK/dV) keeps
# one buffer for the whole loop; loads that feed no dot but sit in the pipelined loop (the mask
# tile) get num_stages - 1 buffers; the epilogue's layout conversions reuse the ring. Checked
# against the measured shared memory of every variant in bench/results/triton_resources_*.json
# (tests/test_triton_compile.py: the estimate must keep every config that fits and drop every
# config that does not, on sm_90 and sm_80). It may overestimate where a loop is not fully
# pipelined (dK/dV at hd 128 in fp32, num_stages = 1); it must not underestimate near the limit.

SM90_MAX_SHARED = 232_448  # H100/H200: cudaDevAttrMaxSharedMemoryPerBlockOptin
SM80_MAX_SHARED = 166_912  # A100


@functools.lru_cache(maxsize=None)
def _device_max_shared(driver_kind: str, device) -> int:
    from triton.runtime import driver
    return int(driver.active.utils.get_device_properties(device)["max_shared_mem"])


def max_shared_memory() -> int:
    """Shared memory per block of the current device (cached per device), from the active Triton
    driver; without one (no GPU: the interpreter, CPU tests), the H100's."""
    try:
        from triton.runtime import driver
        active = driver.active
        return _device_max_shared(type(active).__name__ + str(active.get_current_target()),
                                  active.get_current_device())
    except Exception:  # no driver: nothing to ask
        return SM90_MAX_SHARED


def _elem(t) -> int:
    """Bytes per element of a tensor argument (None: 0)."""
    return 0 if t is None else t.element_size()


def attention_shared_bytes(kernel: str, elem: int, mask_elem: int, BLOCK_M: int, BLOCK_N: int,
                           BLOCK_D: int, BLOCK_DV: int, num_stages: int, capability: int = 90,
                           atomic_dq: bool = False, dropout: bool = False) -> int:
    """Shared memory of one attention program. kernel: "fwd", "dq", "dkdv" or "dmask"; elem: bytes
    per Q/K/V element; mask_elem: bytes per mask element (0: no mask, 1: bool). capability: 90
    (wgmma: a ring of num_stages buffers, the mask one fewer) or 80 (mma.sync: one buffer fewer
    in the ring, the mask num_stages). dropout: the keep tile's interleave (one Philox call per 4
    keys, its 4 words joined into the BLOCK_M x BLOCK_N tile) goes through shared memory, one
    byte per score."""
    return _attention_shared_bytes(kernel, elem, mask_elem, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                                   num_stages, capability, atomic_dq) + (BLOCK_M * BLOCK_N if dropout else 0)


def _attention_shared_bytes(kernel, elem, mask_elem, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_stages,
                            capability, atomic_dq) -> int:
    rows_q = BLOCK_M * (BLOCK_D + BLOCK_DV)   # a query block's q and dO (dq, dkdv, dmask)
    rows_k = BLOCK_N * (BLOCK_D + BLOCK_DV)   # a key block's k and v
    mask = BLOCK_M * BLOCK_N * mask_elem
    stages = max(1, num_stages)
    sm90 = capability >= 90
    if stages == 1:  # nothing pipelined: the dot operands and p/dS as they are used
        if kernel == "fwd":
            return BLOCK_M * BLOCK_D * elem + BLOCK_N * max(BLOCK_D, BLOCK_DV) * elem \
                + BLOCK_M * BLOCK_N * elem + mask
        if kernel == "dkdv":
            return (rows_k + rows_q + BLOCK_M * BLOCK_D) * elem + mask
        return (rows_q + rows_k) * elem + BLOCK_M * BLOCK_N * elem + mask
    if kernel == "fwd":
        ring, masks = (stages, stages - 1) if sm90 else (stages - 1, stages)
        return BLOCK_M * BLOCK_D * elem + ring * rows_k * elem + masks * mask
    if kernel in ("dq", "dmask"):
        if sm90:
            return rows_q * elem + stages * rows_k * elem + (stages - 1) * mask
        # mma.sync: the k/v ring is one buffer short of num_stages up to 3 stages, two beyond
        # (measured; Triton 3.6 sizes the K and V rings apart), the mask ring is full
        ring = stages - 1 if stages <= 3 else stages - 2
        return rows_q * elem + ring * rows_k * elem + stages * mask + BLOCK_M * 32
    if kernel == "dkdv":
        # the inner loop streams q, dO (the ring) and lse, delta, the mask
        stream = BLOCK_M * 8 + mask
        if sm90:
            total = rows_k * elem + stages * rows_q * elem + (stages - 1) * stream
        else:
            total = rows_k * elem + (stages - 1) * (rows_q * elem + BLOCK_M * 8) + stages * mask
        if atomic_dq and sm90:  # dS and a transposed copy of K for the dQ += dS K wgmma
            total += (2 * BLOCK_M * BLOCK_N + BLOCK_N * BLOCK_D) * elem
        return total
    raise ValueError(f"unknown attention kernel {kernel!r}")


def matmul_shared_bytes(elem: int, BLOCK_M: int, BLOCK_N: int, BLOCK_K: int, num_stages: int,
                        capability: int = 90) -> int:
    """Shared memory of a pipelined tl.dot main loop (linear_gelu, the conv2d implicit GEMMs): a
    ring of num_stages (A, B) tile pairs with wgmma (sm_90), one fewer with mma.sync (sm_80);
    the epilogue reuses it."""
    ring = max(1, num_stages if capability >= 90 else num_stages - 1)
    return ring * (BLOCK_M + BLOCK_N) * BLOCK_K * elem


def _capability() -> int:
    """The active driver's target (major * 10 + minor); 90 without a driver."""
    try:
        from triton.runtime import driver
        return int(driver.active.get_current_target().arch)
    except Exception:
        return 90


def shared_memory_estimate(kernel_name: str, named_args: dict, meta: dict,
                           capability: Optional[int] = None) -> Optional[int]:
    """The estimate for a launch of kernel_name with these arguments (name -> value; tensors
    give the element sizes) and constexprs + config (BLOCK_*, num_stages); None for kernels
    without a model (the elementwise and norm kernels use no shared ring)."""
    stages = meta.get("num_stages", 3)
    cap = capability if capability is not None else _capability()
    if kernel_name.startswith("attn_") and kernel_name != "attn_bwd_preprocess_kernel" \
            and kernel_name != "attn_dropout_mask_kernel":
        kernel = {"attn_fwd_kernel": "fwd", "attn_bwd_dq_kernel": "dq", "attn_bwd_dkdv_kernel": "dkdv",
                  "attn_bwd_dmask_kernel": "dmask"}[kernel_name]
        mask = named_args.get("Mask")
        mask_elem = 0 if mask is None else _elem(mask)
        return attention_shared_bytes(kernel, _elem(named_args["Q"]), mask_elem, meta["BLOCK_M"],
                                      meta["BLOCK_N"], meta["BLOCK_D"], meta["BLOCK_DV"], stages, cap,
                                      bool(meta.get("ATOMIC_DQ", False)), bool(meta.get("DROPOUT", False)))
    if kernel_name in ("linear_gelu_kernel", "linear_kernel"):
        return matmul_shared_bytes(_elem(named_args["A"]), meta["BLOCK_M"], meta["BLOCK_N"],
                                   meta["BLOCK_K"], stages, cap)
    if kernel_name in ("conv2d_fwd_kernel", "conv2d_bwd_input_kernel", "conv2d_bwd_weight_kernel"):
        a = named_args.get("X") if kernel_name == "conv2d_fwd_kernel" else named_args.get("DZ")
        return matmul_shared_bytes(_elem(a), meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], stages, cap)
    return None


def fits_shared_memory(kernel_name: str, named_args: dict, meta: dict, config) -> bool:
    """Whether an autotune config's estimated footprint fits the current device (the prunes)."""
    estimate = shared_memory_estimate(kernel_name, named_args,
                                      {**meta, **config.kwargs, "num_stages": config.num_stages})
    return estimate is None or estimate <= max_shared_memory()


# ---------------------------------------------------------------------------------------------
# Host-side integer helpers for the launch glue: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects since Triton 3.6 (~2.4 us a call on the host vs ~0.03 us for the
# arithmetic; review 2026-12 T7), and the glue calls them several times per launch.

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as triton.cdiv."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# ---------------------------------------------------------------------------------------------
# Launching without Triton's per-call binder work.
#
# `kernel[grid](*args, **meta)` runs Triton's JITFunction.run on every call: the generated binder
# (specialises each argument), the cache key, the options, the grid, the launch metadata, then the
# compiled kernel's C launcher: ~10 us of host Python per launch (bench/overhead.py, stand-in path),
# which is the whole budget of a small norm or GELU call. `launch` keys the compiled kernel by what
# makes Triton compile another one (each argument specialised by Triton's own
# native_specialize_impl, with value and alignment specialisation on for every argument, so the
# key is never coarser than the binder's; the constexprs and options; the device), and from the
# second call on calls the C launcher directly: ~3 us. The first call of each key goes through
# Triton (compiles or finds it, and launches), as does any call while a launch hook is set
# (profilers: proton, TRITON_KERNEL_DUMP tools) or under the interpreter.

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_launches: dict = {}  # (id(fn), device, constexprs, specialisation) -> the launcher and its arguments
if not _INTERPRET:
    from triton import knobs as _knobs
    from triton._C.libtriton import native_specialize_impl as _specialize
    from triton.runtime import driver as _driver


def _device_and_backend(fn):
    active = _driver.active
    device = active.get_current_device()
    caches = fn.device_caches[device]
    return active, device, caches[3], caches[4]  # backend, binder (Triton 3.6 and 3.9)


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything: Triton 3.6+ keeps a HookChain there, empty unless
    a profiler added to it (the C launcher calls it, and the kernel builds launch metadata for
    it, on every launch; with no hooks the shortcut passes None for both)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(fn, grid, args: tuple, meta: dict) -> None:
    """``fn[grid](*args, **meta)`` for a @triton.jit fn, the binder's work done once per key.

    grid: a tuple, or a function of ``meta`` (the constexprs and config, not the positional
    arguments) returning one.
    """
    grid = grid(meta) if callable(grid) else grid
    runtime = None if _INTERPRET else _knobs.runtime
    if runtime is None or _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        fn[grid](*args, **meta)  # the interpreter, or a profiler's hooks: Triton's own path
        return
    try:
        active, device, backend, binder = _device_and_backend(fn)
    except RuntimeError:  # no active driver: a tool that intercepts launches (triton_resources)
        fn[grid](*args, **meta)
        return
    spec = _specialize
    key = (id(fn), device, tuple(meta.items()), tuple([spec(backend, a, False, True, True) for a in args]))
    entry = _launches.get(key)
    if entry is None:
        kernel = fn[grid](*args, **meta)
        if kernel is None or not hasattr(kernel, "packed_metadata"):  # not launched (a tool's stand-in)
            return
        tail = tuple(binder(*args, **meta)[0].values())[len(args):]  # the constexprs, in order
        _launches[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
        return
    run, function, packed, tail = entry
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
        function, packed, None, None, None, *args, *tail)
