"""The fxprune command: each subcommand in-process and through ``python -m fxprune``, exit codes and
one-line errors."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxprune
import fxprune.checkpoint
from fxprune import cli

FACTORIES = '''
import torch
from torch import nn
from fxprune.zoo import randomize_constants, torchvision_models

NOT_CALLABLE = 3


def resnet(num_classes=10):
    """resnet18 with fixed random weights and BatchNorm statistics."""
    torch.manual_seed(0)
    return randomize_constants(torchvision_models().resnet18(num_classes=num_classes))


class DataDependent(nn.Module):
    """Control flow on a tensor value: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x
'''

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "factories.py"
    path.write_text(FACTORIES)
    return path


@pytest.fixture(scope="module")
def model(factories):
    return cli.build_model(f"{factories}:resnet")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["analyze"], ["compact"], ["export"], ["demo"]])
def test_help_has_examples(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "Example" in out and "usage: fxprune" in out


# --------------------------------------------------------------------------- commands


def test_analyze(capsys, factories):
    code, out, err = run(capsys, "analyze", f"{factories}:resnet", "--input", "1x3x32x32", "--kwargs",
                         '{"num_classes": 5}')
    assert code == 0
    assert "layer1.0.conv1" in out and "reaches the model output" in out  # the group table
    assert "removable layers (5" in out and "layer4.1" in out
    assert "cost at input 1x3x32x32: 74.03M FLOPs" in out
    assert "analysing at input 1x3x32x32 ..." in err


def test_analyze_token_inputs(capsys, tmp_path):
    path = tmp_path / "lm.py"
    path.write_text(textwrap.dedent('''
        from torch import nn

        def lm(vocab):
            return nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, vocab))
    '''))
    code, out, _ = run(capsys, "analyze", f"{path}:lm", "--kwargs", '{"vocab": 20}', "--input", "2x7",
                       "--dtype", "long", "--high", "20")
    assert code == 0
    assert "cost at input 2x7 int64" in out


def test_compact_keep(capsys, factories, model, tmp_path):
    out_path = tmp_path / "model.fxp"
    code, out, _ = run(capsys, "compact", f"{factories}:resnet", "--input", "1x3x32x32", "--keep", "0.5",
                       "--out", out_path)
    assert code == 0 and f"wrote {out_path}" in out
    small = fxprune.checkpoint.load(out_path)
    analysis = fxprune.analyze(model, X[:1])
    masks = cli.magnitude_masks(analysis, 0.5)
    reference = fxprune.apply_masks(model, masks, X[:1], analysis=analysis).eval()
    with torch.no_grad():
        assert_close(small(X), reference(X))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 3


@pytest.mark.parametrize("option, widths", [
    ([], (24, 56)),  # 22 and 50 kept, rounded up to multiples of 8 by default
    (["--round-to", "8"], (24, 56)), (["--round-to", "32"], (32, 64)), (["--round-to", "1"], (22, 50)),
], ids=["default", "8", "32", "1"])
def test_compact_masks_file_round_to(capsys, factories, model, tmp_path, option, widths):
    masks = {"layer1.0.conv1": torch.arange(64) % 3 == 0, "layer2.0.conv2": torch.arange(128) < 50,
             "layer3.1": False}
    torch.save(masks, tmp_path / "masks.pt")
    code, out, _ = run(capsys, "compact", f"{factories}:resnet", "--input", "1x3x32x32", "--masks",
                       tmp_path / "masks.pt", *option, "--out", tmp_path / "model.fxp")
    assert code == 0 and "FLOPs" in out
    small = fxprune.checkpoint.load(tmp_path / "model.fxp")
    assert (small.get_submodule("layer1.0.conv1").out_channels, small.get_submodule("layer2.0.conv2").out_channels) == widths
    reference = fxprune.apply_masks(model, masks, X[:1]).eval()
    with torch.no_grad():
        assert_close(small(X), reference(X))


def test_export_onnx(capsys, factories, tmp_path, monkeypatch):
    assert run(capsys, "compact", f"{factories}:resnet", "--input", "1x3x32x32", "--keep", "0.5",
               "--out", tmp_path / "model.fxp", "-q")[0] == 0
    code, out, _ = run(capsys, "export", tmp_path / "model.fxp", "--input", "1x3x32x32",
                       "--onnx", tmp_path / "model.onnx")
    assert code == 0 and "wrote" in out
    small = fxprune.checkpoint.load(tmp_path / "model.fxp")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": X.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, small(X).numpy(), rtol=1e-4, atol=1e-4)

    # the tolerances reach the check: ONNX Runtime made off by 1e-3 times the largest output
    session_run = ort.InferenceSession.run

    def off(self, names, feeds, *args):
        outputs = session_run(self, names, feeds, *args)
        return [o + 1e-3 * np.abs(o).max() for o in outputs]

    monkeypatch.setattr(ort.InferenceSession, "run", off)
    code, _, err = run(capsys, "export", tmp_path / "model.fxp", "--input", "1x3x32x32", "--onnx",
                       tmp_path / "strict.onnx", "--rtol", "5e-4", "--atol", "0", "-q")
    assert code == 1 and "rtol=0.0005, atol=0.0" in err
    assert run(capsys, "export", tmp_path / "model.fxp", "--input", "1x3x32x32", "--onnx", tmp_path / "loose.onnx",
               "--rtol", "2e-3", "-q")[0] == 0


def test_demo_passes_its_arguments_on(capsys, tmp_path, monkeypatch):
    (tmp_path / "demo.py").write_text(textwrap.dedent('''
        import sys

        def main(argv):
            print("demo got", argv, "as", sys.argv[0])
            return 3
    '''))
    monkeypatch.setattr(cli, "EXAMPLES", tmp_path)
    code, out, _ = run(capsys, "demo", "--epochs", "1", "--dataset", "digits")
    assert code == 3
    assert "demo got ['--epochs', '1', '--dataset', 'digits'] as fxprune demo" in out


def test_subprocess(tmp_path):
    command = [sys.executable, "-m", "fxprune"]
    done = subprocess.run([*command, "analyze", "torchvision.models:resnet18", "--input", "1x3x32x32",
                           "--kwargs", '{"num_classes": 10}'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cost at input 1x3x32x32: 74.03M FLOPs, 11.18M params" in done.stdout
    done = subprocess.run([*command, "analyze", "torchvision.models:resnet999", "--input", "1x3x32x32", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["fxprune analyze: error: torchvision.models has no attribute 'resnet999'"]


# --------------------------------------------------------------------------- errors


def masks_file(tmp_path, name: str, masks) -> str:
    torch.save(masks, tmp_path / name)
    return str(tmp_path / name)


BAD = {  # case: (argv after the model, words in the message); {f} is the factories file, {t} tmp_path
    "missing file": (["analyze", "{t}/missing.py:resnet", "--input", "1x3x32x32"], "no such file"),
    "missing module": (["analyze", "no_such_module_fxp:resnet", "--input", "1x3x32x32"], "cannot import"),
    "no factory": (["analyze", "{f}", "--input", "1x3x32x32"], "is not MODULE:FACTORY"),
    "unknown factory": (["analyze", "{f}:nope", "--input", "1x3x32x32"], "has no attribute 'nope'"),
    "not callable": (["analyze", "{f}:NOT_CALLABLE", "--input", "1x3x32x32"], "not a callable"),
    "bad kwargs": (["analyze", "{f}:resnet", "--input", "1x3x32x32", "--kwargs", '{{"depth": 3}}'],
                   "unexpected keyword argument"),
    "kwargs not JSON": (["analyze", "{f}:resnet", "--input", "1x3x32x32", "--kwargs", "{{num: 3}}"], "not JSON"),
    "bad shape": (["analyze", "{f}:resnet", "--input", "1xthreex32"], "bad shape '1xthreex32'"),
    "wrong shape": (["analyze", "{f}:resnet", "--input", "1x4x32x32"], "does not accept input 1x4x32x32"),
    "too many dtypes": (["analyze", "{f}:resnet", "--input", "1x3x32x32", "--dtype", "float", "--dtype", "long"],
                        "give --dtype once"),
    "missing masks": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{t}/none.pt",
                       "--out", "{t}/m.fxp"], "no such masks file"),
    "masks not torch": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{f}", "--out", "{t}/m.fxp"],
                        "cannot read masks file"),
    "masks not a dict": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{list}",
                          "--out", "{t}/m.fxp"], "not a dict"),
    "float mask": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{float}", "--out", "{t}/m.fxp"],
                   "mask 'conv1' is a torch.float32 tensor"),
    "mask size": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{size}", "--out", "{t}/m.fxp"],
                  "MaskError: mask 'conv1' has 3 entries"),
    "unknown group": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--masks", "{key}", "--out", "{t}/m.fxp"],
                      "MaskError"),
    "keep out of range": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--keep", "1.5", "--out", "{t}/m.fxp"],
                          "--keep must be a fraction"),
    "round-to zero": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--keep", "0.5", "--round-to", "0",
                       "--out", "{t}/m.fxp"], "--round-to must be a positive integer (1: no rounding), got 0"),
    "round-to not an int": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--keep", "0.5", "--round-to", "8.5",
                             "--out", "{t}/m.fxp"], "--round-to must be a positive integer"),
    "no output folder": (["compact", "{f}:resnet", "--input", "1x3x32x32", "--keep", "0.5",
                          "--out", "{t}/no/m.fxp"], "folder does not exist"),
    "not a checkpoint": (["export", "{size}", "--input", "1x3x32x32", "--onnx", "{t}/m.onnx"],
                         "not an fxprune checkpoint"),
    "missing checkpoint": (["export", "{t}/none.fxp", "--input", "1x3x32x32", "--onnx", "{t}/m.onnx"],
                           "No such file"),
    "export nothing": (["export", "{t}/none.fxp", "--input", "1x3x32x32"], "nothing to do"),
    "negative tolerance": (["export", "{t}/none.fxp", "--input", "1x3x32x32", "--onnx", "{t}/m.onnx", "--rtol", "-1"],
                           "a tolerance must be a non-negative number, got -1"),
    "unknown option": (["analyze", "{f}:resnet", "--input", "1x3x32x32", "--bogus"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(capsys, factories, tmp_path, case):
    paths = {"f": factories, "t": tmp_path, "list": masks_file(tmp_path, "list.pt", [1, 2]),
             "float": masks_file(tmp_path, "float.pt", {"conv1": torch.ones(64)}),
             "size": masks_file(tmp_path, "size.pt", {"conv1": torch.ones(3, dtype=torch.bool)}),
             "key": masks_file(tmp_path, "key.pt", {"conv9": torch.ones(3, dtype=torch.bool)})}
    argv, words = BAD[case]
    code, _, err = run(capsys, *[a.format(**paths) for a in argv], "-q")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("fxprune") and ": error: " in err
    assert words in err


def test_progress_lines_end_in_the_error(capsys, factories):
    code, _, err = run(capsys, "analyze", f"{factories}:resnet", "--input", "1x4x32x32")
    assert code == 2
    assert err.splitlines()[0] == f"building {factories}:resnet ... failed"
    assert err.splitlines()[1].startswith("fxprune analyze: error: the model does not accept")
    assert len(err.splitlines()) == 2


def test_failure_during_the_work_is_exit_1(capsys, factories):
    code, _, err = run(capsys, "analyze", f"{factories}:DataDependent", "--input", "1x3x8x8", "-q")
    assert code == 1
    assert len(err.splitlines()) == 1 and "TraceError" in err


def test_debug_shows_the_traceback(capsys, factories):
    code, _, err = run(capsys, "analyze", f"{factories}:DataDependent", "--input", "1x3x8x8", "-q", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("fxprune analyze: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_tensorrt_without_cuda_is_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "export", tmp_path / "m.fxp", "--input", "1x3x8x8", "--tensorrt", tmp_path / "m.engine")
    assert code == 2
    assert len(err.splitlines()) == 1 and ("needs the tensorrt package" in err or "needs a CUDA GPU" in err)


def test_demo_without_examples_is_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "EXAMPLES", tmp_path / "examples")
    code, _, err = run(capsys, "demo")
    assert code == 2
    assert len(err.splitlines()) == 1 and "examples folder" in err


# --------------------------------------------------------------------------- magnitude masks


def test_unit_scores_count_filters_and_consumer_columns():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    analysis = fxprune.analyze(model, torch.randn(1, 3, 8, 8))
    score = cli.unit_scores(analysis)["0"]
    expected = model[0].weight.detach().abs().sum((1, 2, 3)) + model[3].weight.detach().abs().sum((0, 2, 3))
    torch.testing.assert_close(score, expected)
    masks = cli.magnitude_masks(analysis, 0.5)
    assert set(masks) == {"0"}
    assert set(masks["0"].nonzero().flatten().tolist()) == set(expected.topk(3).indices.tolist())
    with pytest.raises(ValueError, match="keep must be in"):
        cli.magnitude_masks(analysis, 0)
