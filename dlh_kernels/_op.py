"""The one mechanism that turns a kernel into a torch op.

`KernelOp` registers ``torch.ops.dlh.<name>`` (schema, fake kernel, autograd) and calls the
backend's implementation. Every op takes the backend as its last argument, a plain string, so
`torch.compile` sees a constant and the graph never branches on it.

Two ways in, one set of implementations:
- the dispatcher path (``torch.ops.dlh.<name>``): used under `torch.compile`, `opcheck`,
  fake/functional tensors and export. It costs tens of microseconds per call in Python.
- the eager fast path: plain tensors outside compilation call the implementation directly, and
  through an `autograd.Function` built from the same `setup_context`/`backward` when a gradient
  is needed. Small models and the diffusion step are launch-bound, so this is a feature.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import profiling

_LIB_NAME = "dlh"

_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active


class KernelOp:
    """``torch.ops.dlh.<name>`` plus its eager fast path.

    name:      op name in the ``dlh`` namespace.
    schema:    argument/return part of the schema, e.g. ``"(Tensor x, str backend) -> Tensor"``;
               the last argument must be ``str backend``.
    impls:     backend name -> function of the op's arguments without the backend.
    fake:      shape/dtype function for fake tensors (same arguments, backend included).
    setup_context, backward: as in `torch.library.register_autograd`; omit for ops without one.
    """

    def __init__(self, name: str, schema: str, impls: dict[str, Callable], fake: Callable, *,
                 setup_context: Optional[Callable] = None, backward: Optional[Callable] = None):
        self.name = name
        self.impls = impls
        self.custom_op = torch.library.custom_op(
            f"{_LIB_NAME}::{name}", self._run, mutates_args=(), schema=schema)
        self.custom_op.register_fake(fake)
        self._function = None
        if backward is not None:
            self.custom_op.register_autograd(backward, setup_context=setup_context)
            self._function = type(f"{name}_function", (torch.autograd.Function,), {
                "forward": staticmethod(self._run),
                "setup_context": staticmethod(setup_context),
                "backward": staticmethod(backward),
            })
            # `Function.apply` binds the arguments to forward's signature (inspect.signature:
            # ~11 us a call) only to fill in defaults, which `_run(*args)` has none of, then
            # calls this C apply; outside torch.func transforms the fast path calls it directly
            self._apply = super(torch.autograd.Function, self._function).apply

    @property
    def qualname(self) -> str:
        return f"{_LIB_NAME}::{self.name}"

    def _run(self, *args):
        backend = args[-1]
        impl = self.impls[backend]
        if profiling._enabled:
            with profiling.op_range(f"dlh::{self.name}[{backend}]"):
                return impl(*args[:-1])
        return impl(*args[:-1])

    def __call__(self, *args):
        if profiling.observer is not None:  # `dlh.coverage` is watching
            with profiling.observer(self.name):
                return self._call(*args)
        return self._call(*args)

    def _call(self, *args):
        # one pass over the arguments: any traced tensor (fake, functional, a subclass) or
        # compilation sends the call through the dispatcher; a tensor needing a gradient
        # sends it through the autograd.Function
        if _is_compiling():
            return self.custom_op(*args)
        grad = False
        for a in args:
            if isinstance(a, _TENSOR):
                kind = type(a)
                if kind is not _TENSOR and kind is not _PARAMETER:
                    return self.custom_op(*args)
                if a.requires_grad:
                    grad = True
        if grad and self._function is not None and torch.is_grad_enabled():
            if _functorch_active():  # torch.func transforms: the full apply (custom_function_call)
                return self._function.apply(*args)
            return self._apply(*args)
        return self._run(*args)
