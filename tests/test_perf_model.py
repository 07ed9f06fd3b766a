"""The performance model (bench/perf_model.py): hand-counted bytes and FLOPs, the time model, the
occupancy arithmetic, the measured / predicted comparison, and the committed table."""
import json
from pathlib import Path

import pytest

from dlh_kernels.bench import perf_model as pm

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _total(launches):
    return sum(x.bytes for x in launches), sum(x.flops for x in launches)


def test_layer_norm_bf16_4096x4096_forward_bytes_by_hand():
    # read x (4096 x 4096 bf16) + w, b (4096 bf16 each); write y (bf16) + mean, rstd (4096 fp32 each)
    M = N = 4096
    expected = M * N * 2 + 2 * N * 2 + M * N * 2 + 2 * M * 4
    assert expected == 67_158_016
    launches = pm.norm_launches("layer_norm", M, N)["fwd"]
    assert len(launches) == 1  # N <= 8192: the fused path
    nbytes, flops = _total(launches)
    assert nbytes == expected
    assert flops == pm.FLOPS_PER_ELEM["ln_fwd"] * M * N
    # the benchmark's own count agrees
    from dlh_kernels.bench import layer_norm
    assert layer_norm.bytes_moved("layer_norm", "fwd", M, N, 2) == expected


def test_rms_norm_split_path_counts_the_second_read():
    # N = 65536 > MAX_FUSED_N: pass 1 reads x, pass 2 reads it again (128 MiB: past half the L2)
    M, N = 1024, 65536
    fwd = pm.norm_launches("rms_norm", M, N)["fwd"]
    assert [x.name for x in fwd] == ["norm_fwd_partial", "norm_fwd_apply"]
    act = M * N * 2
    assert sum(x.bytes for x in fwd) >= 3 * act  # 2 reads + 1 write of x-sized tensors


def test_attention_counts_by_hand():
    B, H, L, D = 2, 3, 1024, 64
    fwd = 4 * B * H * L * L * D
    launches = pm.attention_launches(B, H, L, D, causal=False)
    nbytes, flops = _total(launches["fwd"])
    assert flops == fwd
    assert nbytes == 4 * B * H * L * D * 2 + B * H * L * 4  # Q, K, V in, O out, fp32 lse out
    assert len(launches["bwd"]) == 3  # preprocess, dK/dV, dQ
    # 14 B H L S D on the tensor cores (P recomputed in both kernels), + the preprocess's dot(O, dO)
    assert sum(x.flops for x in launches["bwd"] if x.rate == "bf16") == 3.5 * fwd
    assert _total(launches["bwd"])[1] == 3.5 * fwd + 2 * B * H * L * D
    causal = pm.attention_launches(B, H, L, D, causal=True)
    assert _total(causal["fwd"])[1] == fwd / 2
    rows = {(r.case, r.mode): r for r in pm.attention_rows()}
    r = rows[("gpt-seed", "bwd")]
    assert r.useful_flops == 2.5 * 4 * 64 * 6 * 256 * 256 * 64 / 2  # the benchmark's count


def test_linear_gelu_counts_by_hand():
    M = K = N = 1024
    launches = pm.matmul_epilogue_launches("linear_gelu_kernel", M, K, N, ({},), ({},))
    nbytes, flops = _total(launches["fwd"])
    assert flops == 2 * M * N * K
    assert nbytes == (M * K + N * K + M * N) * 2 + N * 2
    # fwd + bwd: the forward, the GRAD recompute, dx and dW: four matmuls of 2 M N K
    assert sum(x.flops for x in launches["fwd+bwd"] if x.rate == "bf16") == 4 * 2 * M * N * K


def test_time_model():
    one = pm.Launch("copy", bytes=pm.COPY_GBPS * 1e9 * 1e-3)  # 1 ms of bandwidth
    assert pm.predict_us([one]) == pytest.approx(1000 + pm.LAUNCH_US)
    mm = pm.Launch("mm", bytes=0, flops=pm.BF16_TFLOPS * 1e12 * 1e-3, rate="bf16")
    assert pm.predict_us([mm, one]) == pytest.approx(2000 + 2 * pm.LAUNCH_US)
    assert pm.bound([mm]) == "compute" and pm.bound([one]) == "memory"
    assert pm.bound([pm.Launch("tiny", bytes=1000)]) == "launch"


def test_predicted_time_grows_with_size():
    ln = [pm.predict_us(pm.norm_launches("layer_norm", m, 4096)["fwd+bwd"]) for m in (256, 1024, 4096, 16384)]
    assert ln == sorted(ln) and ln[0] < ln[-1]
    att = [pm.predict_us(pm.attention_launches(4, 16, L, 128, False)["fwd"]) for L in (256, 1024, 4096)]
    assert att == sorted(att) and att[0] < att[-1]
    act = [pm.predict_us(pm.activation_launches("silu", m, 4096)["fwd"]) for m in (1, 64, 4096, 65536)]
    assert act == sorted(act)


def test_ctas_per_sm():
    assert pm.ctas_per_sm(regs=128, num_warps=4, shared=0) == 4          # 64K / (128 x 128 threads)
    assert pm.ctas_per_sm(regs=255, num_warps=4, shared=160 * 1024) == 1  # shared memory bound
    assert pm.ctas_per_sm(regs=32, num_warps=1, shared=0) == 32          # the 32-CTA limit


def test_every_row_has_a_prediction_and_its_kernels():
    rows, meta = pm.build({"date_utc": "-", "git_sha": "-"})
    assert {r["family"] for r in rows} >= {"layer_norm", "gelu", "activation", "linear_gelu", "workloads",
                                          "conv2d", "attention", "group_norm", "rotary", "diffusion_step"}
    for r in rows:
        assert r["predicted_us"] >= pm.LAUNCH_US * r["launches"]
        triton = [k for k in r["kernels"] if k]
        assert triton and all(k["found"] for k in triton), (r["op"], r["case"], r["mode"])


def test_compare_on_a_synthetic_results_file(tmp_path, capsys):
    rows, _ = pm.build({"date_utc": "-", "git_sha": "-"})
    ln = next(r for r in rows if r["family"] == "layer_norm" and r["mode"] == "fwd")
    att = next(r for r in rows if r["family"] == "attention" and r["mode"] == "bwd")
    meta = {"device": "NVIDIA H200"}
    (tmp_path / "layer_norm.json").write_text(json.dumps({"meta": meta, "rows": [
        {**ln["key"], "provider": "dlh-triton", "dtype": "bf16", "p50_ms": 2 * ln["predicted_us"] / 1e3},
        {**ln["key"], "provider": "eager", "dtype": "bf16", "p50_ms": 3 * ln["predicted_us"] / 1e3},
        {**ln["key"], "provider": "dlh-triton", "dtype": "fp16", "p50_ms": 1.0},       # another dtype
        {**ln["key"], "M": 7, "provider": "dlh-triton", "dtype": "bf16", "p50_ms": 1.0},  # no such shape
    ]}))
    (tmp_path / "attention.json").write_text(json.dumps({"meta": meta, "rows": [
        {**att["key"], "provider": "dlh-triton", "dtype": "bf16", "p50_ms": att["predicted_us"] / 1e3}]}))
    (tmp_path / "versions.txt").write_text("not json")
    got = pm.compare(tmp_path, rows)
    assert [(g["family"], g["provider"]) for g in got] == [
        ("attention", "dlh-triton"), ("layer_norm", "dlh-triton"), ("layer_norm", "eager")]
    assert [round(g["ratio"], 6) for g in got] == [1.0, 2.0, 3.0]
    out = capsys.readouterr().out
    assert "measured us" in out and "<-- off" in out
    one = pm.compare(tmp_path / "attention.json", rows)
    assert len(one) == 1


def test_committed_table_regenerates_identically():
    committed = json.loads((RESULTS / "perf_model.json").read_text())
    meta = {k: committed["meta"][k] for k in ("date_utc", "git_sha")}
    rows, full_meta = pm.build(meta)
    assert rows == committed["rows"], "bench/results/perf_model.json is stale: rerun " + pm.COMMAND
    md = (RESULTS / "perf_model.md").read_text()
    assert md == pm.render_markdown(rows, full_meta) + "\n", "perf_model.md is stale: rerun " + pm.COMMAND
    for title in pm.TITLES.values():
        assert f"## {title}" in md
