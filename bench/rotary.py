"""Rotary position embedding of q and k against its peers, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.rotary_embedding(q, k, cos, sin, backend="triton")
  dlh-cuda       the same with backend="cuda"
  eager          transformers' apply_rotary_pos_emb math (x * cos + rotate_half(x) * sin, then the
                 pass-through cat for partial rotary): 6+ launches and their temporaries
  torch.compile  the eager function, compiled with dynamic=False
  liger          Liger-Kernel's LigerRopeFunction (rotate-half, full rotary only)
  copy           device copies moving the same bytes in as many launches: the per-shape ceiling

The op is memory-bound: every row reports GB/s from the bytes below and % of the copy ceiling.
Bytes (s = element size of q/k, t = of cos/sin): the forward reads q and k and writes q_out and
k_out, 2 * (Hq + Hk) * B * S * D * s, plus the tables 2 * S * R * t (shared by the batch here);
the backward moves the same again (dq_out, dk_out in; dq, dk out; the tables once more).
Cases: LLaMA-2-7B (32 heads of 128, full rotary), LLaMA-3-8B's GQA 32:8, Phi-2's partial
rotary (32 of 80), GPT-J's interleaved pairs (16 heads of 256, rotary_dim 64), at 4 x 2048 and
16 x 1024 tokens (prefill), and one decode step (batch 64, seq 1: launch-bound).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from . import common
from .common import max_rel_err

PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "liger", "copy")
MODES = ("fwd", "fwd+bwd")


class Config(NamedTuple):
    Hq: int
    Hk: int
    D: int
    R: int
    interleaved: bool


# op -> the attention layer it is
OPS = {
    "llama2_7b": Config(32, 32, 128, 128, False),
    "llama3_8b_gqa": Config(32, 8, 128, 128, False),
    "phi2_partial": Config(32, 32, 80, 32, False),
    "gptj_interleaved": Config(16, 16, 256, 64, True),
}
# (case, M, N): M = B * S tokens (B, S below), N = the width of q (Hq * D), for the tables
BATCH_SEQ = {"prefill-4x2048": (4, 2048), "prefill-16x1024": (16, 1024), "decode-64x1": (64, 1)}
QUICK = ("prefill-4x2048", "decode-64x1")
DEVICE = "cuda"


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    # N is filled per op in bench_shape (it depends on the config): 0 here
    return [(case, B * S, 0) for case, (B, S) in BATCH_SEQ.items() if not quick or case in QUICK]


def bytes_moved(cfg: Config, mode: str, B: int, S: int, elem: int, table_elem: int = 4) -> int:
    """The fewest bytes the op must move: q, k in, q_out, k_out out, the (1, S, R) tables once."""
    one = 2 * (cfg.Hq + cfg.Hk) * B * S * cfg.D * elem + 2 * S * cfg.R * table_elem
    return one if mode == "fwd" else 2 * one


def eager(cfg: Config) -> Callable:
    from dlh_kernels.ops.rotary import rotary_reference

    def hf(q, k, cos, sin):
        return rotary_reference(q, cos, sin, cfg.interleaved), rotary_reference(k, cos, sin, cfg.interleaved)
    return hf


def _dlh(backend: str, cfg: Config):
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, "rotary_embedding"):
        return "dlh_kernels.functional has no rotary_embedding yet"
    return lambda q, k, cos, sin: DF.rotary_embedding(q, k, cos, sin, interleaved=cfg.interleaved, backend=backend)


def _liger(cfg: Config):
    if cfg.interleaved or cfg.R != cfg.D:
        return "Liger-Kernel's rope is rotate-half with full rotary only"
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as exc:  # ImportError, or a Liger that breaks on this torch/triton
        return common.not_importable("liger_kernel", exc)
    # Liger takes cos/sin in q's dtype (it does not round fp32 tables itself): cast outside the
    # timed region by make_inputs
    return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)


def providers(op: str) -> dict:
    cfg = OPS[op]
    return {
        "dlh-triton": _dlh("triton", cfg),
        "dlh-cuda": _dlh("cuda", cfg),
        "eager": eager(cfg),
        "torch.compile": common.SMOKE_SKIP if common.SMOKE else common.compiled(eager(cfg)),
        "liger": _liger(cfg),
    }


def make_inputs(cfg: Config, B: int, S: int, dtype: torch.dtype):
    """Rotating input sets (q, k, dq_out, dk_out) and the shared fp32 tables (1, S, R), LLaMA's."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg.R, 2, device=DEVICE, dtype=torch.float32) / cfg.R)
    freqs = torch.arange(S, device=DEVICE, dtype=torch.float32)[:, None] * inv_freq
    emb = (freqs.repeat_interleave(2, -1) if cfg.interleaved else torch.cat([freqs, freqs], -1))[None]
    cos, sin = emb.cos(), emb.sin()
    set_bytes = bytes_moved(cfg, "fwd+bwd", B, S, torch.finfo(dtype).bits // 8)
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        q, k = (torch.randn(B, h, S, cfg.D, device=DEVICE, dtype=dtype) for h in (cfg.Hq, cfg.Hk))
        sets.append((q, k, torch.randn_like(q), torch.randn_like(k)))
    return cos, sin, sets


def timed_call(fn: Callable, mode: str, cos, sin) -> Callable:
    if mode == "fwd":
        return lambda q, k, dq, dk: fn(q, k, cos, sin)

    def fwd_bwd(q, k, dq, dk):
        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
        qo, ko = fn(qg, kg, cos, sin)
        return torch.autograd.grad((qo, ko), (qg, kg), (dq, dk))
    return fwd_bwd


def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        ops: tuple[str, ...] = tuple(OPS)) -> int:
    return common.run_ops(Sweep, ops, providers, shapes, summary, quick=quick, dtype=dtype, out=out)


class Sweep(common.CopySweep):
    name = "rotary"

    def bench_shape(self, op: str, case: str, M: int, N: int, provs: dict) -> None:
        cfg = OPS[op]
        B, S = BATCH_SEQ[case]
        N = cfg.Hq * cfg.D
        what = f"{op} {case}"
        if why := common.memory_shortfall(6 * bytes_moved(cfg, "fwd", B, S, self.elem)):
            return self.skip(what, why)
        try:
            cos, sin, sets = make_inputs(cfg, B, S, self.torch_dtype)
            ref = eager(cfg)(*sets[0][:2], cos, sin)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        for name, fn in common.runnable(provs):
            c, s = (cos.to(self.torch_dtype), sin.to(self.torch_dtype)) if name == "liger" else (cos, sin)
            try:
                got = fn(*sets[0][:2], c, s)
                err = max(max_rel_err(got[0], ref[0]), max_rel_err(got[1], ref[1]))
            except Exception as exc:
                self.skip(f"{name} {what}", common.short_error(exc))
                continue
            if not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                try:
                    times = self.time_sets(timed_call(fn, mode, c, s), sets)
                except Exception as exc:
                    self.skip(f"{name} {mode} {what}", common.short_error(exc))
                    continue
                self.add_row(op, name, case, M, N, mode, times, err, len(sets), cfg, B, S)
        del sets, ref
        torch.cuda.empty_cache()
        for mode in MODES:
            # one launch per direction, as the fewest-launch implementation does
            nbytes = bytes_moved(cfg, "fwd", B, S, self.elem)
            try:
                call, buffers = common.copy_launches([nbytes] * (1 if mode == "fwd" else 2), DEVICE)
                call()
                times = self.time(call)
                n_sets = len(buffers) - 1
                del call, buffers
            except Exception as exc:
                self.skip(f"copy {mode} {what}", common.short_error(exc))
                continue
            finally:
                torch.cuda.empty_cache()
            self.add_row(op, "copy", case, M, N, mode, times, None, n_sets, cfg, B, S)

    def add_row(self, op, name, case, M, N, mode, times, err, n_sets, cfg, B, S) -> None:
        row = {"op": op, "provider": name, "case": case, "M": M, "N": N, "B": B, "S": S, **cfg._asdict(),
               "dtype": self.dtype, "mode": mode, **self.rate(times, bytes_moved(cfg, mode, B, S, self.elem)),
               "fwd_err_vs_eager": err, "input_sets": n_sets}
        self.rows.append(row)
        print(f"{op:>16} {mode:>7} {case:>16} {name:>13}  p50 {row['p50_ms']:8.4f} ms"
              f"  {row['gbps']:7.0f} GB/s  {row['pct_copy']:5.1f}%", flush=True)

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            self.rows, out / "rotary.png", panel=lambda r: f"{r['op']} {r['mode']}", series="provider",
            x="M", y="gbps", xlabel="tokens (B * S)", ylabel="GB/s",
            hline=self.copy_gbps, hline_label="copy ceiling (1 GiB)", title=self.title(meta))


def summary(rows: list[dict], copy_gbps: float) -> str:
    return common.gbps_summary(rows, copy_gbps, OPS, MODES, PROVIDERS)


if __name__ == "__main__":  # python -m dlh_kernels.bench.rotary [--quick]
    import sys
    raise SystemExit(run(quick="--quick" in sys.argv))
