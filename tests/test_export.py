"""fxprune.export: ONNX export checked with ONNX Runtime, TensorRT's operator coverage, engine builds.

The TensorRT build logic runs here against a stand-in for the ``tensorrt`` module that records what
it is asked; real engines are built and run only where ``tensorrt`` and CUDA are available.
"""
from __future__ import annotations

import enum
import functools
import importlib.util
import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

import fxprune
from fxprune.errors import ExportError
from fxprune.export import TensorRTModule, to_onnx, to_tensorrt, unsupported_by_tensorrt
from fxprune.zoo import randomize_constants, torchvision_models

needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="tensorrt and CUDA are needed",
)


class CharModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear; with ``states`` it returns (logits, (h_n, c_n))."""

    def __init__(self, states: bool = False):
        super().__init__()
        self.states = states
        self.embed, self.lstm, self.head = nn.Embedding(11, 8), nn.LSTM(8, 6, num_layers=2, batch_first=True), nn.Linear(6, 11)

    def forward(self, x):
        y, hc = self.lstm(self.embed(x))
        return (self.head(y), hc) if self.states else self.head(y)


class LinearNorm(nn.Module):
    """Linear + BatchNorm1d, which the ONNX exporter does not fold by itself, then dropout."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.2), nn.ReLU())

    def forward(self, x):
        return self.net(x)


class Tuple(nn.Module):
    def forward(self, x):
        return x * 2, [x.sum(1), torch.relu(x)]


@functools.lru_cache(maxsize=None)
def compacted(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A model, compacted keeping every other channel of each prunable group, and its input."""
    torch.manual_seed(0)
    if name == "lstm":
        model, x = randomize_constants(CharModel()).eval(), torch.randint(0, 11, (1, 5))
    else:
        model = randomize_constants(getattr(torchvision_models(), name)(num_classes=10)).eval()
        x = torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(model, x)
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in analysis.groups if g.prunable}
    return fxprune.compact(model, masks, x), x


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def run_onnx(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- ONNX


def test_compacted_resnet18_round_trip(tmp_path):
    small, x = compacted("resnet18")
    path = to_onnx(small, x, tmp_path / "resnet18.onnx")
    model = onnx.load(str(path))
    assert dims(model.graph.input[0]) == ["batch", 3, 64, 64] and dims(model.graph.output[0]) == ["batch", 10]
    assert "BatchNormalization" not in op_types(path) and "Conv" in op_types(path)
    x3 = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = small(x3)
    (got,) = run_onnx(path, x3)
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_static_batch(tmp_path):
    small, x = compacted("resnet18")
    model = onnx.load(str(to_onnx(small, x, tmp_path / "static.onnx", dynamic_batch=False)))
    assert dims(model.graph.input[0]) == [1, 3, 64, 64]


def test_fuse_folds_what_the_exporter_keeps(tmp_path):
    torch.manual_seed(0)
    model, x = randomize_constants(LinearNorm()), torch.randn(4, 6)
    assert "BatchNormalization" in op_types(to_onnx(model, x, tmp_path / "plain.onnx", fuse=False))
    assert op_types(to_onnx(model, x, tmp_path / "fused.onnx")) == {"Gemm", "Relu"}


def test_model_is_not_changed(tmp_path):
    torch.manual_seed(0)
    model, x = randomize_constants(LinearNorm()).train(), torch.randn(4, 6)
    model.net[2].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    for fuse in True, False:
        to_onnx(model, x, tmp_path / f"{fuse}.onnx", fuse=fuse)
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_tuple_outputs(tmp_path):
    x = torch.randn(2, 4)
    path = to_onnx(Tuple(), x, tmp_path / "tuple.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output_0", "output_1", "output_2"]
    got = run_onnx(path, x)
    for g, e in zip(got, [x * 2, x.sum(1), torch.relu(x)]):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-6)


def test_several_inputs_one_unused(tmp_path):
    class TwoInputs(nn.Module):
        def forward(self, a, b, unused):
            return a @ b

    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 1)
    path = to_onnx(TwoInputs(), (a, b, c), tmp_path / "two.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_0", "input_1"]
    np.testing.assert_allclose(run_onnx(path, a, b)[0], (a @ b).numpy(), rtol=1e-5, atol=1e-6)


def test_mismatch_names_the_output(tmp_path, monkeypatch):
    run = ort.InferenceSession.run

    def off_by_one(self, names, feeds, *args):
        outputs = run(self, names, feeds, *args)
        outputs[1] = outputs[1] + 1
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_one)
    with pytest.raises(ExportError, match=r"ONNX output 'output_1' differs from PyTorch \(batch 2\): largest difference 1\b"):
        to_onnx(Tuple(), torch.randn(2, 4), tmp_path / "tuple.onnx")


class FoldedTwin(nn.Module):
    """Linear + BatchNorm (folded into the Linear at export) minus the same map folded by hand: half
    the outputs are float32 rounding noise, next to outputs of about 1e3."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc, self.bn, self.twin = nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(64, 8)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(8, 64, generator=g) * 10)
            self.bn.running_mean.copy_(torch.randn(8, generator=g))
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.1)
            self.bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
            self.twin.weight.copy_(self.fc.weight * scale[:, None])
            self.twin.bias.copy_((self.fc.bias - self.bn.running_mean) * scale + self.bn.bias)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return torch.cat([y - self.twin(x), y], 1)


def test_check_is_relative_to_the_largest_output(tmp_path):
    """Regression: the check compared element by element (``atol + rtol * |torch|``), so folding
    BatchNorm failed it where an output is near zero: compacted resnet50 with random weights,
    "largest difference 1.41e-05 ... rtol=0.0001, atol=1e-05"."""
    model, x = FoldedTwin().eval(), torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 10
    path = to_onnx(model, x, tmp_path / "twin.onnx", dynamic_batch=False)
    (got,) = run_onnx(path, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert not np.allclose(got, want, rtol=1e-4, atol=1e-5)  # what the old check demanded
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(ExportError, match=r"above atol \+ rtol \* max\|PyTorch\| = 0 \(rtol=0, atol=0, max\|PyTorch\| = 2"):
        to_onnx(model, x, tmp_path / "exact.onnx", dynamic_batch=False, rtol=0, atol=0)


@pytest.mark.parametrize("rtol, atol, passes", [(1e-3, 0, True), (0.9e-3, 0, False), (0, 0.5, True), (0, 0.4, False)])
def test_tolerance_is_atol_plus_rtol_times_the_largest_output(tmp_path, monkeypatch, rtol, atol, passes):
    """ONNX Runtime's second output is made off by 0.5 where PyTorch gives 0 and max|PyTorch| is 500."""
    run = ort.InferenceSession.run

    def off(self, names, feeds, *args):
        outputs = run(self, names, feeds, *args)
        outputs[0] = outputs[0] + np.where(outputs[0] == 0, 0.5, 0).astype(outputs[0].dtype)
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", off)
    x = torch.tensor([[0.0, 250.0, -1.0]])
    if passes:
        to_onnx(Tuple(), x, tmp_path / "tuple.onnx", rtol=rtol, atol=atol)
    else:
        with pytest.raises(ExportError, match=r"'output_0' .* largest difference 0.5 at index \(0, 0\)"):
            to_onnx(Tuple(), x, tmp_path / "tuple.onnx", rtol=rtol, atol=atol)


@pytest.mark.parametrize("tolerance", [{"rtol": -1e-4}, {"atol": float("nan")}, {"atol": float("inf")}])
def test_tolerances_must_be_non_negative_numbers(tmp_path, tolerance):
    with pytest.raises(ValueError, match="rtol and atol must be finite and non-negative"):
        to_onnx(Tuple(), torch.randn(2, 4), tmp_path / "tuple.onnx", **tolerance)


def test_submodules_load_on_first_use():
    """``import fxprune`` then ``fxprune.export.to_onnx`` works; neither export nor methods is imported
    before it is used."""
    code = ("import sys, fxprune; lazy = ('fxprune.export', 'fxprune.methods', 'onnx'); "
            "assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]; "
            "assert callable(fxprune.export.to_onnx) and fxprune.methods.GrowEfficient and 'fxprune.export' in sys.modules; "
            "assert 'export' in dir(fxprune)\n"
            "try:\n    fxprune.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
            "else:\n    raise AssertionError")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compacted_lstm(tmp_path):
    small, x = compacted("lstm")
    path = to_onnx(small, x, tmp_path / "lstm.onnx")
    assert "LSTM" in op_types(path)
    x3 = torch.randint(0, 11, (3, 5))
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, x3)[0], small(x3).numpy(), rtol=1e-4, atol=1e-5)


def test_lstm_states_batch_axis(tmp_path):
    """h_n and c_n are (layers, batch, hidden): their dynamic axis is dim 1."""
    torch.manual_seed(0)
    model, x = CharModel(states=True).eval(), torch.randint(0, 11, (1, 5))
    model = onnx.load(str(to_onnx(model, x, tmp_path / "states.onnx")))
    assert [dims(o) for o in model.graph.output] == [["batch", 5, 11], [2, "batch", 6], [2, "batch", 6]]


# --------------------------------------------------------------------------- TensorRT operator coverage


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "lstm"])
def test_compacted_models_use_only_tensorrt_ops(name, tmp_path):
    small, x = compacted(name)
    path = to_onnx(small, x, tmp_path / f"{name}.onnx")
    assert op_types(path) and unsupported_by_tensorrt(path) == []


def graph_with(*op_types: str, subgraph: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A model whose nodes have these op types, the last one holding a subgraph of ``subgraph``."""
    nodes = [helper.make_node(op, ["x"], ["x"]) for op in op_types]
    if subgraph:
        body = helper.make_graph([helper.make_node(op, ["x"], ["x"]) for op in subgraph], "body", [], [])
        nodes.append(helper.make_node("If", ["c"], ["x"], then_branch=body, else_branch=body))
    return helper.make_model(helper.make_graph(nodes, "g", [], []))


@pytest.mark.parametrize("model, expected", [
    (graph_with("Conv", "Relu", "Gemm"), []),
    (graph_with("Conv", "Det", "Det", "MatMulInteger"), ["Det", "MatMulInteger"]),
    (graph_with("Relu", subgraph=("Unique", "Relu")), ["Unique"]),
])
def test_unsupported_by_tensorrt(model, expected):
    assert unsupported_by_tensorrt(model) == expected


# --------------------------------------------------------------------------- TensorRT build logic


class TrtSeverity(enum.Enum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


def stand_in_tensorrt(parse_errors: tuple[str, ...] = (), build_error: str | None = None):
    """A module with the parts of tensorrt's API that to_tensorrt uses, and a dict of its calls."""
    calls: dict = {"shapes": {}, "flags": []}

    class ILogger:
        Severity = TrtSeverity

        def __init__(self):
            pass

    class Network:
        inputs: list = []
        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, len(parse_errors)

        def parse_from_file(self, path):
            self.network.inputs = [i.name for i in onnx.load(path).graph.input]
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profiles"] = calls.get("profiles", 0) + 1

    class Profile:
        def set_shape(self, name, *shapes):
            calls["shapes"][name] = shapes

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            calls["builders"] = calls.get("builders", 0) + 1

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if build_error:
                self.logger.log(TrtSeverity.INFO, "building")
                self.logger.log(TrtSeverity.ERROR, build_error)
                return None
            return b"engine"

    trt = types.ModuleType("tensorrt")
    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
    return trt, calls


def test_to_tensorrt_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(ImportError, match=r"fxprune.export needs tensorrt: pip install 'fxprune\[tensorrt\]'"):
        to_tensorrt(Tuple(), torch.randn(2, 4), tmp_path / "model.engine")
    with pytest.raises(ImportError, match="needs tensorrt"):
        TensorRTModule(tmp_path / "model.engine")


def test_to_tensorrt_builds_with_profile(tmp_path, monkeypatch):
    trt, calls = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    small, x = compacted("resnet18")
    path = to_tensorrt(small, x, tmp_path / "resnet18.engine", max_batch=8, workspace=1 << 20)
    assert path.read_bytes() == b"engine"
    assert calls["shapes"] == {"input": ((1, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 64))}
    assert calls["flags"] == ["fp16"] and calls["workspace"] == ("workspace", 1 << 20) and calls["profiles"] == 1


def test_to_tensorrt_matches_inputs_by_name(tmp_path, monkeypatch):
    trt, calls = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    class SecondOnly(nn.Module):
        def forward(self, unused, x):
            return x + 1

    to_tensorrt(SecondOnly(), (torch.randn(2, 7), torch.randn(2, 4)), tmp_path / "m.engine", fp16=False, opt_batch=4, max_batch=16)
    assert calls["shapes"] == {"input_1": ((1, 4), (4, 4), (16, 4))} and calls["flags"] == []


def test_to_tensorrt_reports_unsupported_ops_before_building(tmp_path, monkeypatch):
    trt, calls = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx.save(graph_with("Relu", "Det", subgraph=("Unique",)), str(tmp_path / "det.onnx"))
    with pytest.raises(ExportError, match="does not support Det, Unique"):
        to_tensorrt(tmp_path / "det.onnx", torch.randn(1, 4), tmp_path / "det.engine")
    assert "builders" not in calls


def test_to_tensorrt_reports_parser_errors(tmp_path, monkeypatch):
    trt, _ = stand_in_tensorrt(parse_errors=("In node 3 (Conv): weights must be an initializer", "second"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=r"cannot parse .*\nIn node 3 \(Conv\): weights must be an initializer\nsecond$"):
        to_tensorrt(Tuple(), torch.randn(2, 4), tmp_path / "m.engine")


def test_to_tensorrt_reports_build_errors(tmp_path, monkeypatch):
    trt, _ = stand_in_tensorrt(build_error="out of memory")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=r"could not build the engine:\n\[ERROR\] out of memory$"):
        to_tensorrt(Tuple(), torch.randn(2, 4), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_int8_needs_scales(tmp_path, monkeypatch):
    trt, calls = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match="int8=True needs a calibrator"):
        to_tensorrt(Tuple(), torch.randn(2, 4), tmp_path / "m.engine", int8=True)
    assert "builders" not in calls


@pytest.mark.parametrize("bad", [dict(min_batch=0), dict(min_batch=4, opt_batch=2), dict(opt_batch=8, max_batch=4)])
def test_batch_range_is_checked(bad, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt()[0])
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        to_tensorrt(Tuple(), torch.randn(2, 4), tmp_path / "m.engine", **bad)


# --------------------------------------------------------------------------- TensorRT on a GPU


@needs_tensorrt
@pytest.mark.parametrize("fp16, rel", [(False, 1e-3), (True, 3e-2)])
def test_tensorrt_engine_matches_torch(fp16, rel, tmp_path):
    small, x = compacted("resnet18")
    engine = TensorRTModule(to_tensorrt(small, x, tmp_path / "resnet18.engine", fp16=fp16, max_batch=4))
    for batch in 1, 4:
        xb = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = small(xb)
        got = engine(xb.cuda()).cpu()
        assert got.shape == expected.shape
        assert (got.float() - expected).abs().max() <= rel * expected.abs().max()


@needs_tensorrt
def test_tensorrt_tuple_outputs(tmp_path):
    x = torch.randn(2, 4)
    engine = TensorRTModule(to_tensorrt(Tuple(), x, tmp_path / "tuple.engine", fp16=False))
    got = engine(x.cuda())
    assert isinstance(got, tuple) and len(got) == 3
    for g, e in zip(got, [x * 2, x.sum(1), torch.relu(x)]):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-5, atol=1e-5)
