"""Data for the reference models: real data that ships inside installed packages, or the user's
own MNIST / CIFAR-10 files. Nothing is ever downloaded.

Packaged data (no files needed):

- ``moons``: scikit-learn's ``make_moons`` (2-D points in two interleaved half circles, label
  0/1), 1000 train / 200 test points, noise 0.1, fixed seeds (0 train, 1 test).
- ``digits``: scikit-learn's ``load_digits``, the 1,797 8x8 handwritten digits of the UCI set
  (pixel values 0..16), split by index: the first 1,500 train, the remaining 297 test.
  Transforms, in this order:
    1. divide by 16 -> [0, 1];
    2. bilinear resize 8x8 -> 20x20 and pad 4 zeros on every side -> 28x28: MNIST's layout
       (a digit in a 20x20 box centred in a 28x28 frame);
    3. image_size 32 (the U-Nets): pad the 28x28 image with 2 more zeros on every side, the
       usual way of bringing MNIST to 32x32; any other size: a bilinear (antialiased) resize of
       the 28x28 image;
    4. ``scale="[-1,1]"`` (GAN, the U-Nets): 2 x - 1.
- ``text``: the source files (code, comments and docstrings) of eight pure-Python standard
  library modules of the running interpreter, concatenated in a fixed order (``TEXT_MODULES``,
  about 430 KB with Python 3.11), read from disk without importing them. Deterministic for a
  given Python version. Character-level vocabulary ``VOCAB``: newline and the 95 printable ASCII
  characters; a tab becomes a space, any other character ``?``. First 90% train, last 10% test.

The user's files (``data_dir``, never fetched):

- MNIST: ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``t10k-...`` for the test
  split), plain or ``.gz``, in ``data_dir`` or ``data_dir/MNIST/raw`` (torchvision's layout).
  Pixels / 255 -> [0, 1], then steps 3-4 above.
- CIFAR-10: the python pickle batches ``data_batch_1..5`` / ``test_batch``, in ``data_dir`` or
  ``data_dir/cifar-10-batches-py``. 3x32x32, pixels / 255, then steps 3-4 above.
- text (GPT): ``data_dir/input.txt`` (e.g. tiny Shakespeare), else the first ``*.txt`` file in
  alphabetical order.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

TEXT_MODULES = ("argparse", "difflib", "textwrap", "statistics", "calendar", "fractions", "heapq", "pydoc")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 characters
_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}
DIGITS_TRAIN = 1500


# ---- transforms --------------------------------------------------------------------------------
def to_size(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, 28, 28) or (N, C, 32, 32) in [0, 1] -> (N, C, image_size, image_size) (steps 3 above)."""
    h = images.shape[-1]
    if h == image_size:
        return images
    if h == 28 and image_size == 32:
        return F.pad(images, (2, 2, 2, 2))
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def _finish(images: torch.Tensor, image_size: int, scale: str) -> torch.Tensor:
    images = to_size(images, image_size)
    if scale == "[-1,1]":
        return images * 2 - 1
    if scale != "[0,1]":
        raise ValueError(f"scale must be '[0,1]' or '[-1,1]', got {scale!r}")
    return images.contiguous()


# ---- packaged data -----------------------------------------------------------------------------
def moons(split: str = "train", n: Optional[int] = None):
    """(x (N, 2) float32, y (N,) float32) from sklearn's make_moons."""
    from sklearn.datasets import make_moons
    n = n or (1000 if split == "train" else 200)
    x, y = make_moons(n_samples=n, noise=0.1, random_state=0 if split == "train" else 1)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)


@lru_cache(maxsize=1)
def _digits_28():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    images = F.pad(images, (4, 4, 4, 4))                                              # (1797, 1, 28, 28)
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def digits(split: str = "train", image_size: int = 28, scale: str = "[0,1]"):
    """(images (N, 1, S, S), labels (N,) int64) from sklearn's load_digits (see the module doc)."""
    images, labels = _digits_28()
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return _finish(images[part], image_size, scale), labels[part].clone()


@lru_cache(maxsize=1)
def _stdlib_text() -> str:
    parts = []
    for name in TEXT_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file():
            parts.append(Path(spec.origin).read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise RuntimeError("no standard library source found for the text corpus (an install "
                           "without .py files?); pass data_dir with an input.txt")
    return "\n".join(parts)


def encode(text: str) -> torch.Tensor:
    """Characters -> int64 ids in VOCAB (tab -> space, anything else outside it -> '?')."""
    unknown = _CHAR_TO_ID["?"]
    text = text.replace("\t", " ")
    return torch.tensor([_CHAR_TO_ID.get(c, unknown) for c in text], dtype=torch.int64)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def text_ids(split: str = "train", data_dir: Optional[str] = None) -> torch.Tensor:
    """The character ids of the corpus split (first 90% train, last 10% test)."""
    if data_dir is not None:
        root = Path(data_dir)
        path = root / "input.txt"
        if not path.is_file():
            found = sorted(root.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"no input.txt or *.txt in {root}")
            path = found[0]
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
    else:
        ids = _encoded_stdlib()
    cut = int(0.9 * len(ids))
    return ids[:cut] if split == "train" else ids[cut:]


@lru_cache(maxsize=1)
def _encoded_stdlib() -> torch.Tensor:
    return encode(_stdlib_text())


class CharDataset(torch.utils.data.Dataset):
    """Every window of block_size + 1 characters: item i = (ids[i:i+T], ids[i+1:i+T+1])."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if len(ids) <= block_size:
            raise ValueError(f"text of {len(ids)} characters is too short for block_size {block_size}")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, i):
        chunk = self.ids[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


# ---- the user's files --------------------------------------------------------------------------
def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path) -> torch.Tensor:
    """An IDX file (MNIST's format: magic 0x0000 <dtype> <ndim>, big-endian int32 sizes, data)."""
    path = Path(path)
    with _open_maybe_gz(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: (torch.uint8, 1, "B"), 0x09: (torch.int8, 1, "b"), 0x0B: (torch.int16, 2, ">h"),
              0x0C: (torch.int32, 4, ">i"), 0x0D: (torch.float32, 4, ">f"), 0x0E: (torch.float64, 8, ">d")}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    dtype, size, fmt = dtypes[data[2]]
    ndim = data[3]
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    count = 1
    for s in shape:
        count *= s
    body = data[4 + 4 * ndim:]
    if len(body) != count * size:
        raise ValueError(f"{path}: expected {count * size} bytes of data for shape {shape}, got {len(body)}")
    if size == 1:
        return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
    import numpy as np  # big-endian multi-byte types
    return torch.from_numpy(np.frombuffer(body, dtype=fmt).astype(fmt[1:])).reshape(shape)


def _find(root: Path, names) -> Optional[Path]:
    for folder in (root, root / "MNIST" / "raw", root / "mnist", root / "cifar-10-batches-py"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def find_mnist(data_dir, split: str = "train"):
    """(images path, labels path) of MNIST in data_dir, or None."""
    prefix = "train" if split == "train" else "t10k"
    root = Path(data_dir)
    images = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz",
                          f"{prefix}-images.idx3-ubyte"])
    labels = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz",
                          f"{prefix}-labels.idx1-ubyte"])
    return (images, labels) if images and labels else None


def mnist(data_dir, split: str = "train", image_size: int = 28, scale: str = "[0,1]"):
    """(images (N, 1, S, S) float32, labels (N,) int64) from the user's MNIST idx files."""
    found = find_mnist(data_dir, split)
    if found is None:
        raise FileNotFoundError(f"no MNIST {split} idx files in {data_dir} (expected e.g. "
                                f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz])")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST files disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    images = images.unsqueeze(1).float() / 255.0
    return _finish(images, image_size, scale), labels.long()


def find_cifar10(data_dir, split: str = "train"):
    root = Path(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [_find(root, [n]) for n in names]
    return [p for p in paths if p is not None] or None


def cifar10(data_dir, split: str = "train", image_size: int = 32, scale: str = "[0,1]"):
    """(images (N, 3, S, S) float32, labels (N,) int64) from the user's CIFAR-10 python batches."""
    paths = find_cifar10(data_dir, split)
    if paths is None:
        raise FileNotFoundError(f"no CIFAR-10 {split} batches in {data_dir} (expected "
                                f"{'data_batch_1..5' if split == 'train' else 'test_batch'})")
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        target = batch.get(b"labels", batch.get("labels"))
        images.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(target, dtype=torch.int64))
    images = torch.cat(images).float() / 255.0
    return _finish(images, image_size, scale), torch.cat(labels)


def images(data_dir=None, split: str = "train", image_size: int = 28, scale: str = "[0,1]",
           dataset: Optional[str] = None):
    """Images and labels: packaged digits without data_dir; else the user's MNIST or CIFAR-10
    (``dataset`` "mnist" / "cifar10", or None: MNIST if its files are there, else CIFAR-10)."""
    if data_dir is None:
        if dataset not in (None, "digits"):
            raise ValueError(f"dataset {dataset!r} needs data_dir (files are never downloaded)")
        return digits(split, image_size, scale)
    if dataset is None:
        dataset = "mnist" if find_mnist(data_dir, split) else "cifar10" if find_cifar10(data_dir, split) else None
        if dataset is None:
            raise FileNotFoundError(f"neither MNIST idx files nor CIFAR-10 batches found in {data_dir}")
    if dataset == "mnist":
        return mnist(data_dir, split, image_size, scale)
    if dataset == "cifar10":
        return cifar10(data_dir, split, image_size, scale)
    raise ValueError(f"dataset must be 'mnist', 'cifar10' or None, got {dataset!r}")
