"""The functional API: ``import dlh_kernels.functional as DF``.

Signatures follow ``torch.nn.functional``; every function also takes a keyword-only
``backend=`` ("auto", "triton", "cuda", "torch"; None: the current default).
"""
from .ops.activation import gated_gelu, leaky_relu, relu, silu, swiglu
from .ops.attention import scaled_dot_product_attention
from .ops.conv2d import conv2d
from .ops.diffusion_step import diffusion_step
from .ops.gelu import geglu, gelu, linear_gelu
from .ops.group_norm import group_norm
from .ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .ops.linear import linear
from .ops.rotary import rotary_embedding

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "geglu", "linear_gelu",
           "scaled_dot_product_attention", "group_norm", "diffusion_step", "conv2d", "linear",
           "silu", "relu", "leaky_relu", "swiglu", "gated_gelu",
           "rotary_embedding"]
