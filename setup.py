"""Build and packaging for dlh-kernels (metadata lives in pyproject.toml).

Python packages: dlh_kernels (and its subpackages) from dlh_kernels/, plus the repository's
triton_kernels/, bench/ and models/ folders installed *under* it, as dlh_kernels.triton_kernels,
dlh_kernels.bench and dlh_kernels.models, so that no generic top-level name lands in site-packages.

The CUDA extension dlh_kernels._C is built by our own build_ext, not by torch's: this file never
imports torch (the GPU machines install with --no-build-isolation against whatever torch is
there). Each csrc/*.cu is compiled by nvcc, csrc/bindings.cpp by the host C++ compiler with
pybind11, and the module is linked against the static CUDA runtime, so it needs no CUDA library
path at run time. The build is skipped, with a message, and the install still succeeds, when:
DLH_NO_CUDA=1, nvcc is not found, pybind11 is missing, or the compilation fails (the `cuda`
backend then reports the extension as missing). DLH_CUDA_REQUIRED=1 turns those into errors.

Environment:
  CUDA_HOME / CUDA_PATH   CUDA toolkit to use (else nvcc on PATH, else /usr/local/cuda)
  DLH_CUDA_ARCHS          target architectures, default "80;90" (e.g. "90a", "80;86;90");
                          SASS for each, plus PTX for the highest
  DLH_NO_CUDA=1           skip the CUDA build
  DLH_CUDA_REQUIRED=1     fail the install instead of skipping
  MAX_JOBS                parallel compile jobs (ninja -j)
  CXX                     host C++ compiler for bindings.cpp and the link (default c++)

pip hides build output unless asked: `pip install -v -e .` shows what was built or skipped.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "dlh_kernels._C"
DEFAULT_ARCHS = "80;90"

NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo",
              "-Xcompiler", "-fvisibility=hidden"]
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden"]
# The static runtime's symbols stay private to the module (--exclude-libs): with torch's own
# libcudart loaded in the same process, our calls must still bind to our copy.
LINK_LIBS = ["-ldl", "-lpthread", "-lrt"]
LINK_FLAGS = ["-Wl,--exclude-libs,ALL", "-Wl,-O1"]


# ---- packages ------------------------------------------------------------------------------
def _packages():
    packages = {"dlh_kernels", "dlh_kernels.ops"}
    packages.update("dlh_kernels." + p for p in find_packages(str(ROOT / "dlh_kernels")))
    package_dir = {"dlh_kernels": "dlh_kernels"}
    for folder in ("triton_kernels", "bench", "models"):  # repository folders mapped under dlh_kernels
        if (ROOT / folder).is_dir():
            name = "dlh_kernels." + folder
            package_dir[name] = folder
            packages.add(name)
            packages.update(f"{name}.{p}" for p in find_packages(str(ROOT / folder)))
    return sorted(packages), package_dir


# ---- CUDA toolchain discovery ----------------------------------------------------------------
def _say(msg):
    print(f"dlh-kernels setup: {msg}", file=sys.stderr, flush=True)


def _cuda_home_of_nvcc(nvcc):
    """The toolkit root that owns this nvcc (nvcc may be a wrapper script outside it)."""
    candidate = Path(os.path.realpath(nvcc)).parent.parent
    if (candidate / "include" / "cuda_runtime.h").is_file():
        return candidate
    try:  # nvcc reports its own root as TOP in a dry run; no file is read
        out = subprocess.run([str(nvcc), "--dryrun", "-c", "dlh_probe.cu"], capture_output=True,
                             text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if match:
            return Path(os.path.realpath(match.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return Path("/usr/local/cuda")


def find_nvcc():
    """(nvcc, cuda_home) from CUDA_HOME/CUDA_PATH, else nvcc on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return nvcc, Path(home)
            _say(f"{var}={home} has no bin/nvcc; looking elsewhere")
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path), _cuda_home_of_nvcc(on_path)
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").is_file():
        return default / "bin" / "nvcc", default
    return None, None


def _first_existing(paths):
    return next((p for p in paths if p.exists()), None)


def cuda_layout(home):
    """(include dir, libcudart_static.a) of a toolkit, or None where missing."""
    include = _first_existing([home / "include" / "cuda_runtime_api.h",
                               *sorted(home.glob("targets/*/include/cuda_runtime_api.h"))])
    cudart = _first_existing([home / "lib64" / "libcudart_static.a",
                              home / "lib" / "libcudart_static.a",
                              *sorted(home.glob("targets/*/lib/libcudart_static.a"))])
    return (include.parent if include else None), cudart


def nvcc_version(nvcc):
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def parse_archs(spec):
    """'80;90a' or '8.0 9.0' -> ['80', '90a']; raises ValueError on anything else."""
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        arch = token.replace(".", "").lower()
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"DLH_CUDA_ARCHS entry {token!r} is not an arch like 80, 90 or 90a")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError("DLH_CUDA_ARCHS is empty")
    return archs


def gencode_flags(archs):
    """SASS for every arch, plus PTX of the highest so newer GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    highest = max(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))
    flags.append(f"-gencode=arch=compute_{highest},code=compute_{highest}")
    return flags


# ---- the build -------------------------------------------------------------------------------
class CudaExtension(Extension):
    """Marks the extension our build_ext compiles with nvcc + the host compiler."""


def _ninja_escape(text):
    return text.replace("$", "$$").replace(" ", "$ ").replace(":", "$:").replace("\n", "$\n")


def _command(args):
    return " ".join(shlex.quote(str(a)) for a in args)


class BuildExt(build_ext):
    """build_ext that compiles CudaExtensions itself and never fails the install over them."""

    def run(self):
        # setuptools clears `inplace` while it builds; remember whether outputs go to the sources.
        self._to_sources = bool(self.inplace or getattr(self, "editable_mode", False))
        reason = self._skip_reason()
        if reason:
            self._skip(reason)
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        start = time.time()
        try:
            self._build_cuda(ext)
        except (OSError, subprocess.SubprocessError, ValueError, RuntimeError) as err:
            self._skip(f"the CUDA build failed:\n{err}")
            return
        _say(f"built {EXT_NAME} in {time.time() - start:.0f} s -> {self.get_ext_fullpath(ext.name)}")

    def _skip(self, reason):
        message = f"skipping the CUDA extension {EXT_NAME}: {reason}"
        if os.environ.get("DLH_CUDA_REQUIRED") == "1":
            raise RuntimeError(f"dlh-kernels: {message} (DLH_CUDA_REQUIRED=1)")
        banner = "=" * 78
        print(f"{banner}\ndlh-kernels setup: {message}\nInstalling without it: the `cuda` backend "
              f"will report the extension as missing; `triton` and `torch` are unaffected.\n{banner}",
              file=sys.stderr, flush=True)
        # Drop it from the list so that setuptools neither copies nor records a missing file.
        self.extensions = [e for e in self.extensions if not isinstance(e, CudaExtension)]
        # An editable install must not keep loading the module of an earlier build.
        stale = ROOT / "dlh_kernels" / Path(self.get_ext_filename(EXT_NAME)).name
        if getattr(self, "_to_sources", False) and stale.exists():
            stale.unlink()
            _say(f"removed the previously built {stale}")

    def _skip_reason(self):
        if not any(isinstance(e, CudaExtension) for e in self.extensions):
            return None
        if os.environ.get("DLH_NO_CUDA", "0") not in ("", "0"):
            return "DLH_NO_CUDA is set"
        self.nvcc, self.cuda_home = find_nvcc()
        if self.nvcc is None:
            return "nvcc not found (set CUDA_HOME, or put nvcc on PATH)"
        self.cuda_include, self.cudart = cuda_layout(self.cuda_home)
        if self.cuda_include is None or self.cudart is None:
            return f"{self.cuda_home} lacks cuda_runtime_api.h or libcudart_static.a"
        try:
            import pybind11  # noqa: PLC0415 - only needed to build the extension
        except ImportError:
            return "pybind11 is not installed (pip install pybind11, or use build isolation)"
        self.pybind11_include = pybind11.get_include()
        self.cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not self.cxx:
            return "no host C++ compiler (c++ / g++ / $CXX) found"
        try:
            self.archs = parse_archs(os.environ.get("DLH_CUDA_ARCHS") or DEFAULT_ARCHS)
        except ValueError as err:
            return str(err)
        return None

    def _build_cuda(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = (Path(self.build_temp) / "dlh_cuda").resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        version = nvcc_version(self.nvcc)
        archs = ";".join(self.archs)
        _say(f"building {EXT_NAME} with {self.nvcc} (CUDA {version}) for archs {archs}")

        python_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        includes = [f"-I{CSRC}"]
        cxx_includes = includes + [f"-I{self.pybind11_include}", f"-I{self.cuda_include}"]
        cxx_includes += [f"-I{p}" for p in sorted(python_includes)]
        defines = [f'-DDLH_CUDA_ARCHS="{archs}"', f'-DDLH_NVCC_VERSION="{version}"']
        nvcc_threads = ["--threads", str(max(1, min(len(self.archs) + 1, os.cpu_count() or 1)))]
        nvcc_flags = NVCC_FLAGS + gencode_flags(self.archs) + nvcc_threads + includes
        cxx_flags = CXX_FLAGS + cxx_includes + defines

        units = []  # (kind, source, object)
        for src in sorted(CSRC.glob("*.cu")):
            units.append(("nvcc", src, tmp / f"{src.name}.o"))
        units.append(("cxx", CSRC / "bindings.cpp", tmp / "bindings.cpp.o"))
        objects = [o for _, _, o in units]
        link = [self.cxx, "-shared", *objects, "-o", out, str(self.cudart), *LINK_LIBS, *LINK_FLAGS]

        ninja = shutil.which("ninja")
        if ninja:
            self._run_ninja(ninja, tmp, units, nvcc_flags, cxx_flags, link, out)
        else:
            for kind, src, obj in units:
                compiler = [str(self.nvcc), *nvcc_flags] if kind == "nvcc" else [self.cxx, *cxx_flags]
                self._run([*compiler, "-c", src, "-o", obj])
            self._run(link)

    def _run_ninja(self, ninja, tmp, units, nvcc_flags, cxx_flags, link, out):
        e = _ninja_escape
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc_cmd = {e(_command([self.nvcc, *nvcc_flags]))}",
            f"cxx_cmd = {e(_command([self.cxx, *cxx_flags]))}",
            "rule nvcc",
            "  command = $nvcc_cmd -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $cxx_cmd -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            f"  command = {e(_command(link))}",
            "  description = link $out",
        ]
        for kind, src, obj in units:
            lines.append(f"build {e(str(obj))}: {kind} {e(str(src))}")
        lines.append(f"build {e(str(out))}: link {' '.join(e(str(o)) for _, _, o in units)}")
        lines.append(f"default {e(str(out))}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS")
        self._run([ninja, "-C", tmp, "-f", "build.ninja", *(["-j", jobs] if jobs else [])])

    @staticmethod
    def _run(args):
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"$ {_command(args)}\n{proc.stdout}{proc.stderr}".rstrip())


packages, package_dir = _packages()

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[
        CudaExtension(
            EXT_NAME,
            sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))] + ["csrc/bindings.cpp"],
            depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cuh"))],
        )
    ],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
