"""`dlh check`: on this machine every kernel that can run here against float64, each row naming
the path its result came from, its case and its tolerance; a wrong result exits non-zero; unknown
--ops/--backends names are one line and exit 2. Without a GPU the Triton kernels run under the
interpreter (conftest turns it on; the subprocess test checks that `dlh check` turns it on
itself) and the CUDA C++ kernels through tests/cuda_emu where it can be built."""
import os
import subprocess
import sys

import pytest
import torch

import dlh_kernels.functional as DF
from dlh_kernels import check
from dlh_kernels.cli import main

from conftest import HAS_GPU

cpu_only = pytest.mark.skipif(HAS_GPU, reason="the CPU paths (interpreter, emulation)")


def _table(out: str) -> list[str]:
    """The result lines of the table: those ending in "ok" or holding "FAIL"."""
    return [line for line in out.splitlines() if line.rstrip().endswith(" ok") or " FAIL" in line]


@cpu_only
def test_quick_check_every_path(capsys):
    rc = main(["check", "--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for column in ("case", "backend", "max err", "tol", "eager err", "result"):
        assert column in header, header
    rows = _table(out)
    assert not [r for r in rows if "FAIL" in r]
    triton = [r for r in rows if "triton (interpreter)" in r]
    assert len(triton) >= 2 * len(check.OPS) - 2, out  # every op in both dtypes (bar skips)
    assert all(r.endswith(" ok") for r in triton)
    assert any("torch (CPU)" in r for r in rows)
    # the two diffusion samplers are told apart
    diffusion = [r for r in rows if r.startswith("diffusion_step ")]
    assert any(" ddpm " in r for r in diffusion) and any(" ddim+cfg " in r for r in diffusion), diffusion
    # every result row shows a tolerance: max err, tol and eager err are three numbers
    for r in rows:
        numbers = [t for t in r.split() if "e-" in t or "e+" in t]
        assert len(numbers) == 3, r
    ext, why = check.emulation()
    if ext is None:
        assert "emulation not available" in out, out
        pytest.skip(why)
    cuda = [r for r in rows if "cuda (emulated)" in r]
    cuda_ops = {r.split()[0] for r in cuda}
    # every op with a CUDA C++ kernel (linear_gelu has none yet)
    assert cuda_ops >= set(check.OPS) - {"linear_gelu"}, sorted(set(check.OPS) - cuda_ops)
    assert "tol = 2 x eager err + floor" in out and "cuda (emulated)" in out.splitlines()[-2]


def test_rows_carry_path_case_and_tolerance():
    rows = check.run_check(ops=["diffusion_step"], backends=["torch"], dtypes=(torch.float32,))
    assert [r["case"] for r in rows] == ["ddpm 2x4x9x7", "ddim+cfg (eta 1, w 7.5) 2x4x9x7"] + (
        ["ddim+cfg (eta 1, w 7.5) 8x4x64x64"] if HAS_GPU else [])
    for r in rows:
        assert r["ok"] and r["path"] == ("torch (GPU)" if HAS_GPU else "torch (CPU)")
        assert r["tol"] == pytest.approx(check.tolerance(torch.float32, r["ref_err"]))
        assert r["tol"] >= check._FLOOR[torch.float32] and r["max_abs_err"] <= r["tol"]


def test_a_wrong_result_fails(monkeypatch, capsys):
    silu = DF.silu

    def wrong(x, *, backend=None):  # right on the eager side, off by 0.5 on every kernel
        return silu(x, backend=backend) + (0.0 if backend == "torch" else 0.5)
    monkeypatch.setattr(DF, "silu", wrong)
    rc = main(["check", "--quick", "--ops", "silu", "--backends", "triton", "torch"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = _table(out)
    assert [r for r in rows if "FAIL" in r] and all("FAIL" in r for r in rows if "silu " in r and "triton" in r)
    assert all(r.endswith(" ok") for r in rows if "torch (" in r)
    assert "0 failed" not in out.splitlines()[-1]


def test_a_crashing_kernel_is_a_failed_row(monkeypatch, capsys):
    def broken(x, *, backend=None):
        if backend == "torch":
            return torch.relu(x)
        raise RuntimeError("kernel launch failed: boom")
    monkeypatch.setattr(DF, "relu", broken)
    rc = main(["check", "--quick", "--ops", "relu", "--backends", "triton,torch"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL (RuntimeError: kernel launch failed: boom)" in out, out


@pytest.mark.parametrize("argv,flag", [(["--ops", "nosuch"], "--ops"),
                                       (["--ops", "silu", "--backends", "cuda,bogus"], "--backends")])
def test_unknown_names_are_one_line_and_exit_2(argv, flag, capsys):
    rc = main(["check", *argv])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "choose from" in lines[0], captured.err
    assert ("layer_norm" if flag == "--ops" else "triton, cuda, torch") in lines[0]
    assert "Traceback" not in captured.err


@cpu_only
def test_cuda_without_the_emulation_says_so(monkeypatch):
    monkeypatch.setattr(check, "_emulation", (None, check.EMULATION_MISSING + ": no host C++ compiler"))
    rows = check.run_check(ops=["relu"], backends=["cuda"], quick=True)
    assert rows and all(r["ok"] is None for r in rows)
    text = check.format_rows(rows)
    assert "skipped: cuda: emulation not available (needs the repository checkout and g++)" in text, text


@cpu_only
def test_the_command_turns_the_interpreter_on_itself():
    """A plain `dlh check` process (no TRITON_INTERPRET) still runs the Triton kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dlh_kernels", "check", "--quick", "--ops", "relu",
                           "--backends", "triton", "torch"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    triton = [r for r in _table(proc.stdout) if "triton (interpreter)" in r]
    assert len(triton) == 2 and all(r.endswith(" ok") for r in triton), proc.stdout
