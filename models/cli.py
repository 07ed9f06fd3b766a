"""The model subcommands of the `dlh` command: train, sample, compare (see `add_parsers`)."""
from __future__ import annotations

import argparse

import torch


def _sample(args) -> int:
    import dlh_kernels as dlh
    from dlh_kernels import models as M

    from .images import save_grid
    from .train import load_checkpoint
    name, model = load_checkpoint(args.checkpoint, args.device)
    if name != args.model:
        raise SystemExit(f"dlh sample: {args.checkpoint} holds a {name!r} model, not {args.model!r}")
    if args.patch:
        dlh.patch(model, backend=args.backend)
    generator = torch.Generator().manual_seed(args.seed)
    images = M.sample(name, model, args.n, args.device, steps=args.steps, generator=generator, method=args.method)
    path = save_grid(images, args.out)
    print(f"wrote {len(images)} samples of {name} ({tuple(images.shape[1:])}) to {path}")
    return 0


def _compare(args) -> int:
    from .compare import compare, format_result
    from .train import DTYPES
    result = compare(args.model, small=args.small, batch_size=args.batch_size, device=args.device,
                     dtype=DTYPES[args.dtype], backend=args.backend, iters=args.iters, warmup=args.warmup,
                     seed=args.seed)
    print(format_result(result))
    if args.report:
        print(result["report"])
    return 0 if result["ok"] else 1


def _train(args) -> int:
    from .train import run
    return run(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `sample` and `compare` to the `dlh` command's subparsers."""
    from . import NAMES, SAMPLERS
    from .train import DTYPES, add_arguments
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("train", help="train a reference model (progress bar, loss log, checkpoint)")
    add_arguments(p)
    p.set_defaults(fn=_train)

    p = sub.add_parser("sample", help="sample a trained generative model into a PNG grid")
    p.add_argument("model", choices=SAMPLERS)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by dlh train")
    p.add_argument("--out", default="samples.png")
    p.add_argument("-n", type=int, default=64, help="number of images")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's)")
    p.add_argument("--method", choices=["ddpm", "ddim"], default=None, help="ddpm_unet's sampler")
    p.add_argument("--device", default=default_device)
    p.add_argument("--patch", action="store_true")
    p.add_argument("--backend", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_sample)

    p = sub.add_parser("compare", help="eager vs dlh.patch: outputs, gradients and time per step")
    p.add_argument("model", choices=NAMES)
    p.add_argument("--small", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=default_device)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--backend", default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="print what dlh.patch replaced")
    p.set_defaults(fn=_compare)
