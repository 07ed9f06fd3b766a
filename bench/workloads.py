"""One call of each op on ready-made inputs: what `dlh profile <op>` and the cold-start benchmark run.

``make(op, device, dtype, backend, size, grad)`` returns a zero-argument callable that runs the
op once (``grad``: forward and backward to every input). Sizes:
  "tiny"     a few hundred elements: CPU tensors, the Triton interpreter, tests
  "default"  a representative layer of the reference models on a GPU (GPT-2 small / a U-Net)

``range_name(op, backend)`` is the NVTX range the call records (`dlh_kernels.profiling`): the
name of the torch op it goes through, which is not always the public function's
(``bias_gelu`` is ``DF.gelu`` with a bias).
"""
from __future__ import annotations

from typing import Callable

import torch

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "bias_gelu", "geglu",
       "linear_gelu", "linear", "attention", "group_norm", "conv2d", "diffusion_step",
       "silu", "relu", "leaky_relu", "swiglu", "gated_gelu", "rotary_embedding")
SIZES = ("tiny", "default")
_RANGE = {"bias_gelu": "gelu"}
# The activations' kernels run through one torch op per shape of work; their torch backend runs
# torch.nn.functional under the function's own name.
_KERNEL_RANGE = {"silu": "activation", "relu": "activation", "leaky_relu": "activation",
                 "swiglu": "gated_activation", "gated_gelu": "gated_activation"}


def range_name(op: str, backend: str) -> str:
    if backend != "torch" and op in _KERNEL_RANGE:
        return f"dlh::{_KERNEL_RANGE[op]}[{backend}]"
    return f"dlh::{_RANGE.get(op, op)}[{backend}]"


def make(op: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
         size: str = "default", grad: bool = False) -> Callable[[], object]:
    """A zero-argument callable running ``op`` once on ``backend`` (see the module docstring)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    import dlh_kernels.functional as DF
    tiny = size == "tiny"
    g = torch.Generator(device="cpu").manual_seed(0)

    inputs: list[torch.Tensor] = []  # what the backward differentiates with respect to

    def rand(*shape, scale=1.0, offset=0.0, requires_grad=grad):
        t = (offset + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
        if requires_grad:
            inputs.append(t.requires_grad_())
        return t

    be = dict(backend=backend)
    if op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        M, N = (8, 64) if tiny else (8 * 1024, 768)  # batch 8 x 1024 tokens, GPT-2 small
        x = rand(M, N)
        r = rand(M, N) if op.startswith("add_") else None
        w = rand(N, scale=0.1, offset=1.0)
        b = rand(N, scale=0.1) if op.endswith("layer_norm") else None
        calls = {
            "layer_norm": lambda: DF.layer_norm(x, (N,), w, b, **be),
            "rms_norm": lambda: DF.rms_norm(x, (N,), w, **be),
            "add_layer_norm": lambda: DF.add_layer_norm(x, r, (N,), w, b, **be)[0],
            "add_rms_norm": lambda: DF.add_rms_norm(x, r, (N,), w, **be)[0],
        }
        fwd = calls[op]
    elif op in ("gelu", "bias_gelu", "geglu"):
        M, N = (8, 96) if tiny else (8 * 1024, 3072)  # GPT-2 small's MLP activation
        x = rand(M, 2 * N if op == "geglu" else N)
        bias = rand(N, scale=0.1) if op == "bias_gelu" else None
        fwd = {"gelu": lambda: DF.gelu(x, **be),
               "bias_gelu": lambda: DF.gelu(x, "tanh", bias=bias, **be),
               "geglu": lambda: DF.geglu(x, "tanh", **be)}[op]
    elif op in ("silu", "relu", "leaky_relu"):
        M, N = (8, 96) if tiny else (8 * 1024, 3072)  # GPT-2 small's MLP width
        x = rand(M, N)
        fwd = {"silu": lambda: DF.silu(x, **be), "relu": lambda: DF.relu(x, **be),
               "leaky_relu": lambda: DF.leaky_relu(x, 0.2, **be)}[op]
    elif op in ("swiglu", "gated_gelu"):
        # the fused gate_up_proj output of one LLaMA-7B MLP (8 x 512 tokens, 2 x 11008 wide)
        M, N = (8, 96) if tiny else (8 * 512, 11008)
        x = rand(M, 2 * N)
        fwd = {"swiglu": lambda: DF.swiglu(x, **be),
               "gated_gelu": lambda: DF.gated_gelu(x, approximate="tanh", **be)}[op]
    elif op == "linear_gelu":
        M, K, N = (16, 32, 64) if tiny else (8 * 1024, 768, 3072)
        x, W, bias = rand(M, K), rand(N, K, scale=K ** -0.5), rand(N, scale=0.1)
        fwd = lambda: DF.linear_gelu(x, W, bias, "tanh", **be)  # noqa: E731
    elif op == "linear":
        # GPT-2 small's c_fc: a Conv1D, weight stored (in, out) and handed in as its .t() view
        M, K, N = (16, 32, 64) if tiny else (8 * 1024, 768, 3072)
        x, W_in_out, bias = rand(M, K), rand(K, N, scale=K ** -0.5), rand(N, scale=0.1)
        fwd = lambda: DF.linear(x, W_in_out.t(), bias, activation="gelu_tanh", **be)  # noqa: E731
    elif op == "attention":
        B, H, L, D = (1, 2, 48, 32) if tiny else (8, 12, 1024, 64)
        q, k, v = rand(B, H, L, D), rand(B, H, L, D), rand(B, H, L, D)
        fwd = lambda: DF.scaled_dot_product_attention(q, k, v, is_causal=True, **be)  # noqa: E731
    elif op == "group_norm":
        B, C, HW = (2, 32, 6) if tiny else (16, 256, 32)  # a U-Net ResBlock at 32x32
        x = rand(B, C, HW, HW)
        w, b = rand(C, scale=0.1, offset=1.0), rand(C, scale=0.1)
        fwd = lambda: DF.group_norm(x, 8 if tiny else 32, w, b, activation="silu", **be)  # noqa: E731
    elif op == "conv2d":
        B, C, HW, K = (1, 8, 6, 8) if tiny else (16, 128, 32, 128)
        x = rand(B, C, HW, HW, requires_grad=False).contiguous(memory_format=torch.channels_last)
        if grad:
            inputs.append(x.requires_grad_())
        w = rand(K, C, 3, 3, scale=(9 * C) ** -0.5)
        bias = rand(K, scale=0.1)
        fwd = lambda: DF.conv2d(x, w, bias, padding=1, activation="silu", **be)  # noqa: E731
    elif op == "rotary_embedding":
        # one LLaMA-2-7B layer's q/k at prefill: 8 x 1024 tokens, 32 heads of 128; GQA 4:1 for k;
        # fp32 cos/sin tables (the rotary module's cache), rounded to q's dtype by the op
        B, Hq, Hk, S, D = (1, 2, 1, 16, 32) if tiny else (8, 32, 8, 1024, 128)
        q, k = rand(B, Hq, S, D), rand(B, Hk, S, D)
        angles = torch.arange(S, device=device, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g).to(device)
        emb = torch.cat([angles, angles], -1)[None]
        cos, sin = emb.cos(), emb.sin()
        call = lambda: DF.rotary_embedding(q, k, cos, sin, **be)  # noqa: E731
        if not grad:
            return call

        def rotary_fwd_bwd():
            qo, ko = call()
            return torch.autograd.grad((qo, ko), inputs, (torch.ones_like(qo), torch.ones_like(ko)))
        return rotary_fwd_bwd
    else:  # diffusion_step: sampling, no backward
        from dlh_kernels import diffusion
        shape = (1, 3, 4, 4) if tiny else (16, 3, 32, 32)
        x, eps = rand(*shape, requires_grad=False), rand(*shape, requires_grad=False)
        table = diffusion.linear_alphas_cumprod(1000, device=device)
        seed = torch.tensor(7, device=device)
        return lambda: DF.diffusion_step(x, eps, 500, 480, table, method="ddim", eta=1.0, seed=seed, **be)
    if not grad:
        return fwd

    def fwd_bwd():
        y = fwd()
        return torch.autograd.grad(y, inputs, torch.ones_like(y))
    return fwd_bwd
