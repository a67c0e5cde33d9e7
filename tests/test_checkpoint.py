"""fxprune.checkpoint: rewritten models saved as data, loaded in a fresh process without their code.

The fixed cases (compacted torchvision models, recurrent stacks, pruned attention, tied weights,
masked modules) and a set of random rewritten architectures are loaded by one fresh Python process
each that imports only torch and fxprune; more random architectures from tests/strategies.py
round-trip in process. Damaged, foreign and disallowed files
must raise CheckpointError.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune.checkpoint import load, save
from fxprune.errors import CheckpointError
from fxprune.modules.attention import PrunedMultiheadAttention
from fxprune.modules.masked import MaskedModule
from fxprune.modules.recurrent import RecurrentStack
from fxprune.zoo import torchvision_models
from strategies import model_specs, sequence_specs
from test_layer_properties import grow_or_refuse
from test_properties import draw_case, quiet_compact
from test_sequence_properties import draw_masks

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

# Half the profile's examples: each builds, analyses and rewrites a model (about 50 ms).
PROPERTY = settings(max_examples=max(5, settings.default.max_examples // 2))


def keep(n: int, *kept: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(kept)] = True
    return mask


def describe(gm) -> dict:
    """What a round trip must keep, as JSON: the generated code, module classes and modes,
    parameters (requires_grad, and the first name of the same tensor object), buffers and the
    state_dict keys. Also run by the fresh process, from this function's source."""
    first: dict = {}
    return {
        "class": type(gm).__name__,
        "code": gm.code,
        "modules": [[n, f"{type(m).__module__}.{type(m).__qualname__}", m.training]
                    for n, m in gm.named_modules() if n],
        "parameters": [[n, p.requires_grad, first.setdefault(id(p), n)]
                       for n, p in gm.named_parameters(remove_duplicate=False)],
        "buffers": [n for n, _ in gm.named_buffers(remove_duplicate=False)],
        "state_dict": list(gm.state_dict()),
        "module_stacks": [list(n.meta.get("nn_module_stack", {})) for n in gm.graph.nodes],  # fxprune's layer names
    }


def assert_same_bits(got, want, what: str) -> None:
    got, want = tree_flatten(got)[0], tree_flatten(want)[0]
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for a, b in zip(got, want):
        if not isinstance(b, torch.Tensor):
            assert a == b, what
            continue
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{what}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        bits = lambda t: t.detach().reshape(-1).view(torch.uint8)  # noqa: E731  (-0.0 and NaN payloads count)
        assert torch.equal(bits(a), bits(b)), f"{what}: values differ"


def run(model, inputs: tuple):
    with torch.no_grad():  # on copies: a model may change its input in place (an in-place activation)
        return model(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])


def round_trip(gm: torch.fx.GraphModule, path) -> torch.fx.GraphModule:
    save(gm, path)
    return load(path)


# --------------------------------------------------------------------------------------------
# Models

class LanguageModel(nn.Module):
    """Embedding -> 2-layer bidirectional RNN -> Linear."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = rnn(6, 5, num_layers=2, bidirectional=True)
        self.head = nn.Linear(10, 11)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.attn = nn.MultiheadAttention(12, 4, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


class TiedDecoder(nn.Module):
    """The decoder shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 11)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(torch.relu(self.fc(self.emb(x))))


class Residual(nn.Module):
    """``x + body(x)``: fxprune names the layer after this module, not after ``body``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))

    def forward(self, x):
        return x + self.body(x)


TOKENS = torch.randint(0, 11, (4, 2), generator=torch.Generator().manual_seed(0))
# different widths per layer and direction: layer 0's directions become separate modules
STACK_MASKS = {"rnn.hidden_l0": keep(5, 0, 1, 2), "rnn.hidden_l0_reverse": keep(5, 0, 4),
               "rnn.hidden_l1": keep(5, 1, 2), "rnn.hidden_l1_reverse": keep(5, 1, 3)}
HEAD_MASKS = {"attn.heads": keep(4, 0, 3)}


def every_other_channel(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) % 2 == 0 for g in fxprune.analyze(model, x).groups if g.prunable}


def torchvision(name: str):
    torch.manual_seed(0)
    model, x = getattr(torchvision_models(), name)(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    return fxprune.compact(model, every_other_channel(model, x), x), (x,)


def residual():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), Residual(), Residual()).eval(), torch.randn(1, 3, 6, 6)
    return fxprune.compact(model, {"1.body.0": keep(6, 0, 2, 5)}, x), (x,)


def lstm_stack():
    torch.manual_seed(0)
    small = fxprune.compact(LanguageModel().eval(), STACK_MASKS, TOKENS)
    small.train()  # mixed modes and a frozen parameter must survive
    small.head.eval()
    small.emb.weight.requires_grad_(False)
    return small, (TOKENS,)


def gru():
    torch.manual_seed(0)
    masks = {name: keep(5, 0, 3, 4) for name in STACK_MASKS}  # equal widths: stays an nn.GRU
    return fxprune.compact(LanguageModel(nn.GRU).eval(), masks, TOKENS), (TOKENS,)


def attention(masked: bool = False):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    rewrite = fxprune.apply_masks if masked else fxprune.compact
    return rewrite(SelfAttention().eval(), HEAD_MASKS, x), (x,)


def tied():
    torch.manual_seed(0)
    return fxprune.compact(TiedDecoder().eval(), {"emb": keep(6, 0, 2, 3)}, TOKENS), (TOKENS,)


def masked_lstm():
    torch.manual_seed(0)
    return fxprune.apply_masks(LanguageModel().eval(), STACK_MASKS, TOKENS), (TOKENS,)


CASES = {
    "resnet18": lambda: torchvision("resnet18"),
    "mobilenet_v2": lambda: torchvision("mobilenet_v2"),  # depthwise convolutions
    "residual": residual,
    "lstm_stack": lstm_stack,
    "gru": gru,
    "attention": attention,
    "tied": tied,
    "masked_lstm": masked_lstm,
    "masked_attention": lambda: attention(masked=True),
}
EXPECTED_MODULES = {  # a class each case must contain (what makes the case)
    "lstm_stack": RecurrentStack, "gru": nn.GRU, "attention": PrunedMultiheadAttention,
    "masked_lstm": MaskedModule, "masked_attention": MaskedModule,
}


# --------------------------------------------------------------------------------------------
# Round trip in a fresh process

FRESH = """
import json, sys
import torch
from fxprune.checkpoint import load

{describe}

threads, folder, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
torch.set_num_threads(threads)  # the parent's: bitwise equal outputs need the same kernels
report = {{}}
for name in names:
    gm = load(f"{{folder}}/{{name}}.fxp")
    inputs = torch.load(f"{{folder}}/{{name}}.inputs.pt", weights_only=True)
    with torch.no_grad():
        torch.save(gm(*inputs), f"{{folder}}/{{name}}.outputs.pt")
    report[name] = describe(gm)
imported = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torchvision", "test_checkpoint", "strategies"}})
print(json.dumps({{"cases": report, "imported": imported}}))
"""


def load_in_fresh_process(folder, cases: dict) -> dict:
    """Save every case (name -> (model, inputs)) in ``folder``, then load and run them all in one
    fresh process: per case, the outputs and description of the original ("want",
    "description") and of the loaded model ("got", "loaded")."""
    results = {}
    for name, (gm, inputs) in cases.items():
        results[name] = {"want": run(gm, inputs), "description": describe(gm)}
        save(gm, folder / f"{name}.fxp")
        torch.save(inputs, folder / f"{name}.inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tests' modules stay out of reach
    script = FRESH.format(describe=inspect.getsource(describe))
    command = [sys.executable, "-c", script, str(torch.get_num_threads()), str(folder), *cases]
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["imported"] == [], "loading imported model code"
    for name, result in results.items():
        result["got"] = torch.load(folder / f"{name}.outputs.pt", weights_only=True)
        result["loaded"] = report["cases"][name]
    return results


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return load_in_fresh_process(tmp_path_factory.mktemp("fresh"), {name: make() for name, make in CASES.items()})


def test_random_rewritten_models_round_trip_in_a_fresh_process(tmp_path):
    """Random architectures, masked, compacted (some residual branches removed) or grown, all
    saved and then loaded by one fresh process."""
    cases = {}

    @settings(max_examples=max(5, settings.default.max_examples // 4), database=None)
    @given(spec=model_specs(), data=st.data(), how=st.sampled_from(["masked", "compacted", "grown"]))
    def draw(spec, data, how):
        model, x, analysis, masks = draw_case(data, spec)
        if how == "grown":
            groups = [g.name for g in analysis.groups if g.prunable and g.size > 1]
            if not groups:
                reject()
            gm = grow_or_refuse(model, x, analysis, {data.draw(st.sampled_from(groups)): 2}, {}, "random")[0]
        else:
            removed = {layer.name: False for layer in analysis.layers if data.draw(st.booleans())}
            gm = rewritten(model, x, analysis, {**masks, **removed}, how == "masked")
        cases[f"case{len(cases)}"] = (gm.eval(), (x,))

    draw()
    assert len(cases) >= 3
    for name, result in load_in_fresh_process(tmp_path, cases).items():
        assert_same_bits(result["got"], result["want"], f"{name}: outputs of the loaded model")
        assert result["loaded"] == result["description"]


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_in_a_fresh_process(fresh, case):
    result = fresh[case]
    assert_same_bits(result["got"], result["want"], f"{case}: outputs of the loaded model")
    assert result["loaded"] == result["description"]
    if case in EXPECTED_MODULES:
        cls = EXPECTED_MODULES[case]
        assert any(c == f"{cls.__module__}.{cls.__qualname__}" for _, c, _ in result["loaded"]["modules"])


def test_fresh_case_details(fresh):
    """The descriptions compared above say what they should: tied weights, a frozen parameter,
    mixed train/eval modes, a stack whose layer 0 directions are separate modules."""
    params = {n: (grad, first) for n, grad, first in fresh["tied"]["loaded"]["parameters"]}
    assert params["dec.weight"] == (True, "emb.weight")
    stack = fresh["lstm_stack"]["loaded"]
    assert ["emb.weight", False, "emb.weight"] in stack["parameters"]
    modes = {n: training for n, _, training in stack["modules"]}
    assert modes["rnn"] and not modes["head"]
    assert [n for n, c, _ in stack["modules"] if c == "torch.nn.modules.rnn.LSTM"] == [
        "rnn.layers.0.0", "rnn.layers.0.1", "rnn.layers.1"]


def test_loaded_rnn_runs_with_its_parameters(tmp_path):
    loaded = round_trip(gru()[0], tmp_path / "gru.fxp")
    rnn = loaded.get_submodule("rnn")
    assert isinstance(rnn, nn.GRU) and rnn.num_layers == 2
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


# --------------------------------------------------------------------------------------------
# The loaded model in fxprune

@pytest.mark.parametrize("case, masks", [
    ("lstm_stack", {"rnn.hidden_l0": keep(3, 0, 2), "rnn.hidden_l1_reverse": keep(2, 1)}),
    ("attention", {"attn.heads": keep(2, 1)}),
    ("residual", {"2.body.0": keep(6, 1, 3)}),
])
def test_loaded_model_analyses_and_compacts_like_the_original(tmp_path, case, masks):
    gm, inputs = CASES[case]()
    loaded = round_trip(gm, tmp_path / "model.fxp")

    def analysis(model):
        a = fxprune.analyze(model, inputs)
        return [(g.name, g.size, g.prunable) for g in a.groups], [layer.name for layer in a.layers]

    assert analysis(loaded) == analysis(gm)
    assert_same_bits(run(fxprune.compact(loaded, masks, inputs), inputs),
                     run(fxprune.compact(gm, masks, inputs), inputs), f"{case}: compact of the loaded model")
    assert_same_bits(run(fxprune.apply_masks(loaded, masks, inputs), inputs),
                     run(fxprune.apply_masks(gm, masks, inputs), inputs), f"{case}: apply_masks of the loaded model")


def test_tied_weights_get_the_gradients_of_both_uses(tmp_path):
    gm, (x,) = tied()
    loaded = round_trip(gm, tmp_path / "tied.fxp")
    assert loaded.dec.weight is loaded.emb.weight
    for model in (gm, loaded):
        model(x).sum().backward()
    assert_same_bits(loaded.emb.weight.grad, gm.emb.weight.grad, "gradient of the tied weight")


def test_plain_json_meta_is_kept(tmp_path):
    gm, _ = tied()
    gm.meta.update({"note": {"epochs": [1, 2]}, "fxprune_deviation": 0.25, "object": object(), "pair": (1, 2)})
    loaded = round_trip(gm, tmp_path / "meta.fxp")
    assert loaded.meta == {"note": {"epochs": [1, 2]}, "fxprune_deviation": 0.25, "fxprune_report": []}


def test_file_objects_round_trip_and_are_named_in_errors():
    gm, (x,) = tied()
    buffer = io.BytesIO()
    save(gm, buffer)
    buffer.seek(0)
    assert_same_bits(run(load(buffer), (x,)), run(gm, (x,)), "outputs of the model loaded from memory")
    with pytest.raises(CheckpointError, match="^<file object>: torch.load cannot read it"):
        load(io.BytesIO(b"not a checkpoint"))


# --------------------------------------------------------------------------------------------
# Random architectures, in process

def check_round_trip(gm: torch.fx.GraphModule, path, inputs: list[torch.Tensor], training: bool) -> None:
    gm.train(training)
    loaded = round_trip(gm, path)
    assert describe(loaded) == describe(gm)
    assert_same_bits(loaded.state_dict(), gm.state_dict(), "state_dict")
    gm.eval()
    loaded.eval()
    for i, x in enumerate(inputs):
        assert_same_bits(run(loaded, (x,)), run(gm, (x,)), f"outputs on input {i}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "model.fxp"


def rewritten(model: nn.Module, x: torch.Tensor, analysis: fxprune.Analysis, masks: dict, masked: bool):
    """``apply_masks`` or ``compact``; examples that compact refuses or fails on are rejected here
    (test_properties.py and test_sequence_properties.py are about those)."""
    if masked:
        return fxprune.apply_masks(model, masks, x, analysis)
    try:
        return quiet_compact(model, masks, x, analysis)[0]
    except (fxprune.CompactError, fxprune.MaskError):
        reject()


@PROPERTY
@given(spec=model_specs(), data=st.data(), masked=st.booleans(), training=st.booleans())
def test_round_trip_random_cnn(scratch, spec, data, masked, training):
    model, x, analysis, masks = draw_case(data, spec)
    check_round_trip(rewritten(model, x, analysis, masks, masked), scratch, [x, spec.input(1)], training)


@PROPERTY
@given(spec=sequence_specs(), data=st.data(), masked=st.booleans(), training=st.booleans())
def test_round_trip_random_sequence_model(scratch, spec, data, masked, training):
    model, x = spec.build()
    analysis = fxprune.analyze(model, x)
    masks = draw_masks(data, analysis)
    check_round_trip(rewritten(model, x, analysis, masks, masked), scratch, [x, spec.input(1)], training)


# --------------------------------------------------------------------------------------------
# Errors

@pytest.fixture
def saved(tmp_path):
    """A small checkpoint's path and bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    path = tmp_path / "model.fxp"
    save(fxprune.trace(model, torch.randn(1, 3, 8, 8)), path)
    return path, path.read_bytes()


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def tensor_data_offset(data: bytes) -> int:
    """The middle of the first tensor's bytes in a checkpoint (a zip archive of uncompressed records)."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("/data/0"))
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


DAMAGE = {  # name -> (damage(bytes), what the message says)
    "empty": (lambda d: b"", "torch.load cannot read it"),
    "truncated_to_a_tenth": (lambda d: d[:len(d) // 10], "torch.load cannot read it"),
    "truncated_by_half": (lambda d: d[:len(d) // 2], "torch.load cannot read it"),
    "truncated_at_the_end": (lambda d: d[:-10], "torch.load cannot read it"),
    "header_flipped": (lambda d: flip(d, 0), "torch.load cannot read it"),
    "tensor_data_flipped": (lambda d: flip(d, tensor_data_offset(d)), "do not match their checksums"),
    # an edit that keeps the spec valid JSON: only its checksum tells
    "spec_edited": (lambda d: d.replace(b'"stride": {"tuple": [2, 2]}', b'"stride": {"tuple": [1, 2]}', 1),
                    "spec does not match its checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file(saved, damage):
    path, data = saved
    broken, message = DAMAGE[damage]
    damaged = broken(data)
    assert damaged != data
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=message) as err:
        load(path)
    assert str(path) in str(err.value)


def write_foreign(kind: str, path) -> None:
    model = nn.Linear(3, 2)
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "pickled_module":
        torch.save(model, path)
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_text("format: fxprune\nversion: 1\n")


@pytest.mark.parametrize("kind, message", [
    ("state_dict", "not an fxprune checkpoint"), ("pickled_module", "torch.load cannot read it"),
    ("random_bytes", "torch.load cannot read it"), ("text", "torch.load cannot read it"),
])
def test_foreign_file(tmp_path, kind, message):
    path = tmp_path / "foreign.pt"
    write_foreign(kind, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load(path)
    assert str(path) in str(err.value)


def rewrite(path, edit_top=None, edit_spec=None) -> None:
    """Change a checkpoint's top-level dict or its spec, keeping its checksums valid."""
    top = torch.load(path, weights_only=True)
    if edit_spec:
        spec = json.loads(top["spec"])
        edit_spec(spec)
        top["spec"] = json.dumps(spec)
        top["spec_checksum"] = zlib.crc32(top["spec"].encode())
    if edit_top:
        edit_top(top)
    torch.save(top, path)


def node(spec: dict, op: str) -> dict:
    return next(n for n in spec["graph"] if n["op"] == op)


def first_module(spec: dict) -> dict:
    return next(entry for path, entry in spec["modules"].items() if path)


EDITS = {  # name -> (edit of the top-level dict, edit of the spec, what the message says)
    "future_version": (lambda top: top.update(version=2), None, "format version 2 by a newer fxprune"),
    "no_spec": (lambda top: top.pop("spec"), None, "malformed"),
    "module_class": (None, lambda s: first_module(s).update({"class": "subprocess:Popen"}),
                     "module class 'subprocess:Popen' is not in fxprune's allow-list"),
    "function": (None, lambda s: node(s, "call_module").update(op="call_function", target={"function": "builtins:eval"}),
                 "function 'builtins:eval' is not in fxprune's allow-list"),
    "dunder_function": (None, lambda s: node(s, "call_module").update(
        op="call_function", target={"function": "torch:__import__"}), "not in fxprune's allow-list"),
    "dunder_method": (None, lambda s: node(s, "call_module").update(op="call_method", target="__reduce__"),
                      "dunder method '__reduce__'"),
    "dunder_getattr": (None, lambda s: node(s, "call_module").update(
        op="call_function", target={"function": "builtins:getattr"}, args=[{"node": "input_1"}, "__class__"]),
        "getattr with a dynamic or dunder attribute name"),
    # generated code spells placeholder targets out as argument names
    "code_in_argument_name": (None, lambda s: node(s, "placeholder").update(target="x=__import__('os')"),
                              "invalid argument name"),
    "module_internals": (None, lambda s: first_module(s)["attributes"].update(_parameters=[]), "nn.Module internals"),
    "dangling_node": (None, lambda s: node(s, "output").update(args=[{"node": "nowhere"}]), "malformed"),
    "missing_tensor": (lambda top: top["state"].popitem(), None, "tensors do not match its spec"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_invalid_checkpoint(saved, edit):
    path, _ = saved
    edit_top, edit_spec, message = EDITS[edit]
    rewrite(path, edit_top, edit_spec)
    with pytest.raises(CheckpointError, match=message) as err:
        load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.fxp")


@torch.fx.wrap
def user_scale(x):
    return x * 2


class UserBlock(nn.Module):
    def forward(self, x):
        return x + 1


class CallsUserCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.block = UserBlock()

    def forward(self, x):
        return self.block(user_scale(self.conv(x)))


@pytest.mark.parametrize("leaf_modules, message", [
    ((), "node 'user_scale' refers to the function test_checkpoint.user_scale, which is not in fxprune's allow-list"),
    ((UserBlock,), "module 'block' is a test_checkpoint.UserBlock, which is not in fxprune's allow-list"),
])
def test_saving_user_code_fails_before_writing(tmp_path, leaf_modules, message):
    gm = fxprune.trace(CallsUserCode(), torch.randn(1, 3, 4, 4), leaf_modules=leaf_modules)
    path = tmp_path / "model.fxp"
    with pytest.raises(CheckpointError, match=message):
        save(gm, path)
    assert not path.exists()


def test_saving_a_module_with_hooks_fails(tmp_path):
    gm, _ = tied()
    gm.fc.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(CheckpointError, match="module 'fc' has forward or backward hooks"):
        save(gm, tmp_path / "model.fxp")


def test_saving_a_plain_module_fails(tmp_path):
    with pytest.raises(CheckpointError, match="takes a torch.fx.GraphModule"):
        save(nn.Linear(2, 2), tmp_path / "model.fxp")
