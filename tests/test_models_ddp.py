"""DistributedDataParallel training of the reference models: two CPU processes over gloo, the
way a user launches them (torchrun, and `--ddp`, which spawns the processes itself). After the
run the ranks compare their parameters bit for bit (recorded in log.json)."""
import json
import os
import subprocess
import sys

import pytest


def _run(args, tmp_path, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_mlp(tmp_path):
    out = tmp_path / "mlp"
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "dlh_kernels.models.train", "mlp", "--steps", "40", "--batch-size", "32",
          "--device", "cpu", "--no-progress", "--out", str(out)], tmp_path)
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == 2
    assert log["ranks_in_sync"] and log["max_param_diff_across_ranks"] == 0.0
    losses = [h["loss"] for h in log["history"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("name", ["gan"])  # two optimizer steps per step, unused parameters
def test_ddp_flag_spawns_two_processes(name, tmp_path):
    out = tmp_path / name
    proc = _run(["-m", "dlh_kernels.models.train", name, "--small", "--ddp", "--nproc", "2", "--steps", "5",
                 "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)], tmp_path)
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == 2 and log["ranks_in_sync"], log
    assert "ranks in sync: True" in proc.stdout
