"""Drop-in modules: subclasses of their torch counterparts with the same parameters and
`state_dict`, whose forward calls `dlh_kernels.functional`.

Each has a `backend` attribute (None: the current default, see `dlh.use_backend`); it is not
part of the state_dict.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import functional as DF
from . import profiling


class LayerNorm(torch.nn.LayerNorm):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                             backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    backend: Optional[str] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class GroupNorm(torch.nn.GroupNorm):
    """`torch.nn.GroupNorm` on dlh kernels. ``activation="silu"`` (keyword-only, not part of the
    state_dict) fuses the SiLU that follows the norm in a U-Net block into the same kernel."""
    backend: Optional[str] = None
    activation: Optional[str] = None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: Optional[str] = None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        if activation not in (None, "silu"):
            raise ValueError(f"dlh.nn.GroupNorm: activation must be None or 'silu', got {activation!r}")
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                             activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra


class GELU(torch.nn.GELU):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _handed_over(self, input):
            return input
        return DF.gelu(input, self.approximate, backend=self.backend)


class LinearGELU(torch.nn.Linear):
    """``nn.Sequential(nn.Linear(...), nn.GELU(approximate))`` as one module: `torch.nn.Linear`
    (same parameters, same state_dict) whose forward is `DF.linear_gelu`, the GELU in the
    matmul's epilogue. ``approximate`` (keyword-only, "none" or "tanh") is not part of the
    state_dict. `dlh.patch` makes one from each Linear followed by a GELU in an nn.Sequential.
    """
    backend: Optional[str] = None
    approximate: str = "none"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, approximate: str = "none"):
        super().__init__(in_features, out_features, bias, device, dtype)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"dlh.nn.LinearGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.linear_gelu(input, self.weight, self.bias, self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", approximate={self.approximate!r}"


class Linear(torch.nn.Linear):
    """`torch.nn.Linear` (same parameters, same state_dict) whose forward is `DF.linear`: the
    bias and an optional activation in the matmul's epilogue. ``activation`` (None, "relu",
    "leaky_relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid"), ``negative_slope`` (leaky_relu's) and
    ``backend`` are attributes, not part of the state_dict.
    """
    backend: Optional[str] = None
    activation: Optional[str] = None
    negative_slope: float = 0.01

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, activation: Optional[str] = None, negative_slope: float = 0.01,
                 backend: Optional[str] = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        from .ops.linear import ACTIVATIONS
        if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
            raise ValueError(f"dlh.nn.Linear: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation, self.negative_slope, self.backend = activation, negative_slope, backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.linear(input, self.weight, self.bias, activation=self.activation,
                         negative_slope=self.negative_slope, backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation is not None else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


class MultiheadAttention(torch.nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention runs through
    `dlh_kernels.functional.scaled_dot_product_attention` (same parameters, same state_dict,
    batch_first either way, key_padding_mask, attn_mask, is_causal, dropout in training).

    Only ``need_weights=False`` runs our kernel. ``need_weights=True`` (torch's default) needs the
    full (L, S) attention matrix, which a fused kernel never forms, so it falls back to torch's
    implementation, as do ``add_bias_kv`` and ``add_zero_attn``. Pass ``need_weights=False`` to
    get the fused path.
    """
    backend: Optional[str] = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = (x.unsqueeze(0 if self.batch_first else 1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        bdim = 0 if self.batch_first else 1
        N, L, S = query.shape[bdim], query.shape[1 - bdim], key.shape[1 - bdim]
        E, H = self.embed_dim, self.num_heads

        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one matmul
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
            else:
                w = self.in_proj_weight.chunk(3)
                b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
                q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, b))
        else:
            b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip(
                (query, key, value), (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight), b))

        def heads(t, n):  # (N, n, E) or (n, N, E) -> (N, H, n, E / H), a view
            t = t.unflatten(-1, (H, E // H))
            return t.permute(0, 2, 1, 3) if self.batch_first else t.permute(1, 2, 0, 3)

        mask, causal = self._sdpa_mask(key_padding_mask, attn_mask, is_causal, N, L, S, query.dtype)
        out = DF.scaled_dot_product_attention(
            heads(q, L), heads(k, S), heads(v, S), mask, self.dropout if self.training else 0.0,
            causal, backend=self.backend)                                  # (N, H, L, E / H)
        out = out.permute(0, 2, 1, 3) if self.batch_first else out.permute(2, 0, 1, 3)
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None

    def _sdpa_mask(self, key_padding_mask, attn_mask, is_causal, N, L, S, dtype):
        """torch's MHA masks (True = masked out, or additive; attn_mask (L, S) or (N*H, L, S),
        key_padding_mask (N, S)) as one SDPA mask (True = attends) broadcast to (N, H, L, S)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("dlh.nn.MultiheadAttention: is_causal=True needs attn_mask (the "
                               "causal mask), as torch's MultiheadAttention does")
        if is_causal and key_padding_mask is None:
            return None, True  # the hint: attn_mask is the causal mask
        masks = []
        if attn_mask is not None:
            masks.append(attn_mask if attn_mask.dim() == 2 else attn_mask.view(N, self.num_heads, L, S))
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(N, 1, 1, S))
        if not masks:
            return None, False
        if all(m.dtype == torch.bool for m in masks):
            allowed = ~masks[0]
            for m in masks[1:]:
                allowed = allowed & ~m
            return allowed, False
        added = None
        for m in masks:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m
            added = m if added is None else added + m
        return added, False


class Conv2d(torch.nn.Conv2d):
    """`torch.nn.Conv2d` on dlh kernels (same parameters, same state_dict), with the keyword-only
    ``activation`` (None, "relu", "silu", "gelu", "gelu_tanh", "leaky_relu", "tanh", "sigmoid"; and
    ``negative_slope``) fused into the convolution's epilogue; neither is part of the state_dict.

    Only ``padding_mode="zeros"`` runs our kernel. The other padding modes ("reflect",
    "replicate", "circular") fall back to torch: F.pad, then torch's convolution, then the
    activation in eager PyTorch.
    """
    backend: Optional[str] = None
    activation: Optional[str] = None
    negative_slope: float = 0.01

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, activation: Optional[str] = None,
                 negative_slope: float = 0.01):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        from .ops.conv2d import ACTIVATIONS
        if activation not in ACTIVATIONS:
            raise ValueError(f"dlh.nn.Conv2d: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            from .ops.conv2d import activation_reference
            return activation_reference(super().forward(input), self.activation, self.negative_slope)
        return DF.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups, activation=self.activation, negative_slope=self.negative_slope,
                         backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra


__all__ = ["LayerNorm", "RMSNorm", "GroupNorm", "GELU", "LinearGELU", "Linear", "Conv2d", "MultiheadAttention"]


def _handed_over(module: torch.nn.Module, input: torch.Tensor) -> bool:
    """True (once) when `input` is the output of the norm or linear that fused this activation
    into its own kernel (`dlh.patch` inside a block's forward: diffusers' ResnetBlock2D, BERT's
    pooler; see dlh_kernels.patch): the work is done, the activation must pass it through."""
    pending = module.__dict__.get("_dlh_pending")
    if pending is None or pending() is not input:
        return False
    module.__dict__["_dlh_pending"] = None
    if profiling.observer is not None:
        with profiling.observer("fused"):
            pass
    return True


class SiLU(torch.nn.SiLU):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _handed_over(self, input):
            return input
        out = DF.silu(input, backend=self.backend)
        return input.copy_(out) if self.inplace else out


class ReLU(torch.nn.ReLU):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _handed_over(self, input):
            return input
        out = DF.relu(input, backend=self.backend)
        return input.copy_(out) if self.inplace else out


class LeakyReLU(torch.nn.LeakyReLU):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _handed_over(self, input):
            return input
        out = DF.leaky_relu(input, self.negative_slope, backend=self.backend)
        return input.copy_(out) if self.inplace else out


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """`torch.nn.TransformerEncoderLayer` that always takes the module path (never torch's fused
    fast path, which in eval under no_grad would run none of the swapped norms or attention),
    with linear1 + activation as one `DF.linear` (ReLU or GELU in the matmul's epilogue).
    Same parameters, same state_dict; `dlh.patch` swaps its attention and norms as usual."""
    backend: Optional[str] = None
    _dlh_counts_ops = True  # `dlh.coverage`: its DF.linear is the feed-forward's activation

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None,
                                     other_name="", target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        act = _activation_name(self.activation)
        if act is None:
            return super()._ff_block(x)
        h = DF.linear(x, self.linear1.weight, self.linear1.bias, activation=act, backend=self.backend)
        return self.dropout2(self.linear2(self.dropout(h)))


def _activation_name(activation) -> Optional[str]:
    if activation is F.relu or type(activation) is torch.nn.ReLU:
        return "relu"
    if activation is F.gelu or (type(activation) is torch.nn.GELU and activation.approximate == "none"):
        return "gelu"
    if type(activation) is torch.nn.GELU:
        return "gelu_tanh"
    return None
