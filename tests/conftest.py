"""Suite-wide setup: the Triton interpreter on machines without a GPU, the `gpu` marker, and the
one table of per-dtype tolerances with the comparison every op test uses."""
import os

import torch

# Must happen before anything imports triton: without a GPU, the Triton kernels run on CPU
# tensors through the interpreter. On a GPU machine they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def _interpreter_numpy_problem():
    """Triton 3.6's interpreter calls int() on 1-element numpy arrays, an error since numpy 2.3:
    every kernel with a runtime loop bound fails (seen with 3.6 and numpy 2.4; 3.9 is fine;
    3.7/3.8 untested, so treated like 3.6). Say it once, up front."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton
    tv = tuple(int(p) for p in triton.__version__.split(".")[:2])
    nv = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    if tv < (3, 9) and nv >= (2, 3):
        return (f"the Triton {triton.__version__} interpreter does not work with numpy "
                f"{numpy.__version__}: pip install 'numpy<2.3', or use Triton >= 3.9")
    return None


DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_param(name: str, no_kernel: str = ""):
    """A pytest parameter for one backend, skipped (with the reason) where it cannot run here.
    no_kernel: why this op has no kernel on that backend (skipped everywhere)."""
    if no_kernel:
        return pytest.param(name, marks=pytest.mark.skip(reason=no_kernel))
    import dlh_kernels as dlh
    reason = dlh.backends()[name] if DEVICE.type == "cuda" else (
        "available" if name != "cuda" else "the cuda backend needs CUDA tensors")
    return pytest.param(name, marks=pytest.mark.skipif(reason != "available", reason=reason))


@pytest.fixture
def poison_outputs():
    """Every kernel output starts as NaN: an element a kernel does not write fails the test.
    Op test modules turn it on for all their tests (pytestmark)."""
    from dlh_kernels import _alloc
    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)


def pytest_configure(config):
    problem = _interpreter_numpy_problem()
    if problem:
        raise pytest.UsageError(problem)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")
    config.addinivalue_line("markers", "slow: left out of the developer's quick run (-m 'not slow')")


# The files that take most of the suite's time on a 2-core CPU (launch-exact compiles, the CUDA
# emulation's mutation builds, multi-process training, the tuning loop): the quick run
# `python -m pytest -q tests -m "not slow"` leaves them out; CI runs everything.
SLOW_FILES = {"test_triton_compile.py", "test_cuda_emulation.py", "test_models_ddp.py", "test_autotune.py",
              "test_cuda_build.py", "test_cuda_attention.py"}
# and the tests of the other files that took a second or more in a full run here
# (`python -m pytest -q tests --durations=0`), all their parametrizations; "*" is any file
SLOW_TESTS = {
    "*::test_opcheck", "*::test_compile_fullgraph", "*::test_split_path",
    "test_layer_norm.py::test_huge_rows", "test_models.py::test_patched_matches_eager_triton",
    "test_models.py::test_short_training_lowers_the_loss",
    "test_patch_models.py::test_triton_interpreter_within_tolerance_of_float64",
    "test_patch_models.py::test_patched_llama_under_torch_compile",
    "test_conv2d.py::test_model_shapes", "test_conv2d.py::test_weight_grad_split_over_pixels",
    "test_conv2d.py::test_patch_fuses_conv_and_activation", "test_conv2d.py::test_depthwise_fp16",
    "test_attention.py::test_heads_folded_over_grid_y_and_z", "test_attention.py::test_masks",
    "test_attention.py::test_gqa", "test_attention.py::test_gqa_bf16_causal",
    "test_attention.py::test_backward_is_deterministic",
    "test_attention.py::test_atomic_dq_matches_and_deterministic_overrides_it",
    "test_activation.py::test_unary_cuda_emulated",
    "test_diffusion_schedulers.py::test_import_without_diffusers",
    "test_framework.py::test_import_does_not_initialise_cuda_or_need_the_extension",
    "test_cli.py::test_patch_backend_triton_without_interpreter", "test_cli.py::test_console_command_exit_code_and_stderr",
    "test_check.py::test_the_command_turns_the_interpreter_on_itself", "test_check.py::test_quick_check_every_path",
    "test_bench.py::test_sanitize_cases_run_on_cpu", "test_bench.py::test_coldstart_one_tiny_op",
    "test_bench.py::test_gpu_session_checks_run_every_group_and_flush_after_each",
}


def _is_slow(item) -> bool:
    name = getattr(item, "originalname", item.name)
    return (item.path.name in SLOW_FILES or f"{item.path.name}::{name}" in SLOW_TESTS
            or f"*::{name}" in SLOW_TESTS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tolerances, in one place. A kernel's error against the float64 reference (max abs error,
# divided by max(1, max |reference|)) must be at most FACTOR times the error eager PyTorch makes
# in the same dtype, plus FLOOR[dtype] for the cases where eager happens to be nearly exact.
# fp32 math everywhere: fp32 inputs land within a few ulps; fp16/bf16 are dominated by the final
# rounding of the output (2^-11 and 2^-8 relative), which FLOOR covers once.
FACTOR = 2.0
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def scaled_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out = out.double()
    assert torch.isfinite(out).all(), "non-finite values in the output (an unwritten element?)"
    scale = max(1.0, ref.abs().max().item())
    return (out - ref).abs().max().item() / scale


def assert_close(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype,
                 what: str = "output") -> None:
    """out: our result; ref: float64 reference; eager: eager PyTorch in `dtype`."""
    err, base = scaled_error(out, ref), scaled_error(eager, ref)
    bound = FACTOR * base + FLOOR[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (eager {dtype} error {base:.3g})"


def record_grids(monkeypatch, module, names) -> list:
    """Replace the Triton kernels `names` of `module` by stand-ins that record each launch's
    grid, padded to 3 axes, as (name, (x, y, z)), and run nothing: the interpreter has no grid
    limit, so tests of CUDA's (x < 2^31, y and z <= 65,535) check the grids the glue computes
    for shapes too big to interpret."""
    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((self.name, tuple(grid) + (1,) * (3 - len(grid))))
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Recorder(name))
    return grids


def assert_grids_fit(grids, names) -> None:
    assert {n for n, _ in grids} == set(names), f"launched {sorted({n for n, _ in grids})}"
    for name, (x, y, z) in grids:
        assert x <= 2**31 - 1 and y <= 65535 and z <= 65535, f"{name}: grid {(x, y, z)}"
