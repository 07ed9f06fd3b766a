"""The model subcommands of the `dlh` command: train, sample, compare (see `add_parsers`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _sample(args) -> int:
    """`dlh sample <model>`: images from a generative model into a PNG grid, text from the GPT,
    a few test examples' predictions from a classifier."""
    import dlh_kernels as dlh
    from dlh_kernels import models as M

    from .train import check_backend, check_device, load_checkpoint
    check_device(args.device)
    if args.patch:
        check_backend(args.backend, args.device)
    try:
        name, model = load_checkpoint(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as exc:  # the same error, naming the option
        raise type(exc)(f"--checkpoint: {exc}") from exc
    if name != args.model:
        raise ValueError(f"--checkpoint {args.checkpoint} holds a {name!r} model, not {args.model!r} "
                         f"(dlh sample {name} --checkpoint ...)")
    if args.patch:
        dlh.patch(model, backend=args.backend)
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    if name == "gpt":
        return _sample_text(args, model, generator)
    if name in M.CLASSIFIERS:
        return _sample_predictions(args, name, model, generator)
    from .images import save_grid
    _refuse(args, name, "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--data-dir")
    n = 64 if args.n is None else args.n
    images = M.sample(name, model, n, args.device, steps=args.steps, generator=generator, method=args.method)
    path = save_grid(images, args.out or "samples.png")
    print(f"wrote {len(images)} samples of {name} ({tuple(images.shape[1:])}) to {path}")
    return 0


_DEFAULTS = {"--prompt": None, "--max-new-tokens": None, "--temperature": None, "--top-k": None,
             "--data-dir": None, "--steps": None, "--method": None}


def _refuse(args, name: str, *options: str) -> None:
    """A usage error for options this model's sampling does not take (rather than ignoring them)."""
    given = [o for o in options if getattr(args, o[2:].replace("-", "_")) != _DEFAULTS[o]]
    if given:
        raise ValueError(f"{', '.join(given)}: not for {name} (see dlh sample --help: which options "
                         f"apply to which models)")


def _sample_text(args, model, generator) -> int:
    from dlh_kernels import models as M
    _refuse(args, "gpt", "--steps", "--method", "--data-dir")
    new = 200 if args.max_new_tokens is None else args.max_new_tokens
    temperature = 1.0 if args.temperature is None else args.temperature
    texts = M.generate_text(model, args.prompt or "", new, temperature=temperature, top_k=args.top_k,
                            n=1 if args.n is None else args.n, generator=generator)
    body = "\n\n".join(texts)
    if args.out:
        Path(args.out).write_text(body + "\n")
        print(f"wrote {len(texts)} sample(s) of {new} characters after the prompt to {args.out}")
    else:
        sys.stdout.write(body + ("" if body.endswith("\n") else "\n"))
    return 0


def _sample_predictions(args, name: str, model, generator) -> int:
    """The predictions on a few random test examples beside their labels, and the accuracy on
    the whole test split."""
    from dlh_kernels import models as M
    _refuse(args, name, "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--steps", "--method")
    if args.out:
        raise ValueError(f"--out: {name} is a classifier; dlh sample {name} prints its predictions")
    cfg = M.unwrap(model).config
    size = getattr(cfg, "image_size", None)
    data = M.load_data(name, data_dir=args.data_dir, split="test", image_size=size)
    x_all, y_all = data.tensors
    if name != "mlp" and tuple(x_all.shape[1:]) != (cfg.in_channels, size, size):
        raise ValueError(f"--data-dir: test images {tuple(x_all.shape[1:])} do not fit the model's "
                         f"input {(cfg.in_channels, size, size)}")
    n = min(10 if args.n is None else args.n, len(x_all))
    pick = torch.randperm(len(x_all), generator=generator)[:n]
    device = next(model.parameters()).device
    preds, confs = [], []
    for chunk in torch.split(torch.arange(len(x_all)), 256):
        p, c = M.predict(name, model, x_all[chunk].to(device))
        preds.append(p.cpu())
        confs.append(c.cpu())
    pred, conf = torch.cat(preds), torch.cat(confs)
    labels = y_all.long()
    print(f"{name}: {n} random test examples (seed {args.seed}) of {len(x_all)}")
    print("  example  label  predicted  probability")
    for i in pick.tolist():
        mark = "" if pred[i] == labels[i] else "  <- wrong"
        print(f"  {i:7d}  {int(labels[i]):5d}  {int(pred[i]):9d}  {float(conf[i]):11.3f}{mark}")
    shown = int((pred[pick] == labels[pick]).sum())
    print(f"{shown}/{n} right here; test accuracy {float((pred == labels).float().mean()):.3f} "
          f"over all {len(x_all)} test examples")
    return 0


def _compare(args) -> int:
    from .compare import compare, format_result
    from .train import DTYPES, check_backend, check_device
    check_device(args.device)
    check_backend(args.backend, args.device)
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


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `sample` and `compare` to the `dlh` command's subparsers."""
    from . import NAMES
    from .train import DTYPES, add_arguments
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("train", help="train a reference model (progress bar, loss log, checkpoint)")
    add_arguments(p)
    p.set_defaults(fn=_train)

    p = sub.add_parser("sample", help="show what a trained model does: images (PNG grid), text "
                                      "(gpt), predictions on test examples (mlp, cnn, vit)",
                       description="Images from gan / vae / quick_unet / ddpm_unet into a PNG grid "
                                   "(-n, --out, --steps, --method); text from gpt (--prompt, "
                                   "--max-new-tokens, --temperature, --top-k, -n, --out: a text "
                                   "file instead of stdout); predictions of mlp / cnn / vit on -n "
                                   "random test examples beside their labels (--data-dir: your "
                                   "MNIST / CIFAR-10 test files).")
    p.add_argument("model", choices=NAMES)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by dlh train (or its --out folder)")
    p.add_argument("--out", default=None, help="images: the PNG (default samples.png); gpt: a text file "
                                               "(default: print)")
    p.add_argument("-n", type=int, default=None, help="images (default 64), texts (1), test examples (10)")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's)")
    p.add_argument("--method", choices=["ddpm", "ddim"], default=None, help="ddpm_unet's sampler")
    p.add_argument("--prompt", default=None, help="gpt: the text to continue (default: start from a newline)")
    p.add_argument("--max-new-tokens", type=_non_negative, default=None,
                   help="gpt: characters to generate (default 200)")
    p.add_argument("--temperature", type=_non_negative_float, default=None,
                   help="gpt: softmax temperature (default 1.0; 0: always the most likely character)")
    p.add_argument("--top-k", type=_positive, default=None, help="gpt: sample among the k most likely characters")
    p.add_argument("--data-dir", default=None, help="mlp/cnn/vit: your test data (default: the packaged data)")
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
