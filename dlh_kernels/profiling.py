"""NVTX ranges for Nsight: every op records ``dlh::<op>[<backend>]`` while profiling is on, model
layers record their module path, and `profile_steps` brackets the measured steps with the CUDA
profiler API so that a profiler records only them.

Off by default; when off, an op pays one boolean test. Turn on with ``DLH_NVTX=1``,
``dlh.profiling.enable()`` or ``with dlh.profiling.nvtx():``.

Ranges go to the NVTX domain ``dlh`` when the ``nvtx`` package is importable (a dependency of
dlh-kernels), else to the default domain through ``torch.cuda.nvtx``; `domain()` says which.
Nsight Compute filters on them with ``--nvtx --nvtx-include "<domain>@<range>/"`` (the trailing
``/`` marks a push/pop range; ``[ ] / @ , * +`` inside a name are escaped with ``\\``):
`ncu_filter` builds that string, and `recipes` prints the whole commands.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

_enabled = os.environ.get("DLH_NVTX", "0") == "1"
DOMAIN = "dlh"


def enabled() -> bool:
    return _enabled


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


@contextlib.contextmanager
def nvtx(on: bool = True) -> Iterator[None]:
    """Record NVTX ranges inside the block."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def _push_pop():
    # The `nvtx` package has domains and colours; torch's own binding is the fallback (the GPU
    # image has torch but not always the package).
    try:
        import nvtx as _nvtx
        domain = _nvtx.get_domain(DOMAIN)
        return (lambda name: domain.push_range(message=name)), domain.pop_range
    except Exception:
        import torch.cuda.nvtx as _tnvtx
        return _tnvtx.range_push, _tnvtx.range_pop


_push = _pop = None


def _resolve() -> None:
    global _push, _pop
    if _push is None:
        _push, _pop = _push_pop()


def range_push(name: str) -> None:
    """Open an NVTX range on this thread (in the dlh domain when it exists)."""
    _resolve()
    _push(name)


def range_pop() -> None:
    _resolve()
    _pop()


@contextlib.contextmanager
def op_range(name: str) -> Iterator[None]:
    """The range of one op call; callers test `enabled()` first so the off path costs nothing."""
    range_push(name)
    try:
        yield
    finally:
        range_pop()


_NULL = contextlib.nullcontext()


# `dlh.coverage` watches which ops a forward runs: a context-manager factory taking the op name,
# or None (the usual case: one global read per op call).
observer = None


def torch_range(op: str):
    """The range of an op call that the ``torch`` backend runs as plain torch.nn.functional (not
    through a KernelOp), so that it shows as ``dlh::<op>[torch]`` too; a no-op when profiling is off
    (and `dlh.coverage` is not watching)."""
    if observer is not None:
        return observer(op)
    return op_range(f"dlh::{op}[torch]") if _enabled else _NULL


def domain() -> Optional[str]:
    """The NVTX domain the ranges go to: ``"dlh"``, or None for the default domain."""
    try:
        import nvtx  # noqa: F401
        return DOMAIN
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Model layers: one range per module forward, named by the module's path

@contextlib.contextmanager
def module_ranges(model, root: Optional[str] = None) -> Iterator[None]:
    """Inside the block, every module's forward records an NVTX range named by its path in
    ``model`` (``GPT``, ``GPT.blocks.0``, ``GPT.blocks.0.attn``, ...; ``root`` replaces the class
    name at the top) while profiling is on, nested as the calls nest, around the op ranges of
    the dlh ops it calls. Forward hooks only: a backward shows the ops' own ranges."""
    root = root or type(model).__name__
    handles = []
    pushed: list[bool] = []  # one entry per open forward: whether it opened a range

    def pre_hook(name):
        def hook(module, args):
            pushed.append(_enabled)
            if _enabled:
                range_push(name)
        return hook

    def post_hook(module, args, output):
        if pushed and pushed.pop():
            range_pop()

    try:
        for path, module in model.named_modules():
            name = f"{root}.{path}" if path else root
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            # always_call: the range closes even when the forward raises
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The measured steps: warm-up outside, then the profiler on, ranges on, only around them

def profile_steps(step: Callable[[], object], *, warmup: int = 3, iters: int = 10,
                  model=None, cuda: bool = True) -> None:
    """Run ``step()`` ``warmup`` times with the ranges off (compilation, autotuning and caches
    stay out of the profile), then ``iters`` times between ``cudaProfilerStart`` and
    ``cudaProfilerStop`` (`torch.cuda.profiler.start/stop`) with the ranges on, each step in a
    range ``dlh::step <i>``, and with ``model``'s layers in ranges of their own. ``nsys profile
    --capture-range=cudaProfilerApi`` and ``ncu`` (which honours the same calls) then record only
    the measured steps. ``cuda=False`` (CPU tensors, a dry run) skips the profiler calls."""
    import torch
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layers = module_ranges(model) if model is not None else contextlib.nullcontext()
    with layers:
        with nvtx(False):
            for _ in range(warmup):
                step()
        sync()
        if cuda:
            torch.cuda.profiler.start()
        try:
            with nvtx(True):
                for i in range(iters):
                    with op_range(f"dlh::step {i}"):
                        step()
            sync()
        finally:
            if cuda:
                torch.cuda.profiler.stop()


# ---------------------------------------------------------------------------------------------
# Nsight recipes

_NCU_SPECIAL = "@,[]/*+\\"


def _escape(name: str) -> str:
    return "".join("\\" + c if c in _NCU_SPECIAL else c for c in name)


def ncu_filter(range_name: str, dom: Optional[str] = "auto") -> str:
    """The ``--nvtx-include`` value selecting the kernels inside push/pop range ``range_name``:
    ``dlh@dlh::attention\\[triton\\]/``. ``dom``: the domain (default: where our ranges go)."""
    dom = domain() if dom == "auto" else dom
    return (f"{dom}@" if dom else "") + _escape(range_name) + "/"


def recipes(name: str, command: str, focus: Optional[str] = None) -> str:
    """Nsight Systems and Nsight Compute command lines for ``command`` (a ``dlh profile ...`` run
    named ``name`` in the report files); ``focus``: the range whose kernels Nsight Compute
    should profile (an op's ``dlh::layer_norm[triton]``, a layer's ``GPT.blocks.0.attn``)."""
    lines = [
        "# Nsight Systems: the timeline of the measured steps only (the profiler API brackets them)",
        f"nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx "
        f"-o dlh_{name} {command}",
    ]
    if focus:
        lines += [
            f"# Nsight Compute: the kernels inside {focus}, measured steps only, clocks as the GPU runs them",
            f"ncu --profile-from-start off --nvtx --nvtx-include \"{ncu_filter(focus)}\" "
            f"--clock-control none --set full -o dlh_{name}_ncu {command}",
        ]
    lines += [
        "# Nsight Compute: every kernel of the first measured step",
        f"ncu --profile-from-start off --nvtx --nvtx-include \"{ncu_filter('dlh::step 0')}\" "
        f"--clock-control none --set full -o dlh_{name}_step0 {command}",
    ]
    return "\n".join(lines)
