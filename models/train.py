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
        elif main_rank and progress and (step % log_every == 0 or step == steps):
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
    """(name, model) from a checkpoint written by `dlh train`."""
    from dlh_kernels import models as M
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = M.build(ckpt["name"], **ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["name"], model.to(device)


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
                  f"ranks in sync: {log['ranks_in_sync']}")
        return 0
    else:
        result = train(args.model, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        hist = result["history"]
        k = max(1, min(5, len(hist) // 2))  # mean of the first and of the last k steps
        first = sum(h["loss"] for h in hist[:k]) / k
        last = sum(h["loss"] for h in hist[-k:]) / k
        print(f"{args.model}: {len(hist)} steps in {hist[-1]['seconds']:.1f} s, loss {first:.4f} -> {last:.4f}"
              + (f"; wrote {args.out}" if args.out else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlh_kernels.models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
