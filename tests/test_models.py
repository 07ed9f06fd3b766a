"""The reference models (dlh_kernels.models): patched vs eager on every backend, training,
sampling, the data loaders, the PNG writer and the model commands of `dlh`.

CPU budget: small configs, batches of 1-16, one thread (tiny ops on a shared 2-core machine
lose more to OpenMP thread hand-offs than they gain), the Triton interpreter only on the
tiniest shapes. The two-process DDP runs are in test_models_ddp.py.
"""
import gzip
import json
import pickle
import struct
import zlib

import pytest
import torch

import dlh_kernels as dlh
from conftest import DEVICE, backend_param
from dlh_kernels import models as M
from dlh_kernels.models import data as D
from dlh_kernels.models.compare import compare, tolerance
from dlh_kernels.models.images import png_bytes, save_grid
from dlh_kernels.models.train import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- building -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", M.NAMES)
def test_build_forward_shapes(name):
    torch.manual_seed(0)
    model = M.build(name, small=True)
    batch = M.example_batch(name, 3, small=True, generator=torch.Generator().manual_seed(0))
    out = M.forward(name, model, batch)
    cfg = model.config
    image = (3, 1, getattr(cfg, "image_size", 0), getattr(cfg, "image_size", 0))
    expected = {
        "mlp": lambda: [(3,)], "cnn": lambda: [(3, 10)], "vit": lambda: [(3, 10)],
        "gpt": lambda: [(3, cfg.block_size, cfg.vocab_size)],
        "gan": lambda: [image, (3,)], "vae": lambda: [image, (3, cfg.latent), (3, cfg.latent)],
        "quick_unet": lambda: [image], "ddpm_unet": lambda: [image],
    }[name]()
    outs = list(out) if isinstance(out, tuple) else [out]
    assert [tuple(o.shape) for o in outs] == expected
    value = M.loss(name, model, batch)
    assert value.dim() == 0 and torch.isfinite(value)


def test_full_size_configs():
    """The sizes the issue names (built only: no forward at full size on the CPU)."""
    gpt = M.config("gpt")
    assert (gpt.n_embd, gpt.n_head, gpt.n_layer, gpt.block_size, gpt.dropout) == (384, 6, 6, 256, 0.2)
    cnn = M.build("cnn")
    assert cnn.classifier.in_features == 1568
    vit = M.config("vit")
    assert (vit.patch_size, vit.dim, vit.heads, vit.depth, vit.mlp_dim) == (7, 256, 8, 6, 768)
    gan = M.build("gan")
    assert [m.out_features for m in gan.generator.net if isinstance(m, torch.nn.Linear)] == [256, 512, 1024, 784]
    vae = M.build("vae")
    assert (vae.mu.in_features, vae.mu.out_features) == (400, 200)
    assert M.config("quick_unet").steps == 16 and M.config("quick_unet").image_size == 32
    with pytest.raises(ValueError, match="unknown config"):
        M.build("gpt", n_embed=3)
    with pytest.raises(ValueError, match="model must be one of"):
        M.build("resnet")


# ---- patched vs eager -----------------------------------------------------------------------
@pytest.mark.parametrize("name", M.NAMES)
def test_patched_matches_eager_torch_backend(name):
    """Outputs, loss and every gradient agree; the state_dict is the same object-for-value before
    the patch, after it and after unpatch."""
    torch.manual_seed(1)
    model = M.build(name, small=True).eval()
    before = _state(model)
    batch = M.example_batch(name, 2, model=model, generator=torch.Generator().manual_seed(2))
    eager = M.clone(model)
    report = dlh.patch(model, backend="torch")
    if name in ("cnn", "gpt", "vit", "quick_unet", "ddpm_unet"):
        assert report.replaced, f"dlh.patch found nothing to replace in {name}"
    assert _same_state(before, _state(model))
    from dlh_kernels.models.compare import differences
    diff = differences(name, eager, model, batch)
    tol = tolerance("cpu", torch.float32)
    assert diff["output"] <= tol and diff["loss"] <= tol, diff
    assert diff["grad"] <= tol, diff
    dlh.unpatch(model)
    assert _same_state(before, _state(model))


# Triton under the interpreter: the tiniest configs that still have every layer type.
TINY = {"cnn": {}, "gpt": dict(n_layer=1), "vit": dict(depth=1),
        "quick_unet": dict(channels=(2, 4, 4, 4), time_hidden=4, bottleneck=8),
        "ddpm_unet": dict(image_size=8, attn_resolutions=(4,), base=4, groups=2),
        "mlp": {}, "gan": {}, "vae": {}}


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("name", M.NAMES)
def test_patched_matches_eager_triton(name, backend):
    torch.manual_seed(3)
    model = M.build(name, small=True, **TINY[name])
    # on a GPU machine the Triton kernels run compiled, on CUDA tensors
    result = compare(name, batch_size=1, device=DEVICE.type, backend=backend, iters=0, model=model, seed=4)
    assert result["ok"], result


@pytest.mark.gpu
@pytest.mark.parametrize("name", M.NAMES)
def test_full_size_on_gpu(name):
    """Full-size model on CUDA, backend auto: same outputs and gradients (TF32 tolerance), and
    a training step that runs."""
    torch.manual_seed(5)
    result = compare(name, batch_size=8, device="cuda", backend="auto", iters=2, warmup=1)
    assert result["ok"], result
    model = M.build(name).cuda()
    dlh.patch(model)
    opt = M.make_optimizer(name, model)
    batch = M.example_batch(name, 8, "cuda", model=model)
    assert all(torch.isfinite(torch.tensor(M.train_step(name, model, opt, batch))) for _ in range(2))
    if name in M.SAMPLERS:
        images = M.sample(name, model, 2, "cuda", steps=4)
        assert images.shape[0] == 2 and 0 <= images.min() and images.max() <= 1


# ---- training -------------------------------------------------------------------------------
LR = {"cnn": 1e-2}  # the small CNN is slow to start at Adam's 1e-3


@pytest.mark.parametrize("name", M.NAMES)
def test_short_training_lowers_the_loss(name):
    """30 steps on the packaged data (digits, moons, stdlib text)."""
    result = train(name, steps=30, batch_size=16, small=True, progress=False, seed=0, lr=LR.get(name))
    losses = [h["loss"] for h in result["history"]]
    assert all(map(lambda v: v == v, losses))  # no NaN
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (name, losses)


def test_train_writes_log_and_checkpoint_then_sample(tmp_path, capsys):
    from dlh_kernels.cli import main
    out = tmp_path / "run"
    assert main(["train", "vae", "--small", "--steps", "3", "--batch-size", "8", "--no-progress",
                 "--out", str(out), "--device", "cpu"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["model"] == "vae" and len(log["history"]) == 3 and log["config"]["latent"] == 8
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seconds" and len(rows) == 4
    png = tmp_path / "grid.png"
    assert main(["sample", "vae", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(png),
                 "-n", "6", "--device", "cpu"]) == 0
    width, height, _ = _read_png(png.read_bytes())
    s = log["config"]["image_size"]
    assert (width, height) == (2 + 3 * (s + 2), 2 + 2 * (s + 2))  # 3 per row, 2 px apart
    with pytest.raises(SystemExit):  # the checkpoint holds a VAE
        main(["sample", "gan", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(png)])


@pytest.mark.parametrize("name", M.SAMPLERS)
def test_sample_writes_png(name, tmp_path):
    torch.manual_seed(6)
    model = M.build(name, small=True)
    gen = torch.Generator().manual_seed(7)
    images = M.sample(name, model, 4, steps=3, generator=gen)
    cfg = model.config
    assert images.shape == (4, 1, cfg.image_size, cfg.image_size)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    again = M.sample(name, model, 4, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(images, again)  # the generator fixes everything
    path = save_grid(images, tmp_path / f"{name}.png")
    assert _read_png(path.read_bytes())[:2] == (2 + 2 * (cfg.image_size + 2),) * 2


def test_ddpm_sampler_methods():
    model = M.build("ddpm_unet", small=True)
    for method in ("ddpm", "ddim"):
        images = M.sample("ddpm_unet", model, 2, steps=2, method=method, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt", "vit"])
def test_sample_refuses_non_generative(name):
    with pytest.raises(ValueError, match="not a generative model"):
        M.sample(name, M.build(name, small=True), 2)


def test_compare_command(capsys):
    from dlh_kernels.cli import main
    assert main(["compare", "cnn", "--small", "--device", "cpu", "--backend", "torch", "--iters", "2",
                 "--warmup", "1", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "eager" in text and "patched" in text and "match" in text and "ms/step" in text


# ---- PNG ------------------------------------------------------------------------------------
def _read_png(blob: bytes):
    """(width, height, pixels) of an 8-bit greyscale/RGB PNG, checking every chunk's CRC."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind, payload = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat += payload
        pos += 12 + length
        if kind == b"IEND":
            break
    width, height, depth, color, *_ = header
    assert depth == 8 and color in (0, 2)
    raw = zlib.decompress(idat)
    channels = 1 if color == 0 else 3
    assert len(raw) == height * (1 + width * channels)
    return width, height, raw


@pytest.mark.parametrize("channels", [1, 3])
def test_png_writer_without_pillow(channels, tmp_path):
    images = torch.rand(5, channels, 6, 4, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, tmp_path / "g.png", nrow=2, use_pillow=False)
    width, height, raw = _read_png(path.read_bytes())
    assert (width, height) == (2 + 2 * 6, 2 + 3 * 8)
    # the first image's top-left pixel sits at (2, 2); filter byte first on every scanline
    stride = 1 + width * channels
    got = raw[2 * stride + 1 + 2 * channels: 2 * stride + 1 + 3 * channels]
    assert list(got) == (images[0, :, 0, 0] * 255).round().to(torch.uint8).tolist()
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:  # Pillow reads ours back
        assert im.size == (width, height)


def test_png_bytes_rejects_odd_channel_counts():
    with pytest.raises(ValueError):
        save_grid(torch.rand(2, 2, 4, 4), "unused.png")
    assert png_bytes(torch.zeros(1, 1, 1, dtype=torch.uint8))[:8] == b"\x89PNG\r\n\x1a\n"


# ---- data -----------------------------------------------------------------------------------
def test_digits_transforms():
    x, y = D.digits("train", 28)
    assert x.shape == (1500, 1, 28, 28) and y.shape == (1500,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert x[:, :, :4].abs().sum() == 0 and x[:, :, :, -4:].abs().sum() == 0  # the 4-pixel frame
    x32, _ = D.digits("test", 32, "[-1,1]")
    assert x32.shape == (297, 1, 32, 32) and x32.min() >= -1 and x32[:, :, :6].eq(-1).all()
    x16, _ = D.digits("train", 16)
    assert x16.shape == (1500, 1, 16, 16)
    assert set(y.tolist()) == set(range(10))


def test_moons_and_text():
    x, y = D.moons("train")
    assert x.shape == (1000, 2) and set(y.tolist()) == {0.0, 1.0}
    ids = D.text_ids("train")
    assert ids.dtype == torch.int64 and 200_000 < len(ids) + len(D.text_ids("test")) < 2_000_000
    assert 0 <= ids.min() and ids.max() < len(D.VOCAB)
    assert torch.equal(ids[:100], D.encode(D._stdlib_text()[:100]))  # deterministic
    assert D.decode(D.encode("a\tb\u00e9")) == "a b?"
    ds = M.load_data("gpt", small=True)
    idx, targets = ds[5]
    assert idx.shape == (32,) and torch.equal(idx[1:], targets[:-1])


def _write_idx(path, array: torch.Tensor, gz: bool):
    code = {torch.uint8: 0x08, torch.int32: 0x0C}[array.dtype]
    header = struct.pack(">HBB", 0, code, array.dim()) + struct.pack(f">{array.dim()}i", *array.shape)
    body = array.numpy().astype(">i4").tobytes() if array.dtype == torch.int32 else array.numpy().tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader(tmp_path, gz):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), generator=gen, dtype=torch.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    x, y = D.mnist(tmp_path, "train")
    assert torch.allclose(x[:, 0], images.float() / 255) and torch.equal(y, labels.long())
    ds = M.load_data("ddpm_unet", data_dir=str(tmp_path))  # the full config: 32x32, [-1, 1]
    assert ds.tensors[0].shape == (7, 1, 32, 32) and ds.tensors[0].min() >= -1
    assert torch.allclose(ds.tensors[0][:, :, 2:-2, 2:-2], x * 2 - 1)
    assert M.data_config("vit", M.load_data("vit", data_dir=str(tmp_path)))["patch_size"] == 7
    with pytest.raises(FileNotFoundError):
        D.mnist(tmp_path, "test")


def test_idx_reader_multibyte_and_bad_files(tmp_path):
    values = torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3)
    _write_idx(tmp_path / "a.idx", values, False)
    assert torch.equal(D.read_idx(tmp_path / "a.idx"), values)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="bytes"):
        D.read_idx(tmp_path / "short.idx")


def test_cifar10_loader(tmp_path):
    import numpy as np
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches.append(batch)
    x, y = D.cifar10(tmp_path, "train")
    assert x.shape == (8, 3, 32, 32) and y.tolist() == [int(v) for v in batches[0][b"labels"] + batches[1][b"labels"]]
    first = torch.from_numpy(batches[0][b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(x[0], first)  # channel-major rows, as the batches store them
    ds = M.load_data("cnn", data_dir=str(tmp_path), split="test")
    assert ds.tensors[0].shape == (4, 3, 28, 28)
    cfg = M.data_config("quick_unet", M.load_data("quick_unet", data_dir=str(tmp_path)))
    assert cfg == {"in_channels": 3, "image_size": 32}
    model = M.build("quick_unet", small=True, **{**cfg, "image_size": 16})
    assert M.sample("quick_unet", model, 1, steps=1).shape == (1, 3, 16, 16)


def test_packaged_data_for_every_model():
    for name in M.NAMES:
        ds = M.load_data(name, small=True)
        items = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
        batch = M.batch_from_items(name, items)
        model = M.build(name, small=True)
        assert torch.isfinite(M.loss(name, model, batch))
    with pytest.raises(ValueError, match="data_dir"):
        D.images(None, dataset="mnist")
