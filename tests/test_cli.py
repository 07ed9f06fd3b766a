"""The `dlh` command as a newcomer meets it (issue 20): short errors naming the argument (exit 2
for usage errors), --traceback / DLH_TRACEBACK=1 for the trace, and what train / sample / profile
/ bench say about what they do. In-process calls (`cli.main`) except one real subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlh_kernels.functional as DF
from dlh_kernels import _backend, cli

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv):
    """The exit code of cli.main(argv), returned or raised as SystemExit."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc


def short_error(capsys, argv, *must_name, rc=2):
    """Run argv, expect exit rc and a 1-2 line stderr naming each of must_name."""
    assert run_main(argv) == rc
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert 1 <= len(lines) <= 2, captured.err
    for word in must_name:
        assert word in lines[0], (word, lines)
    assert "Traceback" not in captured.err
    return lines[0], captured.out


# ---- training runs shared by the sampling tests (a few steps each, --small) -----------------------
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "run"
    assert run_main(["train", "gpt", "--small", "--steps", "3", "--batch-size", "4", "--no-progress",
                     "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "run"
    assert run_main(["train", "mlp", "--steps", "5", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    return out


# ---- 1. short errors ----------------------------------------------------------------------------
def test_missing_checkpoint_is_one_line_naming_it(capsys, tmp_path):
    line, _ = short_error(capsys, ["sample", "gpt", "--checkpoint", str(tmp_path / "missing.pt")],
                          "dlh sample:", "--checkpoint", "missing.pt")
    # a folder without checkpoint.pt, and a file that is not a checkpoint
    short_error(capsys, ["sample", "gpt", "--checkpoint", str(tmp_path)], "--checkpoint", "folder")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    short_error(capsys, ["sample", "gpt", "--checkpoint", str(junk)], "--checkpoint", "not a checkpoint")


def test_traceback_flag_and_env_show_the_trace(monkeypatch, tmp_path):
    argv = ["sample", "gpt", "--checkpoint", str(tmp_path / "missing.pt")]
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        cli.main(["--traceback", *argv])
    monkeypatch.setenv("DLH_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_console_command_exit_code_and_stderr(tmp_path):
    env = {**os.environ, "DLH_TRACEBACK": "0"}
    argv = [sys.executable, "-m", "dlh_kernels", "sample", "gpt", "--checkpoint", str(tmp_path / "missing.pt")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 2, proc.stderr
    assert "--checkpoint" in proc.stderr and "--traceback" in proc.stderr
    proc = subprocess.run(argv[:3] + ["--traceback"] + argv[3:], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr


def test_argparse_errors_are_short(capsys):
    short_error(capsys, ["sample", "gpt"], "--checkpoint")
    short_error(capsys, ["sample", "gpt", "--checkpoint", "x.pt", "--top-k", "0"], "--top-k")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["train", "gpt", "--small", "--steps", "1"],
    ["sample", "gpt", "--checkpoint", "missing.pt"],
    ["compare", "mlp"],
    ["profile", "gpt"],
])
def test_device_cuda_without_cuda(capsys, monkeypatch, command):
    from dlh_kernels import models as M
    monkeypatch.setattr(M, "build", lambda *a, **k: pytest.fail("built a model first"))
    short_error(capsys, [*command, "--device", "cuda"], "--device cuda", "cpu")


def test_patch_backend_triton_without_interpreter(capsys, monkeypatch, gpt_run):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backend, "_REASONS", {})  # availability is cached per process
    line, _ = short_error(capsys, ["sample", "gpt", "--checkpoint", str(gpt_run), "--device", "cpu",
                                   "--patch", "--backend", "triton"], "--backend triton", "TRITON_INTERPRET")
    short_error(capsys, ["train", "mlp", "--steps", "1", "--device", "cpu", "--patch", "--backend", "triton"],
                "--backend triton")


def test_checkpoint_of_another_model(capsys, gpt_run):
    short_error(capsys, ["sample", "vae", "--checkpoint", str(gpt_run / "checkpoint.pt")], "'gpt'", "'vae'")


# ---- 2. defects ---------------------------------------------------------------------------------
def test_profile_unknown_target_is_a_usage_error(capsys):
    line, out = short_error(capsys, ["profile", "nosuch"], "unknown target 'nosuch'")
    assert "dlh_nosuch" not in out  # no recipes for it


def test_profile_cpu_dry_run_progress_ranges_and_gpu_recipes(capsys):
    rc = run_main(["profile", "gpt", "--device", "cpu", "--backend", "torch", "--size", "tiny",
                   "--iters", "2", "--warmup", "1", "--dtype", "fp32", "--batch", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "warm-up 1/1" in out and "measured 2/2" in out  # progress
    assert "dlh::layer_norm[torch]: " in out and "model layers:" in out  # what it recorded
    recipes = [line for line in out.splitlines() if line.startswith(("nsys ", "ncu "))]
    assert recipes and all("--device" not in line for line in recipes)
    assert "without --device cpu" in out
    assert cli._recipe_argv(["gpt", "--device=cpu", "--iters", "3"]) == ["gpt", "--iters", "3"]
    assert cli._recipe_argv(["gpt", "--device", "cuda:1"]) == ["gpt", "--device", "cuda:1"]


def test_bench_overhead_banner_names_only_what_runs(capsys, monkeypatch):
    import dlh_kernels.bench as bench
    from dlh_kernels.bench import overhead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(overhead, "run", lambda **kw: 0)
    monkeypatch.setattr(bench, "_check", lambda out: pytest.fail("ran the correctness check"))
    assert bench.main(["overhead"]) == 0
    out = capsys.readouterr().out
    assert "No GPU" in out and "correctness" not in out and "host-side CPU cost" in out
    assert "correctness check" in bench._no_gpu_banner(bench.ALL)


def test_runs_folder_is_ignored():
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.parametrize("backend", ["torch", "triton", None])
def test_layer_norm_mixed_dtype_weight_is_our_error(backend):
    # the kernels take the parameters in the input's dtype or float32; every backend refuses
    # anything else before running (not torch's own "mixed dtype (CPU)" message)
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match=r"dlh.layer_norm: weight dtype torch.bfloat16 must be the input's \(torch.float32\)"):
        DF.layer_norm(x, (8,), torch.ones(8, dtype=torch.bfloat16), backend=backend)
    with pytest.raises(TypeError, match=r"bias dtype torch.float16 must be the input's \(torch.bfloat16\) or float32"):
        DF.add_layer_norm(x.bfloat16(), x.bfloat16(), (8,), None, torch.zeros(8, dtype=torch.float16),
                          backend=backend)
    with pytest.raises(TypeError, match="weight and bias must share one dtype"):
        DF.layer_norm(x.bfloat16(), (8,), torch.ones(8), torch.zeros(8, dtype=torch.bfloat16), backend=backend)
    # mixed precision, fp32 parameters with bf16 activations, still runs
    y = DF.layer_norm(x.bfloat16(), (8,), torch.ones(8), torch.zeros(8), backend=backend)
    assert y.dtype == torch.bfloat16


def test_rms_norm_mixed_dtype_weight_follows_eager():
    # eager F.rms_norm promotes (fp32 x, bf16 weight) -> fp32, so the torch backend (and auto)
    # compute it; the kernels refuse it by name
    x, w = torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16)
    assert DF.rms_norm(x, (8,), w, backend="torch").dtype == torch.float32
    assert DF.rms_norm(x, (8,), w).dtype == torch.float32
    with pytest.raises(RuntimeError, match="triton.*weight in the input dtype or float32"):
        DF.rms_norm(x, (8,), w, backend="triton")


# ---- 3. gaps ------------------------------------------------------------------------------------
def test_sample_gpt_generates_the_requested_length(capsys, gpt_run, tmp_path):
    text_file = tmp_path / "out.txt"
    assert run_main(["sample", "gpt", "--checkpoint", str(gpt_run / "checkpoint.pt"), "--device", "cpu",
                     "--prompt", "def ", "--max-new-tokens", "25", "--temperature", "0.8", "--top-k", "5",
                     "--out", str(text_file)]) == 0
    capsys.readouterr()
    text = text_file.read_text()[:-1]  # the file ends with one newline
    assert text.startswith("def ") and len(text) == 4 + 25
    assert run_main(["sample", "gpt", "--checkpoint", str(gpt_run), "--device", "cpu", "--prompt", "x",
                     "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("x")
    short_error(capsys, ["sample", "gpt", "--checkpoint", str(gpt_run), "--steps", "3"], "--steps", "gpt")


def test_generate_text_top_k_and_greedy(gpt_run):
    from dlh_kernels import models as M
    from dlh_kernels.models.train import load_checkpoint
    _, model = load_checkpoint(gpt_run)
    greedy = [M.generate_text(model, "a", 12, temperature=0)[0] for _ in range(2)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == 13
    one = M.generate_text(model, "a", 12, top_k=1, generator=torch.Generator().manual_seed(3))[0]
    assert one == greedy[0]  # top-1 sampling is greedy
    texts = M.generate_text(model, "", 7, n=3, generator=torch.Generator().manual_seed(0))
    assert len(texts) == 3 and all(len(t) == 7 for t in texts)


def test_sample_classifier_prints_predictions_vs_labels(capsys, mlp_run):
    assert run_main(["sample", "mlp", "--checkpoint", str(mlp_run), "--device", "cpu", "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "label  predicted" in out and "test accuracy" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "right here" not in line]
    assert len(rows) == 4


def test_train_summary_and_nothing_saved(capsys, mlp_run):
    assert run_main(["train", "mlp", "--steps", "3", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "nothing saved" in out and "--out" in out
    # the summary's first loss is step 1's, as logged (the means of the first/last k steps beside)
    log = json.loads((mlp_run / "log.json").read_text())
    from dlh_kernels.models.train import summary
    text = summary("mlp", log["history"])
    assert f"loss {log['history'][0]['loss']:.4f} (step 1)" in text
    assert f"-> {log['history'][-1]['loss']:.4f} (step 5)" in text and "mean of the first 2 steps" in text
