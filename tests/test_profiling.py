"""NVTX ranges without a GPU: the push/pop functions profiling resolves are replaced by recorders,
and tiny ops and models run with profiling on (on a CPU: the triton backend through the
interpreter; the torch backend, which calls torch.nn.functional directly, records its own range);
the names, their nesting, and the CUDA profiler calls around the measured steps are what an
Nsight run would see."""
import pytest
import torch

from conftest import DEVICE

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels import profiling


BE = "triton"
pytestmark = pytest.mark.skipif(dlh.backends()["triton"] != "available" and DEVICE.type == "cuda",
                                reason="needs the triton backend")


@pytest.fixture
def events(monkeypatch):
    """Everything profiling emits, in order: ("push", name), ("pop",), ("start",), ("stop",)."""
    log = []
    monkeypatch.setattr(profiling, "_push", lambda name: log.append(("push", name)))
    monkeypatch.setattr(profiling, "_pop", lambda: log.append(("pop",)))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: log.append(("start",)))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: log.append(("stop",)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return log


def tree(log):
    """The ranges as nested (name, children) pairs; asserts every push is popped."""
    root, stack = ("", []), []
    stack.append(root)
    for e in log:
        if e[0] == "push":
            node = (e[1], [])
            stack[-1][1].append(node)
            stack.append(node)
        elif e[0] == "pop":
            assert len(stack) > 1, "pop without push"
            stack.pop()
    assert len(stack) == 1, f"unclosed ranges: {[n for n, _ in stack[1:]]}"
    return root[1]


def test_off_by_default_costs_no_range(events):
    x = torch.randn(4, 8, device=DEVICE)
    DF.layer_norm(x, (8,), backend=BE)
    assert events == []


def test_op_range_names_backend(events):
    x = torch.randn(4, 8, device=DEVICE)
    with profiling.nvtx():
        DF.layer_norm(x, (8,), backend=BE)
        DF.gelu(x, backend=BE)
    assert tree(events) == [("dlh::layer_norm[triton]", []), ("dlh::gelu[triton]", [])]


def test_torch_backend_records_its_ranges(events):
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    with profiling.nvtx():
        DF.layer_norm(x, (6,), backend="torch")
        DF.add_rms_norm(x, x, (6,), backend="torch")
        DF.gelu(x, backend="torch")
        DF.geglu(x, backend="torch")
        DF.linear_gelu(x, torch.randn(3, 6, device=DEVICE), backend="torch")
        DF.group_norm(x, 2, backend="torch", activation="silu")
        DF.conv2d(x, w, padding=1, backend="torch")
        DF.scaled_dot_product_attention(q, q, q, backend="torch")
    DF.layer_norm(x, (6,), backend="torch")  # profiling off again: nothing
    names = ["layer_norm", "add_rms_norm", "gelu", "geglu", "linear_gelu", "group_norm", "conv2d",
             "scaled_dot_product_attention"]
    assert tree(events) == [(f"dlh::{n}[torch]", []) for n in names]


def test_profile_steps_brackets_only_the_measured_steps(events):
    x = torch.randn(4, 8, device=DEVICE)
    calls = []

    def step():
        calls.append(profiling.enabled())
        return DF.rms_norm(x, (8,), backend=BE)

    profiling.profile_steps(step, warmup=2, iters=2, cuda=True)
    assert calls == [False, False, True, True]  # warm-up without ranges
    start, stop = events.index(("start",)), events.index(("stop",))
    assert all(e[0] not in ("push", "pop") for e in events[:start] + events[stop + 1:])
    assert tree(events[start + 1:stop]) == [
        ("dlh::step 0", [("dlh::rms_norm[triton]", [])]),
        ("dlh::step 1", [("dlh::rms_norm[triton]", [])]),
    ]
    assert not profiling.enabled()


def test_model_layers_nest_around_ops(events):
    torch.manual_seed(0)
    # Linear, then LayerNorm and GELU: two swapped modules, none fused with the Linear
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU()).to(DEVICE)
    report = dlh.patch(model, backend=BE)
    assert len(report.replaced) == 2
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)

    def step():
        model(x).sum().backward()

    profiling.profile_steps(step, warmup=1, iters=1, model=model, cuda=False)
    assert ("start",) not in events  # cuda=False: a dry run, no profiler calls
    (step0,) = tree(events)
    assert step0[0] == "dlh::step 0"
    top = step0[1][0]
    assert top[0] == "Sequential"
    layers = [name for name, _ in top[1]]
    assert layers == ["Sequential.0", "Sequential.1", "Sequential.2"]
    assert top[1][0][1] == []                                     # Linear: no dlh op
    assert top[1][1][1] == [("dlh::layer_norm[triton]", [])]      # the op inside its layer
    assert top[1][2][1] == [("dlh::gelu[triton]", [])]
    # the backward's kernels record their own op ranges, outside the layers' forward ranges
    backward = [name for name, _ in step0[1][1:]]
    assert backward and all(name.startswith("dlh::") for name in backward)
    # the hooks are gone after the run
    events.clear()
    with profiling.nvtx():
        model(x)
    assert [e[1] for e in events if e[0] == "push"] == ["dlh::layer_norm[triton]", "dlh::gelu[triton]"]


def test_layer_range_closes_when_forward_raises(events):
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = torch.nn.Sequential(Boom())
    with profiling.module_ranges(model), profiling.nvtx():
        with pytest.raises(RuntimeError):
            model(torch.zeros(1))
    assert tree(events) == [("Sequential", [("Sequential.0", [])])]


def test_ncu_filter_escapes_and_domain():
    assert profiling.ncu_filter("dlh::attention[triton]", "dlh") == "dlh@dlh::attention\\[triton\\]/"
    assert profiling.ncu_filter("dlh::step 0", None) == "dlh::step 0/"
    assert profiling.ncu_filter("a/b@c", None) == "a\\/b\\@c/"


def test_cli_profile_dry_run_on_cpu(events, capsys):
    from dlh_kernels import cli
    rc = cli.main(["profile", "gelu", "--device", DEVICE.type, "--backend", "triton", "--iters", "2",
                   "--warmup", "1", "--size", "tiny", "--dtype", "fp32"])
    assert rc == 0
    names = [e[1] for e in events if e[0] == "push"]
    assert names.count("dlh::gelu[triton]") == 2 and "dlh::gelu_backward[triton]" in names
    out = capsys.readouterr().out
    assert "--capture-range=cudaProfilerApi" in out
    assert "--nvtx-include" in out and "dlh::gelu\\[triton\\]/" in out and "--clock-control none" in out


def test_cli_profile_without_gpu_says_so(capsys):
    from dlh_kernels import cli
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["profile", "layer_norm"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
