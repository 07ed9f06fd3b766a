"""One reverse diffusion step (DDPM, DDIM, linear interpolation) in Triton, and its noise stream.

Math, per element, all arithmetic in fp32 (the table differences in the table's own dtype), with
a_t = alphas_cumprod[t], a_p = alphas_cumprod[prev] (a_p = 1 when prev < 0, the final step):

    guidance (optional)  m = u + w * (c - u)        c = model_output, u = uncond_output
    predicted x0         epsilon:       x0 = (x - sqrt(1 - a_t) m) / sqrt(a_t)
                         v_prediction:  x0 = sqrt(a_t) x - sqrt(1 - a_t) m
                         sample:        x0 = m
    clipping (optional)  x0 = clamp(x0, -clip, clip)
    DDPM, fixed_small    beta = 1 - a_t / a_p,  var = (1 - a_p) / (1 - a_t) * beta   (>= 1e-20)
                         x_prev = sqrt(a_p) beta / (1 - a_t) * x0
                                + sqrt(a_t / a_p) (1 - a_p) / (1 - a_t) * x
                                + [t > 0] sqrt(var) * z
    DDIM                 eps_hat from the *unclipped* x0 (as diffusers does):
                           epsilon: m;  v_prediction: sqrt(a_t) m + sqrt(1 - a_t) x;
                           sample:  (x - sqrt(a_t) m) / sqrt(1 - a_t)
                         sigma = eta * sqrt(var),  dir = sqrt(1 - a_p - sigma^2)
                         x_prev = sqrt(a_p) x0 + dir * eps_hat + sigma * z     (z only if eta > 0)
    interp (internal: the sampler's linear-interpolation scheme; the table holds s_k = t_k,
            x = (1 - s) x0 + s * noise; s_p = 0 when prev < 0)
                         epsilon: x0 = (x - s m) / (1 - s);  v_prediction (v = noise - x0):
                         x0 = x - s m;  sample: x0 = m
                         x_prev = (s_p / s_t) x + (1 - s_p / s_t) x0

Every case is one form, x_prev = P * x0 + Q * x + R * m + S * z with x0 = CX * x + CM * m
(clamped), and the coefficients depend on the timesteps only. They are computed in a form that
keeps their digits: 1 - a and a_p - a_t are exact in the table's dtype (Sterbenz), beta is
(a_p - a_t) / a_p rather than 1 - a_t / a_p (which loses ~4 digits of a beta of 1e-4 in fp32),
and 1 - a_p - sigma^2 = (1 - a_p) * ((1 - eta^2) + eta^2 a_t (1 - a_p) / (a_p (1 - a_t))), a
sum of non-negative terms for eta <= 1 (clamped at 0 beyond).

Noise z, when not given: Philox4x32-10 keyed by the 64-bit seed, counter (i_lo, i_hi, 0, 0) for
the element's logical (row-major) index i, Box-Muller of the first two words: exactly
`tl.randn(seed, i)`. The torch reference and the CUDA kernel implement the same stream, so the
three backends draw the same noise up to the rounding of log/cos/sqrt (not bitwise).

Timesteps: an int (a kernel argument) or an integer tensor on the device read in the kernel,
one value or one per batch element (b = i // per_batch). No host sync anywhere, so a sampling
loop can be captured in a CUDA graph. A timestep outside the table writes NaN (the host cannot
check a device value without a sync; NaN is visible, a clamp would be silently wrong).

Bytes per element (s = element size): read x and m (+ u with guidance, + z when given), write
x_prev: 3s to 5s. A step of a 4 x 4 x 64 x 64 latent moves ~200 KB: microseconds of DRAM time,
so the step is bound by its launch; the goal is one launch and no host work beyond it.

Layout: any strides. The launch helper collapses the shape to at most 4 dims (D0..D3) with a
stride per tensor and dim; the kernel decomposes the logical index. When every tensor is
contiguous (CONTIG) the offset is the index itself. Offsets are 64-bit.

Versions:
- v1 (this one): one program per BLOCK logical elements, coefficients per element from gathered
  table entries (timesteps scalar or per batch), strided or contiguous addressing, in-kernel
  Philox noise. Checked under the Triton interpreter on CPU against float64 and diffusers, and
  compiled for sm_80/sm_90; not yet run or timed on a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlh_kernels.triton_kernels.common import cdiv, launch

# method and prediction codes, shared with csrc/diffusion_step.cu and the op module
DDPM, DDIM, INTERP = 0, 1, 2
EPSILON, V_PREDICTION, SAMPLE = 0, 1, 2
# noise: none, given as a tensor, drawn in the kernel
NOISE_NONE, NOISE_GIVEN, NOISE_DRAWN = 0, 1, 2

# 4 warps x 8 elements each x 4: enough independent loads in flight for a step this small
BLOCK = 1024
MIN_VARIANCE = tl.constexpr(1e-20)  # diffusers' clamp of the fixed_small variance


@triton.jit
def step_coefficients(t, a_t, a_p, eta, METHOD: tl.constexpr, PRED: tl.constexpr):
    """(CX, CM, P, Q, R, S) of x_prev = P x0 + Q x + R m + S z, x0 = CX x + CM m; scalars or
    blocks (per-element timesteps). a_t, a_p in the table's dtype; t the current timestep."""
    if METHOD == 2:
        # interp: a_t, a_p are the interpolation times s_t, s_p
        s_t = a_t.to(tl.float32)
        q = a_p.to(tl.float32) / s_t
        p = 1.0 - q
        r_m = q * 0.0
        s = q * 0.0
        if PRED == 0:
            cx = 1.0 / (1.0 - s_t)
            cm = -s_t * cx
        elif PRED == 1:
            cx = s_t * 0.0 + 1.0
            cm = -s_t
        else:
            cx = s_t * 0.0
            cm = cx + 1.0
    else:
        d_t = (1.0 - a_t).to(tl.float32)  # exact in the table's dtype for a >= 1/2
        d_p = (1.0 - a_p).to(tl.float32)
        diff = (a_p - a_t).to(tl.float32)
        at = a_t.to(tl.float32)
        ap = a_p.to(tl.float32)
        sa = tl.sqrt(at)
        sb = tl.sqrt(d_t)
        if PRED == 0:
            cx = 1.0 / sa
            cm = -sb * cx
        elif PRED == 1:
            cx = sa
            cm = -sb
        else:
            cx = sa * 0.0
            cm = cx + 1.0
        beta = diff / ap  # 1 - a_t / a_p, without the cancellation
        var = d_p / d_t * beta
        if METHOD == 0:
            p = tl.sqrt(ap) * beta / d_t
            q = tl.sqrt(at / ap) * d_p / d_t
            r_m = p * 0.0
            s = tl.where(t > 0, tl.sqrt(tl.maximum(var, MIN_VARIANCE)), 0.0)
        else:
            s = eta * tl.sqrt(var)
            e2 = eta * eta
            keep = (1.0 - e2) + e2 * (at * d_p) / (ap * d_t)
            direction = tl.sqrt(tl.maximum(d_p * keep, 0.0))
            p = tl.sqrt(ap)
            if PRED == 0:
                q = direction * 0.0
                r_m = direction
            elif PRED == 1:
                q = direction * sb
                r_m = direction * sa
            else:
                q = direction / sb
                r_m = -q * sa
    return cx, cm, p, q, r_m, s


@triton.jit
def _strided(i0, i1, i2, i3, s0, s1, s2, s3):
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit(do_not_specialize=["t_int", "pt_int", "seed_int"])
def diffusion_step_kernel(
    X,  # pointer to the sample x_t, (D0, D1, D2, D3) with strides sx*
    MO,  # pointer to the model output (the conditional one with guidance), strides sm*
    UC,  # pointer to the unconditional model output, strides su*, or None
    NZ,  # pointer to the given noise, strides sn*, or None
    OUT,  # pointer to x_prev, strides so*
    AC,  # pointer to the table, (n_table,): alphas_cumprod (interp: the times s_k), fp32 or fp64
    T,  # pointer to the timestep(s), integer, 1 or D0 values, or None (then t_int)
    PT,  # pointer to the previous timestep(s), or None (then pt_int)
    SEED,  # pointer to the seed, one int64, or None (then seed_int)
    t_int, pt_int, seed_int,
    t_stride, pt_stride,  # 0: one timestep for the batch; else one per batch element, this apart
    n_elements, per_batch, n_table,
    D1, D2, D3,
    sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3, su0, su1, su2, su3,
    sn0, sn1, sn2, sn3, so0, so1, so2, so3,
    eta, clip_range, guidance_scale,
    METHOD: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr, GUIDANCE: tl.constexpr,
    NOISE: tl.constexpr, T_TENSOR: tl.constexpr, PT_TENSOR: tl.constexpr,
    SEED_TENSOR: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # logical, row-major
    mask = i < n_elements
    if CONTIG:
        off_x = i
        off_m = i
        off_u = i
        off_n = i
        off_o = i
    else:
        i3 = i % D3
        r = i // D3
        i2 = r % D2
        r = r // D2
        i1 = r % D1
        i0 = r // D1
        off_x = _strided(i0, i1, i2, i3, sx0, sx1, sx2, sx3)
        off_m = _strided(i0, i1, i2, i3, sm0, sm1, sm2, sm3)
        off_u = _strided(i0, i1, i2, i3, su0, su1, su2, su3)
        off_n = _strided(i0, i1, i2, i3, sn0, sn1, sn2, sn3)
        off_o = _strided(i0, i1, i2, i3, so0, so1, so2, so3)

    # Timesteps: scalars, or gathered per element from the batch element's entry.
    b = i // per_batch
    if T_TENSOR:
        t = tl.load(T + b * t_stride, mask=mask, other=0).to(tl.int64)
    else:
        t = t_int
    if PT_TENSOR:
        pt = tl.load(PT + b * pt_stride, mask=mask, other=0).to(tl.int64)
    else:
        pt = pt_int
    valid = (t >= 0) & (t < n_table) & (pt < n_table)
    a_t = tl.load(AC + tl.minimum(tl.maximum(t, 0), n_table - 1))
    a_prev = tl.load(AC + tl.minimum(tl.maximum(pt, 0), n_table - 1))
    # the value "before x_0": alpha_cumprod = 1 (interp: s = 0)
    if METHOD == 2:
        a_p = tl.where(pt < 0, 0.0, a_prev).to(a_prev.dtype)
    else:
        a_p = tl.where(pt < 0, 1.0, a_prev).to(a_prev.dtype)
    cx, cm, p, q, r_m, s = step_coefficients(t, a_t, a_p, eta, METHOD, PRED)

    x = tl.load(X + off_x, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(MO + off_m, mask=mask, other=0.0).to(tl.float32)
    if GUIDANCE:
        u = tl.load(UC + off_u, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (m - u)
    x0 = cx * x + cm * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    out = p * x0 + q * x + r_m * m
    if NOISE == 1:
        z = tl.load(NZ + off_n, mask=mask, other=0.0).to(tl.float32)
        out += tl.where(s != 0.0, s * z, 0.0)
    elif NOISE == 2:
        if SEED_TENSOR:
            seed = tl.load(SEED)
        else:
            seed = seed_int
        z = tl.randn(seed, i)
        out += tl.where(s != 0.0, s * z, 0.0)
    out = tl.where(valid, out, float("nan"))
    tl.store(OUT + off_o, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_int"])
def seeded_randn_kernel(
    OUT,  # pointer to the output, (n_elements,) contiguous
    SEED,  # pointer to the seed, one int64, or None (then seed_int)
    seed_int, n_elements,
    SEED_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """The step's noise stream on its own: out[i] = tl.randn(seed, i)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if SEED_TENSOR:
        seed = tl.load(SEED)
    else:
        seed = seed_int
    z = tl.randn(seed, i)
    tl.store(OUT + i, z.to(OUT.dtype.element_ty), mask=i < n_elements)


# ---------------------------------------------------------------------------------------------
# Launch helpers. `layout` is (D0, D1, D2, D3) and one 4-tuple of strides per tensor (x, m, u,
# z, out; zeros for an absent one), from the op module's collapse.

def diffusion_step(x, m, u, z, out, table, t, pt, seed, layout, per_batch, *, method: int,
                   pred: int, eta: float, clip, guidance):
    """t, pt: an int (passed as a kernel argument) or an integer tensor (a pointer read in the
    kernel, with its own stride; stride 0 for one value); seed: None, an int or an int64 tensor.
    z given: the noise read; else seed given: drawn in the kernel; else none."""
    n = out.numel()
    dims, strides, contig = layout

    def split(v):
        if v is None:
            return None, 0, 0
        if isinstance(v, int):
            return None, v, 0
        return v, 0, (v.stride(0) if v.numel() > 1 else 0)  # any view: its own stride

    T, t_int, t_stride = split(t)
    PT, pt_int, pt_stride = split(pt)
    if z is not None:
        noise = NOISE_GIVEN
    elif seed is not None:
        noise = NOISE_DRAWN
    else:
        noise = NOISE_NONE
    SEED, seed_int, _ = split(seed)
    flat = [s for tensor_strides in strides for s in tensor_strides]
    grid = (cdiv(n, BLOCK),)
    launch(diffusion_step_kernel, grid, (
        x, m, u, z, out, table, T, PT, SEED,
        t_int, pt_int, seed_int, t_stride, pt_stride,
        n, per_batch, table.numel(),
        dims[1], dims[2], dims[3], *flat,
        float(eta), float(clip or 0.0), float(guidance or 0.0)),
        dict(METHOD=method, PRED=pred, CLIP=clip is not None, GUIDANCE=guidance is not None,
             NOISE=noise, T_TENSOR=T is not None, PT_TENSOR=PT is not None,
             SEED_TENSOR=SEED is not None, CONTIG=contig, BLOCK=BLOCK, num_warps=4))
    return out


def seeded_randn(out, seed):
    """out (contiguous) filled with the step's noise stream for `seed` (int or int64 tensor)."""
    n = out.numel()
    tensor = not isinstance(seed, int)
    launch(seeded_randn_kernel, (cdiv(n, BLOCK),), (out, seed if tensor else None, 0 if tensor else seed, n),
           dict(SEED_TENSOR=tensor, BLOCK=BLOCK, num_warps=4))
    return out
