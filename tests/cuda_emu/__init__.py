"""A strict CPU emulation of CUDA, so that the suite runs csrc/*.cu without a GPU.

`build("attention.cu", entries=[("attention_fwd", "AttentionFwdArgs"), ...])` compiles one .cu
file with g++ against this emulation into a shared library (cached per source hash), loads it
with ctypes and returns a `Library`; `lib.run("attention_fwd", args)` calls the entry point with
a ctypes structure mirroring its dlh::*Args, raises RuntimeError with the C++ exception's
message, and raises `Violation` (an AssertionError) if the emulation saw anything a GPU would
get wrong. Tests then compare the outputs with float64.

How: the driver rewrites the source (kernel launches into `emu::launch` calls naming the kernel,
`__shared__` declarations into slices of one shared-memory window, `__launch_bounds__` into a
check at kernel entry) and includes emu.h first. runtime.cpp, compiled separately, runs one
std::thread per CUDA thread, the blocks of a launch one after another. The kernel translation
unit is compiled with -fsanitize=thread but linked with our own __tsan_* hooks instead of
ThreadSanitizer: every load and store of kernel code reaches the runtime.

What is checked (each finding is a violation; a test fails on any):
  * launch configuration: block <= (1024, 1024, 64) and 1024 threads, and <= the kernel's
    __launch_bounds__; grid x <= 2^31-1, y and z <= 65,535, none 0; dynamic shared memory
    <= 232,448 B, and > 48 KiB only after cudaFuncSetAttribute raised the kernel's limit;
    static shared memory <= 48 KiB;
  * shared memory bounded by what the launch has (static arrays + the dynamic size): any
    access past it, plain, cp.async or ldmatrix, names kernel, block, thread and offset;
  * natural alignment of every typed load and store (a 16-byte Pack must be 16-byte aligned,
    a float2 8-byte...), of cp.async sources and destinations (16) and ldmatrix rows (16);
  * cp.async asynchronous: the destination is poisoned with 0xff bytes (NaN in fp32, fp16 and
    bf16) at issue, the data lands only at the cp_async_wait<N> that completes its commit group
    (N groups stay in flight); reading bytes in flight is a violation; so is a copy still in
    flight when the thread exits;
  * races between warps, per 4 bytes of shared memory, between barriers: a read of what another
    warp wrote, or a write over what another warp read or wrote, with no __syncthreads between
    (the epoch of every access is recorded, so the verdict does not depend on how the OS
    happened to schedule the threads); a cp.async counts as written when it lands;
  * warp collectives: __shfl_xor_sync's mask must hold the calling lane, the lane it reads and
    only live lanes, with the same mask on both sides; mma.sync and ldmatrix need all 32 lanes;
  * shared memory starts every block as poison (nothing survives a block, nothing is zero).

What it still cannot see: anything within one warp (lanes run as free threads; warp-synchronous
code is assumed, divergence is not modelled, so a shuffle inside a lane-dependent branch
deadlocks instead of failing), races through global memory between blocks (blocks run one after
another), bank conflicts, timing, registers and spills (ptxas tells those), the GPU's own
arithmetic (FMA contraction, ex2.approx/rsqrt rounding), and every inline-PTX instruction other
than mma.sync.m16n8k16, ldmatrix .x4 (.trans) and cp.async.cg 16 (mma.cuh), which it computes
from the PTX ISA's fragment tables.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
RUNTIME = HERE / "runtime.cpp"
HEADER = HERE / "emu.h"
CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden"]
# the kernel translation unit: every memory access calls our __tsan_* hooks (runtime.cpp)
KERNEL_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-w"]


def find_nvcc():
    """Same search order as setup.py: CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_include():
    nvcc = find_nvcc()
    if nvcc:
        inc = Path(os.path.realpath(nvcc)).parent.parent / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    inc = Path("/usr/local/cuda/include")
    return inc if (inc / "cuda_fp16.h").is_file() else None


def _cxx():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def unavailable():
    """Why the emulation cannot be built here (None if it can)."""
    if _cxx() is None:
        return "no host C++ compiler"
    if _cuda_include() is None:
        return "the CUDA headers (cuda_fp16.h) are not installed"
    probe = subprocess.run([_cxx(), "-std=c++20", "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <barrier>\n", capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{_cxx()} lacks C++20 <barrier>"
    return None


class Violation(AssertionError):
    """What the emulation saw that a GPU would get wrong (the message lists it)."""


# ---- the source rewrite -------------------------------------------------------------------------
_LAUNCH = re.compile(r"^(\s*)([^\n;]+?)<<<(.+?)>>>\((.*?)\);", re.M | re.S)
_SHARED = re.compile(r"(?<!extern )__shared__\s+(?:__align__\((\d+)\)\s+)?([\w:]+(?:\s*<[^;]*?>)?)\s+([^;]+);")
_BOUNDS = re.compile(r"__launch_bounds__\(([^()]*(?:\([^()]*\)[^()]*)*)\)(\s*\w+\s*\([^)]*\)\s*)\{")


def _split_top(text):
    """Splits on commas outside (), <> and []."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def emulated_source(cu_text, min_launches=1):
    """The .cu text as the emulation compiles it (see the module docstring)."""
    def launch(m):
        indent, kernel, config, args = m.groups()
        cfg = [c.strip() for c in re.split(r",(?![^()]*\))", config)]
        grid, block = cfg[:2]
        smem = cfg[2] if len(cfg) > 2 else "0"
        name = " ".join(kernel.split()).replace('"', "'")
        return (f"{indent}::emu::launch(\"{name}\", ::emu::kernel_address({kernel}), dim3({grid}), "
                f"dim3({block}), static_cast<size_t>({smem}), [&] {{ {kernel}({args}); }});")

    text, launches = _LAUNCH.subn(launch, cu_text)
    assert launches >= min_launches, f"expected at least {min_launches} kernel launches, found {launches}"

    def shared(m):
        align, type_, declarators = m.groups()
        out = []
        for decl in _split_top(declarators):
            dm = re.fullmatch(r"(\w+)\s*((?:\[[^\]]+\])+)", decl)
            assert dm, f"cannot read the __shared__ declarator {decl!r}"
            out.append(f"auto& {dm[1]} = ::emu::static_shared<{type_}{dm[2]}>({align or 1});")
        return " ".join(out)

    text = _SHARED.sub(shared, text)
    text = _BOUNDS.sub(lambda m: f"{m[2]}{{ ::emu::launch_bounds({_split_top(m[1])[0]});", text)
    return text.replace('#include "common.cuh"', '#include "emu.h"\n#include "common.cuh"', 1)


def entry_exports(entries):
    """extern "C" int emu_<name>(const dlh::<Args>*, char* err, int n) for each (name, Args)."""
    lines = ["#include <exception>"]
    for name, args in entries:
        lines.append(f'EMU_EXPORT int emu_{name}(const dlh::{args}* a, '
                     f"char* err, int n) {{\n  try {{ dlh::{name}(*a); }} catch (std::exception& e) {{ "
                     f'snprintf(err, n, "%s", e.what()); return 1; }}\n  return 0;\n}}')
    return "\n".join(lines) + "\n"


# ---- building, cached per source hash ----------------------------------------------------------------
def cache_dir():
    root = os.environ.get("DLH_CUDA_EMU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(root) / "dlh-kernels-cuda-emu" if not os.environ.get("DLH_CUDA_EMU_CACHE") else Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hash(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the emulated build of {what} failed:\n{' '.join(map(str, cmd))}\n{proc.stderr[-6000:]}")


def _compiler_id():
    return subprocess.run([_cxx(), "--version"], capture_output=True, text=True).stdout


def _runtime_object(cache):
    inc = _cuda_include()
    key = _hash(RUNTIME.read_text(), HEADER.read_text(), " ".join(CXX_FLAGS), str(inc), _compiler_id())
    obj = cache / f"runtime-{key}.o"
    if not obj.is_file():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        _run([_cxx(), *CXX_FLAGS, f"-I{HERE}", f"-I{inc}", "-c", str(RUNTIME), "-o", str(tmp)], "the emulation runtime")
        os.replace(tmp, obj)
    return obj


def build(cu_name, entries=(), extra_exports="", defines=(), min_launches=1, source=None):
    """Builds csrc/<cu_name> (or `source`, its text, e.g. a mutated copy) under the emulation.
    entries: (function, Args struct) pairs exported as emu_<function>; extra_exports: more C++
    appended to the source (other extern "C" functions)."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the CUDA emulation cannot be built here: {reason}")
    cache = cache_dir()
    inc = _cuda_include()
    text = emulated_source(source if source is not None else (CSRC / cu_name).read_text(), min_launches)
    text += entry_exports(entries) + extra_exports
    headers = "".join(p.read_text() for p in sorted(CSRC.glob("*.cuh")))
    key = _hash(text, headers, HEADER.read_text(), RUNTIME.read_text(), " ".join(CXX_FLAGS + KERNEL_FLAGS),
                " ".join(defines), str(inc), _compiler_id())
    stem = Path(cu_name).stem
    lib = cache / f"{stem}-{key}.so"
    if not lib.is_file():
        runtime = _runtime_object(cache)
        src = cache / f"{stem}-{key}.{os.getpid()}.cpp"
        src.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp.so")
        try:
            _run([_cxx(), *CXX_FLAGS, *KERNEL_FLAGS, *defines, f"-I{HERE}", f"-I{CSRC}", f"-I{inc}",
                  "-c", str(src), "-o", str(src.with_suffix(".o"))], cu_name)
            _run([_cxx(), "-shared", "-pthread", "-Wl,-z,defs", str(src.with_suffix(".o")), str(runtime),
                  "-o", str(tmp)], cu_name)
            os.replace(tmp, lib)
        finally:
            for p in (src, src.with_suffix(".o"), tmp):
                p.unlink(missing_ok=True)
    return Library(ctypes.CDLL(str(lib)), cu_name)


class Library:
    """One emulated .cu: its entry points, the emulation's counters and violations."""

    def __init__(self, cdll, name):
        self.cdll, self.name = cdll, name
        cdll.emu_take_violations.restype = ctypes.c_longlong
        names = ctypes.create_string_buffer(512)
        n = cdll.emu_counter_names(names, 512)
        self.counter_names = names.value.decode().split()
        assert len(self.counter_names) == n
        self.totals = dict.fromkeys(self.counter_names, 0)  # counters over every run so far
        self.sm_count = ctypes.c_int.in_dll(cdll, "emu_sm_count")

    def take_violations(self):
        """(count, description) of the violations since the last call."""
        buf = ctypes.create_string_buffer(8192)
        count = self.cdll.emu_take_violations(buf, 8192)
        return count, buf.value.decode()

    def take_counters(self):
        out = (ctypes.c_longlong * len(self.counter_names))()
        self.cdll.emu_take_counters(out)
        counts = dict(zip(self.counter_names, out))
        for k, v in counts.items():
            self.totals[k] += v
        return counts

    def check(self, what):
        """Raises Violation if the emulation recorded any since the last check."""
        self.take_counters()
        count, text = self.take_violations()
        if count:
            raise Violation(f"{self.name} {what}: {count} violation(s) a GPU would not forgive:\n{text}")

    def run(self, entry, args):
        """emu_<entry>(&args): RuntimeError with the C++ exception's message (after the violation
        check: a violation is the more useful report)."""
        err = ctypes.create_string_buffer(512)
        failed = getattr(self.cdll, "emu_" + entry)(ctypes.byref(args), err, 512)
        self.check(entry)
        if failed:
            raise RuntimeError(err.value.decode())

    def function(self, name, restype, argtypes):
        fn = getattr(self.cdll, name)
        fn.restype, fn.argtypes = restype, argtypes
        return fn
