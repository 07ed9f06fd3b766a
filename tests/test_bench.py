"""The benchmark machinery without a GPU: the GPU session script (syntax and dry-run plan),
`dlh bench`'s arguments, the model benchmark on stub models (and the real ones when they are
there), the cold-start runner through the interpreter, the roofline summary and the README
report on synthetic results, and the persistent caches (autotuning choices, `auto` orders)."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dlh_kernels import _backend, _cache
from dlh_kernels.bench import coldstart, models as bench_models, report, summary
import dlh_kernels.bench as bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"


# ---------------------------------------------------------------------------------------------
# bench/gpu_session.sh

def test_gpu_session_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _dry_run(tmp_path, *phases, budget=None):
    env = dict(os.environ, DLH_DRY_RUN="1")
    if budget:
        env["DLH_SESSION_BUDGET"] = str(budget)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), *phases, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    caps = {m.group(1).strip(): int(m.group(2)) for m in
            re.finditer(r"^(\S.*?)\s+dry run, cap\s+(\d+)s$", next(tmp_path.glob("*-summary.txt")).read_text(), re.M)}
    return proc.stdout, caps


CHECK_GROUPS = ["diffusion_step", "gelu", "activation", "rotary", "layer_norm", "group_norm", "memcheck",
                "racecheck", "synccheck", "linear", "conv2d", "cuda_ext", "attention"]


@pytest.mark.parametrize("phase, budget, steps", [
    # the first command: at most 8 minutes, inside the device tool's 10 (start-up and transfers)
    ("first", 480, ["versions", "install", "dlh info", "checks", "bench smoke"]),
    # the optional second: at most 4 minutes
    ("second", 240, ["install", "bench quick", "bench overhead", "bench models", "bench summary", "perf model",
                 "report"]),
])
def test_gpu_session_dry_run_fits_its_cap(tmp_path, phase, budget, steps):
    out, caps = _dry_run(tmp_path, phase)
    assert [s for s in steps if s not in caps] == []
    # the worst case (every step to its cap) stays inside the phase's budget
    assert sum(caps.values()) <= budget, caps
    # a dry run runs nothing and archives nothing
    assert not list(tmp_path.glob("*.tar.gz"))
    assert (tmp_path / f"{phase}.log").is_file()
    if phase == "first":
        # every op family's tests and each sanitizer tool, each capped by the checks step
        for group in CHECK_GROUPS:
            m = re.search(rf"^{group}\s+dry run, cap\s+(\d+)s: (.*)$", out, re.M)
            assert m and int(m.group(1)) <= caps["checks"], group
        assert "--tool memcheck" in out and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
        assert "--smoke" in out
        # fastest first: the quick op families start before attention
        assert out.index("diffusion_step  ") < out.index("conv2d  ") < out.index("attention  ")
    else:
        assert "--quick" in out and "--save-auto" in out and "--budget-s" in out


def test_gpu_session_all_phases_in_order(tmp_path):
    out, caps = _dry_run(tmp_path, "all", budget=100000)
    order = [line[4:].split(" (cap")[0] for line in out.splitlines() if line.startswith("=== ")
             and "(cap" in line]
    assert order.index("checks") < order.index("bench smoke") < order.index("bench quick") < order.index("bench models")


def test_gpu_session_checks_run_every_group_and_flush_after_each(tmp_path):
    """The checks step for real, with each group's command stubbed: one group fails, one hangs
    past its cap; every other group still runs, each result is flushed as it lands, and the step
    says it failed."""
    stub = tmp_path / "stub.sh"
    stub.write_text('echo "group $1"\n'
                    '[[ $1 == gelu ]] && { echo "1 failed, 3 passed in 0.1s"; exit 1; }\n'
                    '[[ $1 == racecheck ]] && sleep 600\n'
                    'echo "4 passed in 0.1s"\n')
    flushes = tmp_path / "flushes"
    env = dict(os.environ, DLH_CHECK_STUB=str(stub), DLH_FLUSH=f"echo flushed >> {flushes}")
    env.pop("DLH_DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT), "__checks", str(tmp_path), "26"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    summary = (tmp_path / "checks" / "summary.txt").read_text()
    rcs = dict(re.findall(r"^(\S+)\s+rc=(\d+)", summary, re.M))
    assert set(CHECK_GROUPS) <= set(rcs), summary
    assert rcs.pop("gelu") == "1" and rcs.pop("racecheck") in ("124", "130")  # 124: hit its cap
    assert set(rcs.values()) == {"0"}, summary
    assert (tmp_path / "checks" / "attention.log").read_text().startswith("group attention")
    assert len(flushes.read_text().splitlines()) == len(re.findall("rc=", summary))


def test_sanitize_cases_run_on_cpu():
    """bench/sanitize.py's cases (the GPU session runs them under compute-sanitizer) through the
    torch backend and the Triton interpreter, so that the GPU window does not find a broken
    script. Attention's Triton case is the slowest under the interpreter: torch only there."""
    from dlh_kernels.bench import sanitize
    assert sanitize.run(["torch"], device="cpu") == 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        names = [n for n in sanitize.CASES if n != "attention"]
        assert sanitize.run(["triton"], names, device="cpu") == 0


# ---------------------------------------------------------------------------------------------
# dlh bench arguments

def test_bench_smoke_keeps_one_shape_and_no_torch_compile(monkeypatch):
    """`dlh bench --smoke` (the first GPU command's benchmark step): the first shape of each
    sweep, and torch.compile reported as skipped rather than compiled."""
    from dlh_kernels.bench import attention, common, gelu
    assert bench._parser().parse_args(["attention", "--smoke"]).smoke
    assert common.smoke([3, 2, 1]) == [3, 2, 1]
    monkeypatch.setattr(common, "SMOKE", True)
    assert common.smoke([3, 2, 1]) == [3]
    assert common.compiled(lambda x: x) == common.SMOKE_SKIP
    assert attention._compiled() == common.SMOKE_SKIP
    assert gelu.providers("gelu")["torch.compile"] == common.SMOKE_SKIP


def test_bench_which_lists():
    assert bench._which("layer_norm,gelu") == ("layer_norm", "gelu")
    assert bench._which("all") == bench.ALL
    assert set(bench.FAMILIES) <= set(bench.ALL) and "models" in bench.ALL and "summary" in bench.ALL
    with pytest.raises(Exception):
        bench._which("layer_norm,nope")


def test_bench_providers_include_dlh_cuda():
    from dlh_kernels.bench import conv2d, gelu, group_norm, layer_norm
    for mod in (layer_norm, gelu, group_norm, conv2d):
        assert "dlh-cuda" in mod.PROVIDERS and "dlh-triton" in mod.PROVIDERS
    src = (ROOT / "bench" / "diffusion.py").read_text()
    assert 'for backend in ("triton", "cuda")' in src


# ---------------------------------------------------------------------------------------------
# models: a stub registry with the dlh_kernels.models API

def _stub_registry():
    def build(name, *, small=False, **overrides):
        torch.manual_seed(0)
        if name == "mlp":
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                       torch.nn.Linear(16, 3))
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8),
                                   torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))

    def example_batch(name, batch_size, device="cpu", *, small=False, generator=None):
        if name == "mlp":
            return {"x": torch.randn(batch_size, 8, generator=generator).to(device),
                    "y": torch.randint(0, 3, (batch_size,), generator=generator).to(device)}
        return {"x": torch.randn(batch_size, 3, 6, 6, generator=generator).to(device)}

    def loss(name, model, batch):
        out = model(batch["x"]).float()
        if name == "mlp":
            return torch.nn.functional.cross_entropy(out, batch["y"])
        return (out - batch["x"].float()).pow(2).mean()

    def train_step(name, model, optimizer, batch):
        optimizer.zero_grad(set_to_none=True)
        value = loss(name, model, batch)
        value.backward()
        optimizer.step()
        return value.item()

    def sample(name, model, n, device="cpu", *, steps=None, generator=None):
        x = torch.randn(n, 3, 6, 6, generator=generator, device=device)
        for _ in range(steps or 2):
            x = x - 0.1 * model(x.to(next(model.parameters()).dtype)).float()
        return x

    return types.SimpleNamespace(NAMES=("mlp", "vae"), build=build, example_batch=example_batch,
                                 loss=loss, train_step=train_step, sample=sample)


def test_models_bench_on_stub_registry(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_models, "registry", _stub_registry)
    rc = bench_models.run(out=tmp_path, device="cpu", dtype="fp32", variants=("eager", "patched"),
                          iters=2, warmup=1, batch_size=4)
    assert rc == 0
    data = json.loads((tmp_path / "models_cpu.json").read_text())
    got = {(r["model"], r["phase"], r["variant"]) for r in data["rows"]}
    assert got == {("mlp", "train", "eager"), ("mlp", "train", "patched"),
                   ("vae", "train", "eager"), ("vae", "train", "patched"),
                   ("vae", "sample", "eager"), ("vae", "sample", "patched")}
    rows = {(r["model"], r["phase"], r["variant"]): r for r in data["rows"]}
    # same weights and batch: the first losses agree; eager is the speedups' reference
    assert rows["mlp", "train", "patched"]["first_loss"] == pytest.approx(
        rows["mlp", "train", "eager"]["first_loss"], rel=1e-4)
    assert rows["mlp", "train", "eager"]["speedup_vs_eager"] == 1.0
    assert rows["mlp", "train", "patched"]["patched_modules"] >= 1
    assert data["meta"]["device"] == "cpu" and "torch" in data["meta"]
    assert "speedup over eager" in capsys.readouterr().out


def test_models_bench_budget_and_failures(tmp_path, monkeypatch):
    reg = _stub_registry()
    broken = dict(vars(reg))
    broken["train_step"] = lambda *a: (_ for _ in ()).throw(RuntimeError("no"))
    monkeypatch.setattr(bench_models, "registry", lambda: types.SimpleNamespace(**broken))
    rc = bench_models.run(out=tmp_path, device="cpu", dtype="fp32", variants=("eager",),
                          names=("mlp",), iters=1, warmup=1, batch_size=2)
    assert rc == 1  # nothing ran: each failure is a skip with its reason
    monkeypatch.setattr(bench_models, "registry", _stub_registry)
    rc = bench_models.run(out=tmp_path, device="cpu", dtype="fp32", variants=("eager",),
                          iters=1, warmup=1, batch_size=2, budget_s=1e-9)
    assert rc == 1


def test_compiled_module_really_compiles():
    from dlh_kernels.bench import common
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    common.compiled_module(model)
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    model(torch.randn(2, 4))
    assert counters["stats"]["unique_graphs"] > before
    torch._dynamo.reset()


def test_models_bench_on_real_models(tmp_path):
    reg = bench_models.registry()
    if isinstance(reg, str):
        pytest.skip(reg)
    name = reg.NAMES[0]
    rc = bench_models.run(out=tmp_path, device="cpu", dtype="fp32", names=(name,), small=True,
                          variants=("eager", "patched"), iters=1, warmup=1, batch_size=2)
    assert rc == 0
    rows = json.loads((tmp_path / "models_cpu.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"eager", "patched"}


# ---------------------------------------------------------------------------------------------
# cold start: one tiny op in fresh processes, through the interpreter

def test_coldstart_one_tiny_op(tmp_path):
    rc = coldstart.run(ops=("gelu",), device="cpu", dtype="fp32", backends=["triton"], size="tiny",
                       grad=False, out=tmp_path, timeout=120)
    assert rc == 0
    (row,) = json.loads((tmp_path / "coldstart_cpu.json").read_text())["rows"]
    assert row["op"] == "gelu" and row["backend"] == "triton"
    assert row["cold_first_s"] > 0 and row["warm_first_s"] > 0 and row["import_s"] > 0


# ---------------------------------------------------------------------------------------------
# the roofline summary and the README report, on synthetic results

META = {"date_utc": "2026-12-01T10:00:00Z", "device": "NVIDIA H100 80GB HBM3", "driver": "580.1",
        "cuda_runtime": "13.0", "torch": "2.11.0", "triton": "3.6.0", "git_sha": "abc123",
        "copy_gbps": 3000.0, "matmul_bf16_tflops": 800.0}


def _write(folder: Path, stem: str, rows: list, meta=META):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def _ln_rows():
    rows = []
    for N, times in ((1024, {"dlh-triton": 1.0, "dlh-cuda": 0.8, "eager": 2.0, "torch.compile": 1.6, "copy": 0.7}),
                     (4096, {"dlh-triton": 1.0, "dlh-cuda": 1.25, "eager": 4.0, "torch.compile": 1.5, "copy": 0.9})):
        for prov, t in times.items():
            rows.append({"op": "layer_norm", "mode": "fwd", "provider": prov, "case": "sweep", "M": 8, "N": N,
                         "p50_ms": t, "gbps": 2700 / t, "pct_copy": 90 / t})
    return rows


def test_summary_roofline_rows(tmp_path):
    _write(tmp_path, "layer_norm", _ln_rows())
    _write(tmp_path, "attention", [
        {"provider": p, "case": "sweep", "mode": "fwd", "B": 1, "H": 16, "L": 4096, "D": 128, "causal": True,
         "p50_ms": t, "tflops": 400 / t, "pct_matmul": 50 / t}
        for p, t in (("dlh-triton", 1.0), ("sdpa-flash", 1.1), ("sdpa-math", 5.0))])
    rows = {(r["op"], r["provider"]): r for r in summary.summarize(tmp_path)}
    tri = rows["layer_norm", "dlh-triton"]
    assert tri["shapes"] == 2 and tri["ceiling"] == "copy"
    assert tri["median_pct_ceiling"] == pytest.approx(90.0)
    # best peer (the copy is a ceiling, not a peer): torch.compile 1.6 and 1.5 ms
    assert tri["best_peer"] == "torch.compile"
    assert tri["x_best_peer"] == pytest.approx((1.6 * 1.5) ** 0.5)
    assert tri["x_eager"] == pytest.approx((2.0 * 4.0) ** 0.5)
    att = rows["attention", "dlh-triton"]
    assert att["ceiling"] == "matmul" and att["best_peer"] == "sdpa-flash"
    assert summary.auto_orders(list(rows.values())) == {"layer_norm": ["cuda", "triton", "torch"]}
    assert summary.run(tmp_path) == 0
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "summary.json").is_file()


def test_report_renders_gpu_runs_and_says_when_there_are_none(tmp_path):
    results = tmp_path / "bench" / "results"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\nhand-written\n\n{report.BEGIN}\nold\n{report.END}\n\n## After\n")
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert report.NO_RESULTS in text and "hand-written" in text and "## After" in text
    # a CPU dry run is not a GPU result; an older run of the same GPU is replaced by the newer
    _write(results / "2026-11-01-cpu", "overhead_cpu", [{"op": "x"}], meta={"device": "cpu"})
    _write(results / "2026-11-30-nvidia-h100-80gb-hbm3", "layer_norm", _ln_rows(),
           meta=dict(META, date_utc="2026-11-30T00:00:00Z", git_sha="old"))
    run = results / "2026-12-01-nvidia-h100-80gb-hbm3"
    _write(run, "layer_norm", _ln_rows())
    _write(run, "models", [{"model": "gpt", "phase": "train", "variant": "patched", "p50_ms": 10.0,
                            "items_per_s": 100.0, "speedup_vs_eager": 1.4, "speedup_vs_compile": 1.1}])
    (run / "layer_norm.png").write_bytes(b"png")
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert report.NO_RESULTS not in text
    assert "### NVIDIA H100 80GB HBM3" in text and "git abc123" in text and "git old" not in text
    assert "copy 3,000 GB/s" in text and "bf16 matmul 800 TFLOP/s" in text
    assert "| layer_norm | layer_norm | fwd | dlh-triton |" in text
    assert "| gpt | train | patched |" in text
    assert "[layer_norm](bench/results/2026-12-01-nvidia-h100-80gb-hbm3/layer_norm.png)" in text
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    assert text.count(report.BEGIN) == 1 and "hand-written" in text


def test_readme_results_block_is_up_to_date():
    assert report.main(["--check"]) == 0, "run: python -m dlh_kernels.bench.report"


# ---------------------------------------------------------------------------------------------
# persistent caches

def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("DLH_CACHE_DIR", str(tmp_path / "c"))
    assert _cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("DLH_CACHE_DIR", "off")
    assert _cache.cache_dir() is None
    monkeypatch.delenv("DLH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_dir() == tmp_path / "xdg" / "dlh_kernels"


def test_autotune_choices_persist_across_processes(monkeypatch, tmp_path):
    """A real triton.autotune object; its tuning is faked (the interpreter never autotunes):
    the first "process" tunes a key and saves it, a fresh autotuner loads it and skips tuning."""
    import triton
    import triton.language as tl
    monkeypatch.setenv("DLH_CACHE_DIR", str(tmp_path))

    @triton.jit
    def copy_kernel(X, Y, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)

    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 2), (128, 4), (256, 8))]
    key = (1024, "torch.float32", "torch.float32")
    tunings = []

    def new_process():
        tuner = triton.autotune(configs=configs, key=["N"])(copy_kernel)

        def fake_run(*args, **kwargs):  # what Autotuner.run does with its cache
            if key not in tuner.cache:
                tunings.append(key)
                tuner.cache[key] = tuner.configs[1]
            return tuner.cache[key]
        tuner.run = fake_run
        return _cache.persistent_autotune(tuner)

    first = new_process()
    assert first.run() is configs[1] and tunings == [key]
    (saved,) = (tmp_path / "autotune").glob("copy_kernel-*.json")
    data = json.loads(saved.read_text())
    assert data["choices"] == [[list(key), str(configs[1])]] and data["triton"] == triton.__version__
    second = new_process()
    assert second.run() is configs[1] and tunings == [key]  # loaded, not tuned again
    # another config list (or kernel source, device, triton) is another file: tuned afresh
    configs.append(triton.Config({"BLOCK": 512}, num_warps=8))
    new_process().run()
    assert tunings == [key, key] and len(list((tmp_path / "autotune").glob("*.json"))) == 2


def test_auto_order_persists_and_steers_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("DLH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cache, "_auto_orders", None)
    monkeypatch.setattr(_cache, "_device_name", lambda: "GPU X")
    assert _cache.auto_order("layer_norm", ("triton", "cuda", "torch")) == ("triton", "cuda", "torch")
    _cache.save_auto_orders({"layer_norm": ["cuda", "triton", "torch"]})
    assert json.loads((tmp_path / _cache.AUTO_FILE).read_text()) == {
        "GPU X": {"layer_norm": ["cuda", "triton", "torch"]}}
    assert _cache.auto_order("layer_norm", ("triton", "cuda", "torch")) == ("cuda", "triton", "torch")
    assert _cache.auto_order("gelu", ("triton", "cuda", "torch")) == ("triton", "cuda", "torch")
    # choose() under auto on a CUDA tensor (availability faked: no GPU here)
    for b in ("triton", "cuda"):
        monkeypatch.setitem(_backend._REASONS, (b, "cuda"), None)
    monkeypatch.setattr(_backend, "get_backend", lambda: "auto")
    assert _backend.choose("layer_norm", None, "cuda", lambda b: None) == "cuda"
    assert _backend.choose("gelu", None, "cuda", lambda b: None) == "triton"
    assert _backend.choose("layer_norm", None, "cpu", lambda b: None) == "torch"
    monkeypatch.setattr(_cache, "_auto_orders", None)
