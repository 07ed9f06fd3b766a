"""Training loop of the reference models, single process or DistributedDataParallel.

    dlh train gpt --steps 200 --small --out runs/gpt
    dlh train cnn --patch --device cuda --dtype bfloat16 --out runs/cnn
    dlh train mlp --ddp --nproc 2 --out runs/mlp                 # spawns 2 processes
    torchrun --nproc-per-node 2 -m dlh_kernels.models.train mlp --out runs/mlp

Writes to ``--out``: ``loss.csv`` (step, loss, seconds), ``log.json`` (arguments, config, the
patch report, the loss history, and for DDP whether the ranks' parameters ended identical)
and ``checkpoint.pt`` (name, config, state_dict), which ``dlh sample`` loads.

DDP: one process per GPU with NCCL, or processes on the CPU with gloo. Every process builds the
model from the same seed (DDP also broadcasts rank 0's weights), reads its own shard of the data
(DistributedSampler) with ``--batch-size`` examples per process, and draws its own noise (seed +
rank). The loss logged per step is the mean over the ranks. ``--dtype`` casts the parameters
and the inputs (no autocast, no master weights: a quick check, not a recipe).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(total: int, enabled: bool):
    """A tqdm bar when tqdm is installed and enabled, else None (the loop prints a line now and then)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True)


def _batches(loader, sampler):
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _max_param_diff_across_ranks(model: torch.nn.Module) -> float:
    """max |p - p_rank0| over every parameter and rank (0.0: the ranks agree bit for bit)."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def train(name: str, *, steps: int = 200, batch_size: int = 64, device: str = "cpu", dtype: str = "float32",
          patch: bool = False, backend: Optional[str] = None, data_dir: Optional[str] = None,
          dataset: Optional[str] = None, out: Optional[str] = None, small: bool = False,
          lr: Optional[float] = None, seed: int = 0, progress: bool = True, log_every: int = 10,
          overrides: Optional[dict] = None) -> dict:
    """Train `name` for `steps` steps; returns {"model", "history", "log"} (and writes --out).
    Under torchrun (WORLD_SIZE > 1 in the environment) it runs as one DDP rank."""
    import dlh_kernels as dlh
    from dlh_kernels import models as M

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_device(device)  # before anything is built or loaded
    if patch:
        check_backend(backend, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = world > 1
    dev = torch.device(device)
    if ddp:
        import torch.distributed as dist
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    main_rank = rank == 0

    data = M.load_data(name, data_dir=data_dir, small=small, dataset=dataset,
                       **_data_sizes(name, small, overrides or {}))
    cfg = dict(M.data_config(name, data) if data_dir is not None else {})
    cfg.update(overrides or {})
    torch.manual_seed(seed)
    model = M.build(name, small=small, **cfg).to(device=dev, dtype=DTYPES[dtype])
    report = dlh.patch(model, backend=backend) if patch else None
    optimizer = M.make_optimizer(name, model, lr)
    objective = M.Objective(name, model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        # GAN: the discriminator step leaves the generator unused (it runs under no_grad)
        objective = DistributedDataParallel(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                                            find_unused_parameters=(name == "gan"))
        sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    if len(data) // world < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {len(data) // world} examples per process")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    torch.manual_seed(seed + 1000 * rank)  # each rank's own noise, latents and timesteps

    bar = _progress(steps, progress and main_rank)
    history, losses = [], []
    model.train()
    start = time.perf_counter()
    batches = _batches(loader, sampler)
    for step in range(1, steps + 1):
        items = next(batches)
        batch = {k: v.to(dev, non_blocking=True) for k, v in M.batch_from_items(name, items).items()}
        batch = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in batch.items()}
        value = M.train_step(name, objective, optimizer, batch)
        losses.append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
        elif main_rank and progress and (step == 1 or step % log_every == 0 or step == steps):
            print(f"step {step}/{steps}  loss {value:.4f}", flush=True)
        history.append({"step": step, "loss": value, "seconds": time.perf_counter() - start})
    if bar is not None:
        bar.close()

    log = {"model": name, "steps": steps, "batch_size": batch_size, "device": str(dev), "dtype": dtype,
           "patch": patch, "backend": backend, "small": small, "data_dir": data_dir, "seed": seed,
           "world_size": world, "config": M.config_dict(model),
           "patch_report": str(report) if report is not None else None}
    if ddp:
        import torch.distributed as dist
        mean = torch.tensor(losses, dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(mean)
        for row, v in zip(history, (mean / world).tolist()):
            row["loss"] = v
        log["max_param_diff_across_ranks"] = _max_param_diff_across_ranks(model)
        log["ranks_in_sync"] = log["max_param_diff_across_ranks"] == 0.0
    log["history"] = history
    if out is not None and main_rank:
        save_run(out, name, model, log)
    if ddp:
        dist.barrier()
    return {"model": model, "history": history, "log": log}


def _data_sizes(name: str, small: bool, overrides: dict) -> dict:
    """load_data's image_size / block_size when the config overrides them."""
    if name == "gpt" and "block_size" in overrides:
        return {"block_size": overrides["block_size"]}
    if "image_size" in overrides and name not in ("mlp", "gpt"):
        return {"image_size": overrides["image_size"]}
    return {}


def save_run(out, name: str, model: torch.nn.Module, log: dict) -> Path:
    from dlh_kernels import models as M
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "seconds"])
        for row in log["history"]:
            writer.writerow([row["step"], f"{row['loss']:.6g}", f"{row['seconds']:.4f}"])
    (out / "log.json").write_text(json.dumps(log, indent=1))
    state = {k: v.detach().cpu() for k, v in M.unwrap(model).state_dict().items()}
    torch.save({"name": name, "config": M.config_dict(model), "state_dict": state, "steps": log["steps"]},
               out / "checkpoint.pt")
    return out


def load_checkpoint(path, device="cpu") -> tuple:
    """(name, model) from a checkpoint written by `dlh train` (``path``: the file, or the
    ``--out`` folder holding checkpoint.pt)."""
    from dlh_kernels import models as M
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if not path.is_file():
        what = "a folder without checkpoint.pt" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{str(path)!r}: {what} (`dlh train <model> --out DIR` writes "
                                f"DIR/checkpoint.pt)")
    check_device(device)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by `dlh train` "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict) or not {"name", "config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{str(path)!r} is not a checkpoint written by `dlh train` (it needs the "
                         f"keys name, config, state_dict)")
    model = M.build(ckpt["name"], **ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["name"], model.to(device)


def check_device(device) -> torch.device:
    """``torch.device(device)``, or a ValueError naming ``--device`` and what this machine has
    (so that a CPU-only torch says so before any model is built, not deep inside a .to())."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a device (expected cpu, cuda or cuda:N): {exc}") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) is built without "
                             f"CUDA; use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() "
                             f"is False); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
    elif dev.type != "cpu" and dev.type != "meta":
        backend = getattr(torch.backends, dev.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise ValueError(f"--device {device}: {dev.type} is not available in this torch")
    return dev


def check_backend(backend, device) -> None:
    """A ValueError naming ``--backend`` when the patched model's backend cannot run on ``device``
    (e.g. triton on CPU tensors without the Triton interpreter)."""
    from dlh_kernels import _backend
    if backend is None or backend == "auto":
        return
    if backend not in _backend.BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(_backend._CHOICES)}, got {backend!r}")
    device_type = torch.device(device).type
    why = _backend.unavailable_reason(backend, device_type)
    if why is not None:
        raise ValueError(f"--backend {backend} cannot run on {device_type}: {why}")


# ---- command line ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from dlh_kernels.models import NAMES
    p.add_argument("model", choices=NAMES)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--patch", action="store_true", help="dlh.patch the model (our kernels)")
    p.add_argument("--backend", default=None, help="backend of the patched modules (auto, triton, cuda, torch)")
    p.add_argument("--data-dir", default=None, help="your MNIST / CIFAR-10 files or a text file (never downloaded)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default=None)
    p.add_argument("--out", default=None, help="folder for loss.csv, log.json, checkpoint.pt")
    p.add_argument("--small", action="store_true", help="the small config (CPU-sized)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; spawns --nproc processes "
                   "unless already launched by torchrun")
    p.add_argument("--nproc", type=int, default=None, help="DDP processes (default: GPUs, or 2 on CPU)")


def _kwargs(args) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                patch=args.patch, backend=args.backend, data_dir=args.data_dir, dataset=args.dataset,
                out=args.out, small=args.small, lr=args.lr, seed=args.seed, progress=not args.no_progress)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, world: int, port: int, name: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not str(kwargs.get("device", "cpu")).startswith("cuda"):
        # as torchrun does: processes sharing the CPU must not each spin up every core's thread
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        train(name, **kwargs)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    """`dlh train` / `python -m dlh_kernels.models.train`."""
    kwargs = _kwargs(args)
    check_device(args.device)  # before spawning processes or building anything
    if args.patch:
        check_backend(args.backend, args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: this process is one rank
        result = train(args.model, **kwargs)
        import torch.distributed as dist
        dist.destroy_process_group()
    elif args.ddp:
        nproc = args.nproc or (torch.cuda.device_count() if args.device.startswith("cuda") else 2)
        import torch.multiprocessing as mp
        mp.start_processes(_spawned_rank, args=(nproc, _free_port(), args.model, kwargs), nprocs=nproc,
                           start_method="spawn")
        if args.out:
            log = json.loads((Path(args.out) / "log.json").read_text())
            print(f"{args.model}: {nproc} processes, final loss {log['history'][-1]['loss']:.4f}, "
                  f"ranks in sync: {log['ranks_in_sync']}" + _saved(args.out))
        else:
            print(f"{args.model}: {nproc} processes done" + _saved(args.out))
        return 0
    else:
        result = train(args.model, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(args.model, result["history"]) + _saved(args.out))
    return 0


def summary(name: str, hist: list) -> str:
    """The loss at the first and the last step (what the progress bar showed), and, since one
    step's loss is noisy, the mean of the first and of the last k steps beside them."""
    first, last = hist[0], hist[-1]
    text = (f"{name}: {len(hist)} steps in {last['seconds']:.1f} s, loss {first['loss']:.4f} (step 1) "
            f"-> {last['loss']:.4f} (step {last['step']})")
    k = min(5, len(hist) // 2)
    if k > 1:
        mean_first = sum(h["loss"] for h in hist[:k]) / k
        mean_last = sum(h["loss"] for h in hist[-k:]) / k
        text += f"; mean of the first {k} steps {mean_first:.4f}, of the last {k} {mean_last:.4f}"
    return text


def _saved(out) -> str:
    if out:
        return f"; wrote {Path(out) / 'loss.csv'}, log.json, checkpoint.pt"
    return ("\nnothing saved: no --out given (`--out runs/NAME` writes loss.csv, log.json and "
            "checkpoint.pt, which dlh sample loads)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlh_kernels.models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
