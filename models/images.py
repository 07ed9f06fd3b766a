"""Image grids as PNG files: Pillow when it is installed, else a small PNG writer of our own
(8-bit greyscale or RGB, one IDAT chunk, zlib from the standard library)."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Optional

import torch


def grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) uint8 image, nrow images per row, pad px apart."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = torch.zeros(c, pad + rows * (h + pad), pad + nrow * (w + pad))
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = img
    return (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A PNG file of an (H, W, C) uint8 image, C = 1 (greyscale) or 3 (RGB)."""
    h, w, c = pixels.shape
    color_type = {1: 0, 3: 2}[c]
    raw = pixels.numpy().tobytes() if hasattr(pixels, "numpy") else bytes(pixels)
    stride = w * c
    # every scanline starts with its filter type (0: none)
    lines = b"".join(b"\x00" + raw[y * stride:(y + 1) * stride] for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(lines, 9))
            + _chunk(b"IEND", b""))


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, use_pillow: bool = True) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = grid(images, nrow)
    try:
        if not use_pillow:
            raise ImportError
        from PIL import Image
    except ImportError:
        path.write_bytes(png_bytes(pixels))
        return path
    array = pixels.numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path, format="PNG")
    return path
