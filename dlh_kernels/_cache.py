"""What dlh-kernels keeps between runs: Triton autotuning results and the ``auto`` backend order.

The directory: ``$DLH_CACHE_DIR``, else ``$XDG_CACHE_HOME/dlh_kernels``, else
``~/.cache/dlh_kernels``; ``DLH_CACHE_DIR=off`` keeps nothing. Inside it:

    autotune/<kernel>-<hash>.json   one file per autotuned kernel: tuning key -> chosen config
    auto_backend.json               {device name: {op: [backend, ...]}}: `auto`'s order per op

Autotuning. A kernel under ``triton.autotune`` times every config the first time it meets a new
tuning key (a new shape bucket, dtype, ...): tens of compiles and hundreds of launches, seconds
per kernel, paid again by every new process. `persistent_autotune` wraps such an autotuner: on
its first launch in a process it loads the choices saved for this kernel, and whenever it tunes
a new key it saves the choice, so the next process launches the saved config straight away
(one compile, which Triton's own cache of compiled kernels, ``TRITON_CACHE_DIR``, default
``~/.triton/cache``, usually makes a file read). The file's name hashes what would invalidate a
choice: the device, the Triton version, the kernel's source (Triton's ``cache_key``) and the
config list; change any and the kernel tunes again into a new file.

Why not Triton's own ``triton.autotune(..., cache_results=True)`` (or
``TRITON_CACHE_AUTOTUNING=1``, in Triton >= 3.4's knobs)? It writes under ``TRITON_CACHE_DIR``,
one directory per key, next to the compiled kernels; it skips configs with a pre-hook; and its
arguments have changed between releases. This file works the same on Triton 3.6 (the GPU
image) and 3.9, lives where the user set ``DLH_CACHE_DIR``, and can be read and deleted by hand.
It touches only the autotuner's documented-by-use attributes ``cache`` (tuning key -> Config),
``configs`` and ``run``.

Under the Triton interpreter no kernel is autotuned (each runs one fixed config), so nothing
here runs there.

The ``auto`` backend order. ``auto`` tries backends in a fixed order per op (triton, cuda,
torch); ``dlh bench ... --save-auto`` records, per op and device, the order its timings found
fastest, and `auto_order` reads it back (once per process) in later runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

_OFF = ("off", "none", "0", "false")


def cache_dir() -> Optional[Path]:
    """The cache directory, or None when ``DLH_CACHE_DIR`` turns the cache off."""
    env = os.environ.get("DLH_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF or not env.strip() else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlh_kernels"


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> bool:
    """Write atomically (a temp file renamed over the target): a reader in another process never
    sees half a file. False (and nothing raised) when the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def _device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Autotuning results

def _kernel_fn(tuner):
    """The JITFunction under an autotuner (through heuristics wrappers)."""
    fn = getattr(tuner, "fn", None)
    while fn is not None and not hasattr(fn, "src") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _kernel_name(tuner) -> str:
    fn = _kernel_fn(tuner)
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")


def autotune_file(tuner, device: Optional[str] = None) -> Optional[Path]:
    """Where this autotuner's choices live on ``device`` (default: the current one)."""
    root = cache_dir()
    if root is None:
        return None
    import triton
    fn = _kernel_fn(tuner)
    source = getattr(fn, "cache_key", None) or getattr(fn, "src", "") or ""
    parts = [device or _device_name(), triton.__version__, str(source)] + [str(c) for c in tuner.configs]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return root / "autotune" / f"{_kernel_name(tuner)[:100]}-{digest}.json"


def _json_key(key: Any) -> Optional[list]:
    """The tuning key as a JSON list, or None when it would not read back equal."""
    try:
        as_list = json.loads(json.dumps(list(key)))
    except (TypeError, ValueError):
        return None
    return as_list if tuple(as_list) == tuple(key) else None


def load_autotune(tuner, path: Path) -> int:
    """Put the choices saved in ``path`` into ``tuner.cache``; how many were loaded."""
    data = _read_json(path)
    if not data:
        return 0
    by_name = {str(c): c for c in tuner.configs}
    loaded = 0
    for key, config_name in data.get("choices", []):
        config = by_name.get(config_name)
        if config is not None and tuple(key) not in tuner.cache:
            tuner.cache[tuple(key)] = config
            loaded += 1
    return loaded


def save_autotune(tuner, path: Path) -> bool:
    """Merge ``tuner.cache`` into ``path`` (other processes may have added keys meanwhile)."""
    old = _read_json(path) or {}
    choices = {json.dumps(k): name for k, name in old.get("choices", [])}
    for key, config in tuner.cache.items():
        as_list = _json_key(key)
        if as_list is not None:
            choices[json.dumps(as_list)] = str(config)
    import triton
    data = {"kernel": _kernel_name(tuner), "device": _device_name(), "triton": triton.__version__,
            "choices": [[json.loads(k), name] for k, name in sorted(choices.items())]}
    return _write_json(path, data)


def persistent_autotune(tuner):
    """Make a ``triton.autotune`` result keep its choices in the cache directory (see the module
    docstring) and launch without the autotuner's Python once a key is chosen; returns the same
    object.

    Triton's ``Autotuner.run`` rebuilds its key on every call (dicts of every argument, a dtype
    scan: ~10 us per launch in Triton 3.6, review 2026-12 T7). Here the key's arguments are
    read by position and the tensors' dtypes from the positions that held a tensor or None on
    the first call (a position of our glue holds a tensor, or None, in every call or in none);
    that key maps to the config Triton chose, and a steady-state call goes straight to the
    kernel's ``run`` with it. A new key, a config with a pre_hook, or an argument passed by name
    takes Triton's own path (which tunes, or finds its cached choice). The launch itself goes
    through triton_kernels.common.launch (the binder's work once per key); a callable grid gets
    the constexprs and the config (not the positional arguments).
    """
    own_run = tuner.__dict__.get("run")  # an instance's own run (a test's stand-in) is kept
    state = {"path": None, "saved": None, "layout": None}
    chosen: dict = {}  # our key -> the config's kwargs
    persist = cache_dir() is not None
    fn = tuner.fn

    def slow(args, kwargs):
        if persist and state["saved"] is None:  # first launch here: the device is known now
            try:
                state["path"] = autotune_file(tuner)
                if state["path"] is not None:
                    load_autotune(tuner, state["path"])
            except Exception:  # a broken cache must never break a kernel launch
                state["path"] = None
            state["saved"] = len(tuner.cache)
        # the class's run looked up per call: tools (bench/triton_resources.py) patch the class
        out = own_run(*args, **kwargs) if own_run is not None else type(tuner).run(tuner, *args, **kwargs)
        if persist and len(tuner.cache) != state["saved"]:
            state["saved"] = len(tuner.cache)
            if state["path"] is not None:
                save_autotune(tuner, state["path"])
        return out

    def run(*args, **kwargs):
        layout = state["layout"]
        if layout is None:
            names = list(tuner.arg_names)
            positional = [names.index(k) for k in tuner.keys if names.index(k) < len(args)]
            named = [k for k in tuner.keys if names.index(k) >= len(args)]
            if any(k not in kwargs for k in named):
                return slow(args, kwargs)
            layout = state["layout"] = (
                tuple(positional), tuple(named),
                tuple(i for i, a in enumerate(args) if a is None or hasattr(a, "dtype")), len(args))
        positional, named, tensors, nargs = layout
        if len(args) != nargs:
            return slow(args, kwargs)
        try:
            key = tuple([args[i] for i in positional] + [kwargs[k] for k in named]
                        + [None if args[i] is None else args[i].dtype for i in tensors])
        except KeyError:
            return slow(args, kwargs)
        config = chosen.get(key)
        if config is not None:
            meta = {k: v for k, v in kwargs.items() if k != "grid" and k != "warmup"}
            meta.update(config)
            return state["launch"](fn, kwargs["grid"], args, meta)
        out = slow(args, kwargs)
        best = getattr(tuner, "best_config", None)
        if best is not None and best.pre_hook is None:
            if "launch" not in state:  # imported once (triton_kernels needs triton)
                from dlh_kernels.triton_kernels.common import launch
                state["launch"] = launch
            chosen[key] = best.all_kwargs()
        return out

    tuner.run = run
    return tuner


# ---------------------------------------------------------------------------------------------
# The `auto` backend order

AUTO_FILE = "auto_backend.json"
_auto_orders: Optional[dict] = None  # this device's {op: order}, read once per process


def _auto_path() -> Optional[Path]:
    root = cache_dir()
    return None if root is None else root / AUTO_FILE


def auto_order(op: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``auto``'s order of backends for ``op`` on this CUDA device: the saved one, else ``default``.
    A saved order that lists only some backends is completed with the rest of ``default``."""
    global _auto_orders
    if _auto_orders is None:
        _auto_orders = {}
        path = _auto_path()
        data = _read_json(path) if path is not None else None
        if data:
            try:
                _auto_orders = dict(data.get(_device_name(), {}))
            except Exception:
                _auto_orders = {}
    saved = _auto_orders.get(op)
    if not saved:
        return default
    head = tuple(b for b in saved if b in default)
    return head + tuple(b for b in default if b not in head)


def save_auto_orders(orders: dict[str, list[str]], device: Optional[str] = None) -> Optional[Path]:
    """Record ``{op: [backend, ...]}`` for ``device`` (default: the current one); the file's path,
    or None when the cache is off or not writable. Takes effect in the next process (and in this
    one: the in-process copy is dropped)."""
    global _auto_orders
    path = _auto_path()
    if path is None:
        return None
    data = _read_json(path) or {}
    device = device or _device_name()
    data.setdefault(device, {}).update({op: list(order) for op, order in orders.items()})
    _auto_orders = None
    return path if _write_json(path, data) else None


def clear() -> list[Path]:
    """Delete the cache's files (autotuning results and the auto orders); the paths deleted."""
    root = cache_dir()
    gone = []
    if root is None or not root.is_dir():
        return gone
    for path in list((root / "autotune").glob("*.json")) + [root / AUTO_FILE]:
        if path.is_file():
            path.unlink()
            gone.append(path)
    global _auto_orders
    _auto_orders = None
    return gone
