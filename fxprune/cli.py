"""The fxprune command: analyse, compact and export models from the shell, and run the demo.

    fxprune analyze torchvision.models:resnet50 --input 1x3x224x224
    fxprune compact torchvision.models:resnet50 --input 1x3x224x224 --keep 0.5 --out resnet50.fxp
    fxprune export resnet50.fxp --input 1x3x224x224 --onnx resnet50.onnx
    fxprune demo --epochs 3

Exit status: 0 on success; 2 for a bad command line or bad input (path, factory, shape, masks file,
checkpoint, a missing optional dependency); 1 when the work itself fails (a model fxprune cannot
trace or compact, an export that disagrees with PyTorch). Errors are one line on stderr; ``--debug``
shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from tabulate import tabulate
from torch import nn

import fxprune
import fxprune.checkpoint
import fxprune.export
from fxprune.analysis import Analysis
from fxprune.errors import CheckpointError, MaskError
from fxprune.masks import DEFAULT_ROUND_TO

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # present in a source checkout only
DTYPES = {"float": torch.float32, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64,
          "long": torch.int64, "int64": torch.int64, "int": torch.int32, "int32": torch.int32, "bool": torch.bool}

Masks = dict[str, Any]


class UsageError(Exception):
    """Bad input on the command line (a path, factory, shape, masks file or checkpoint): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and whose help keeps the examples' layout."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- models and inputs


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``MODULE:FACTORY``: MODULE is an importable module (``torchvision.models``)
    or a Python file (``examples/demo.py``), FACTORY an attribute of it, dotted if nested."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise UsageError(f"model '{spec}' is not MODULE:FACTORY (e.g. torchvision.models:resnet50 or "
                         "path/to/models.py:build_model)")
    obj: Any = _import(module_name)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name} has no attribute '{name}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"'{spec}' is a {type(obj).__name__}, not a callable that builds a model")
    return obj


def _import(name: str) -> ModuleType:
    """Import a module by name, or a Python file by path (its folder goes on ``sys.path``, as for a script)."""
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no such file: {name}")
        return _load_file(path)
    try:
        if name.split(".")[0] == "torchvision":
            from fxprune.zoo import torchvision_models

            torchvision_models()  # imports torchvision's model definitions even where its extension fails
        return importlib.import_module(name)
    except Exception as e:
        raise UsageError(f"cannot import {name}: {_message(e)}") from e


def _load_file(path: Path) -> ModuleType:
    """Run the Python file ``path`` as a module of its own."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"_fxprune_cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[spec.name]
        raise UsageError(f"cannot import {path}: {_message(e)}") from e
    return module


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``FACTORY(**kwargs)`` for the ``MODULE:FACTORY`` ``spec``, in eval mode."""
    factory = load_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise UsageError(f"{spec}(**{kwargs or {}}) failed: {_message(e)}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape '{text}': expected positive sizes joined by 'x', "
                                         "e.g. 1x3x224x224")
    return shape


def example_inputs(shapes: list[tuple[int, ...]], dtypes: list[str] | None = None, high: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the given shapes: normal floats, or integers in ``[0, high)``. ``dtypes`` has
    one name (for every input) or one per input; default float32."""
    dtypes = dtypes or ["float32"]
    if len(dtypes) not in (1, len(shapes)):
        raise UsageError(f"give --dtype once, or once per --input ({len(shapes)}), not {len(dtypes)} times")
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, name in zip(shapes, dtypes * len(shapes) if len(dtypes) == 1 else dtypes):
        dtype = DTYPES[name]
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 2 if dtype == torch.bool else high, shape, generator=generator).to(dtype))
    return tuple(inputs)


def _describe(inputs: tuple[torch.Tensor, ...]) -> str:
    """``"1x16 int64, 1x3x8x8"``: shapes, and dtypes other than float32."""
    return ", ".join("x".join(map(str, x.shape)) + ("" if x.dtype == torch.float32 else f" {str(x.dtype)[6:]}")
                     for x in inputs)


def check_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``model`` once on ``inputs``; a model that rejects them is a :class:`UsageError`."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise UsageError(f"the model does not accept input {_describe(inputs)}: {_message(e)}") from e


# --------------------------------------------------------------------------- masks


def unit_scores(analysis: Analysis) -> dict[str, torch.Tensor]:
    """Score each unit of every group by the L1 norm of the weights it owns: every slice, along the
    group's dim, of every parameter of two or more dims among the group's members. A unit's filters,
    gate rows and the input columns of its consumers all count, as in Torch-Pruning's group magnitude."""
    params = dict(analysis.gm.named_parameters(remove_duplicate=False))
    scores = {}
    for g in analysis.groups:
        score = torch.zeros(g.size)
        for m in g.members:
            w = params.get(m.name) if m.kind == "param" else None
            if w is not None and w.dim() >= 2:
                slices = w.detach().movedim(m.dim, 0)[m.index].abs().reshape(len(m.index), -1)
                score.index_add_(0, m.unit, slices.sum(1).float())
        scores[g.name] = score
    return scores


def magnitude_masks(analysis: Analysis, keep: float, scores: dict[str, torch.Tensor] | None = None) -> Masks:
    """For every prunable group, keep the ``keep`` fraction (at least one) of its units with the
    highest ``scores`` (default :func:`unit_scores`)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    scores = unit_scores(analysis) if scores is None else scores
    masks = {}
    for g in analysis.groups:
        if g.prunable:
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[scores[g.name].topk(max(1, round(keep * g.size))).indices] = True
            masks[g.name] = mask
    return masks


def load_masks(path: str) -> Masks:
    """A masks file: a ``torch.save``d dict of group or producer name -> bool tensor, or removable
    layer name -> bool, read with ``weights_only=True``."""
    try:
        masks = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"no such masks file: {path}") from None
    except Exception as e:
        raise UsageError(f"cannot read masks file {path} (expected a torch.save'd dict of bool tensors): "
                         f"{_message(e)}") from e
    if not isinstance(masks, dict):
        raise UsageError(f"masks file {path} holds a {type(masks).__name__}, not a dict of name -> bool tensor")
    for key, mask in masks.items():
        if not isinstance(key, str):
            raise UsageError(f"masks file {path}: key {key!r} is not a group or layer name")
        if not (isinstance(mask, bool) or isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
            kind = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
            raise UsageError(f"masks file {path}: mask '{key}' is {kind}; masks are bool tensors (True keeps), "
                             "or False to remove a layer")
    return masks


# --------------------------------------------------------------------------- output


@contextlib.contextmanager
def stage(text: str, quiet: bool = False) -> Iterator[None]:
    """Say on stderr what a long step does and how long it took (unless ``quiet``); its warnings
    follow the line, each once."""
    def say(s: str, end: str = "\n") -> None:
        if not quiet:
            print(s, end=end, file=sys.stderr, flush=True)

    say(f"{text} ...", end="")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield
        except BaseException:
            say(" failed")
            raise
    say(f" {time.perf_counter() - start:.1f} s")
    # the ONNX exporter's notes on tracing are about its own trace, which to_onnx checks
    for message in dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, torch.jit.TracerWarning)):
        print(f"warning: {message}", file=sys.stderr)


def _message(e: BaseException) -> str:
    """``e`` as one line: its type (unless a UsageError) and the first line of its message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else "(no message)"
    if len(lines) > 1:
        text += f" [{len(lines) - 1} more lines: run with --debug]"
    return text if isinstance(e, UsageError) else f"{type(e).__name__}: {text}"


def _layer_table(analysis: Analysis) -> str:
    if not analysis.layers:
        return "removable layers: none"
    rows = [[layer.name, len(layer.modules), ", ".join(layer.groups) or "-"] for layer in analysis.layers]
    return f"removable layers ({len(rows)}; mask a layer with False to remove it):\n" + \
        tabulate(rows, ["layer", "modules", "inner groups"], tablefmt="simple")


def _cost_table(before: fxprune.Cost, after: fxprune.Cost) -> str:
    rows = [[label, f"{getattr(before, what):,}", f"{getattr(after, what):,}",
             f"{getattr(after, what) / getattr(before, what):.3f}" if getattr(before, what) else "-"]
            for label, what in (("FLOPs", "flops"), ("parameters", "params"))]
    return tabulate(rows, ["", "before", "after", "after / before"], tablefmt="simple", disable_numparse=True)


# --------------------------------------------------------------------------- commands


def _model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    inputs = example_inputs(args.input, args.dtype, args.high, args.seed)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise UsageError(f"--kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--kwargs must be a JSON object, got {args.kwargs}")
    with stage(f"building {args.model}", args.quiet):
        model = build_model(args.model, kwargs)
        check_inputs(model, inputs)
    return model, inputs


def _one(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return inputs[0] if len(inputs) == 1 else inputs


def analyze_command(args: argparse.Namespace) -> int:
    """``fxprune analyze``: the channel groups, removable layers and cost of a model."""
    model, inputs = _model_and_inputs(args)
    with stage(f"analysing at input {_describe(inputs)}", args.quiet):
        analysis = fxprune.analyze(model, _one(inputs))
    with stage("counting FLOPs", args.quiet):
        cost = fxprune.cost(model, _one(inputs))
    prunable = sum(g.prunable for g in analysis.groups)
    print(f"channel groups ({len(analysis.groups)}, {prunable} prunable):")
    print(analysis)
    print()
    print(_layer_table(analysis))
    print(f"\ncost at input {_describe(inputs)}: {cost}")
    return EXIT_OK


def compact_command(args: argparse.Namespace) -> int:
    """``fxprune compact``: prune by a masks file or by magnitude, and save the compact model."""
    masks = load_masks(args.masks) if args.masks else None
    _check_folder(args.out)
    model, inputs = _model_and_inputs(args)
    x = _one(inputs)
    with stage("analysing", args.quiet):
        analysis = fxprune.analyze(model, x)
        scores = unit_scores(analysis)
    if masks is None:
        masks = magnitude_masks(analysis, args.keep, scores)
    with stage(f"compacting ({len(masks)} mask{'s' * (len(masks) != 1)}"
               + (f", round_to={args.round_to})" if args.round_to > 1 else ")"), args.quiet):
        small = fxprune.compact(model, masks, x, analysis=analysis, exact=args.exact, round_to=args.round_to,
                                scores=scores)
    with stage("counting FLOPs", args.quiet):
        before, after = fxprune.cost(model, x), fxprune.cost(small, x)
    with stage(f"saving {args.out}", args.quiet):
        fxprune.checkpoint.save(small, args.out)
    print(f"cost at input {_describe(inputs)}:")
    print(_cost_table(before, after))
    print(f"\nwrote {args.out}")
    return EXIT_OK


def _check_folder(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: its folder does not exist")


def _require(module: str, extra: str, flag: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{flag} needs the {module} package: pip install 'fxprune[{extra}]'")


def export_command(args: argparse.Namespace) -> int:
    """``fxprune export``: a checkpoint to a checked ONNX file and optionally a TensorRT engine."""
    if not (args.onnx or args.tensorrt):
        raise UsageError("nothing to do: give --onnx OUT.onnx and/or --tensorrt OUT.engine")
    _check_folder(args.onnx)
    _check_folder(args.tensorrt)
    inputs = example_inputs(args.input, args.dtype, args.high, args.seed)
    _require("onnx", "onnx", "export")
    _require("onnxruntime", "onnx", "export")
    if args.tensorrt:
        _require("tensorrt", "tensorrt", "--tensorrt")
        if not torch.cuda.is_available():
            raise UsageError("--tensorrt needs a CUDA GPU; torch.cuda.is_available() is False")
        if args.max_batch is not None and args.max_batch < inputs[0].shape[0]:
            raise UsageError(f"--max-batch {args.max_batch} is below the input's batch {inputs[0].shape[0]}")
    with stage(f"loading {args.checkpoint}", args.quiet):
        try:
            model = fxprune.checkpoint.load(args.checkpoint)
        except (CheckpointError, OSError) as e:
            raise UsageError(_message(e)) from e
        check_inputs(model, inputs)
    if args.onnx:
        with stage(f"exporting {args.onnx} and checking it with ONNX Runtime", args.quiet):
            fxprune.export.to_onnx(model, _one(inputs), args.onnx, dynamic_batch=args.dynamic_batch, opset=args.opset,
                                   rtol=args.rtol, atol=args.atol)
        print(f"wrote {args.onnx}")
    if args.tensorrt:
        precision = "+".join(["fp32"] + ["fp16"] * args.fp16 + ["int8"] * args.int8)
        with stage(f"building TensorRT engine {args.tensorrt} ({precision})", args.quiet):
            fxprune.export.to_tensorrt(args.onnx or model, _one(inputs), args.tensorrt, fp16=args.fp16,
                                       int8=args.int8, max_batch=args.max_batch)
        print(f"wrote {args.tensorrt}")
    return EXIT_OK


def demo_command(args: argparse.Namespace) -> int:
    """``fxprune demo``: run ``examples/demo.py``'s ``main`` with the remaining arguments."""
    script = EXAMPLES / "demo.py"
    if not script.is_file():
        raise UsageError(f"the demo lives in the examples folder of fxprune's source repository, and {script} "
                         "is not there (an installed package has no examples)")
    demo = _load_file(script)
    program, sys.argv[0] = sys.argv[0], "fxprune demo"  # the demo's usage lines name this command
    try:
        return demo.main(args.demo_args)
    finally:
        sys.argv[0] = program


# --------------------------------------------------------------------------- parser


def _input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=parse_shape, action="append", required=True, metavar="SHAPE",
                   help="shape of a random example input, e.g. 1x3x224x224; repeat for several inputs")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), metavar="DTYPE",
                   help="input dtype, once for all inputs or once per --input (default float32; "
                        "long for token ids)")
    p.add_argument("--high", type=int, default=2,
                   help="integer inputs are drawn from [0, HIGH) (default 2; give the vocabulary size for tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODULE:FACTORY",
                   help="a module (torchvision.models:resnet50) or file (path/to/models.py:build_model) and "
                        "the callable in it that returns the model")
    p.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for FACTORY")
    _input_options(p)


def _checked(convert: Callable[[str], Any], valid: Callable[[Any], bool], message: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then refuse it with ``message`` unless ``valid``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(message.format(text)) from None
        if not valid(value):
            raise argparse.ArgumentTypeError(message.format(text))
        return value
    return parse


_tolerance = _checked(float, lambda v: 0 <= v < float("inf"), "a tolerance must be a non-negative number, got {}")
_round_to = _checked(int, lambda v: v >= 1, "--round-to must be a positive integer (1: no rounding), got {}")
_keep = _checked(float, lambda v: 0 < v <= 1, "--keep must be a fraction in (0, 1], got {}")


ANALYZE_EXAMPLES = """\
Examples:
  fxprune analyze torchvision.models:resnet50 --input 1x3x224x224
  fxprune analyze torchvision.models:resnet18 --kwargs '{"num_classes": 10}' --input 1x3x32x32
  fxprune analyze examples/demo.py:build_model --kwargs '{"spatial_dims": 2}' --input 1x1x8x8
  fxprune analyze examples/char_lstm.py:CharLSTM --kwargs '{"vocab": 20}' --input 1x16 --dtype long --high 20
"""

COMPACT_EXAMPLES = """\
Examples:
  # keep the half of every prunable group with the largest weights (L1 norm)
  fxprune compact torchvision.models:resnet50 --input 1x3x224x224 --keep 0.5 --out resnet50.fxp
  # channel counts at multiples of 32 (int8), or as the masks give them; by default multiples of 8
  # (the extra channels stay zeroed: the same function)
  fxprune compact torchvision.models:resnet50 --input 1x3x224x224 --keep 0.5 --round-to 32 --out r50.fxp
  fxprune compact torchvision.models:resnet50 --input 1x3x224x224 --keep 0.5 --round-to 1 --out r50.fxp
  # masks of your own: a dict of group name -> bool tensor (True keeps), layer name -> False
  python -c "import torch; torch.save({'conv1': torch.arange(64) < 32, 'layer1.0': False}, 'masks.pt')"
  fxprune compact torchvision.models:resnet18 --input 1x3x224x224 --masks masks.pt --out r18.fxp

`fxprune analyze` lists the group and layer names. Load the result with fxprune.checkpoint.load.
"""

EXPORT_EXAMPLES = """\
Examples:
  fxprune export resnet50.fxp --input 1x3x224x224 --onnx resnet50.onnx
  fxprune export resnet50.fxp --input 8x3x224x224 --onnx r50.onnx --tensorrt r50.engine --max-batch 32
  fxprune export lstm.fxp --input 1x64 --dtype long --high 20 --onnx lstm.onnx

The ONNX file must reproduce the model's outputs in ONNX Runtime (CPU), at the input's batch and at
three times it (unless --no-dynamic-batch), within --atol + --rtol times the largest |output|.
--tensorrt needs the tensorrt package and a CUDA GPU; --int8 needs a model with quantize/dequantize
(fake-quantize) nodes, as no calibrator is given here.
"""

DEMO_EXAMPLES = """\
Examples:
  fxprune demo
  fxprune demo --dataset digits --epochs 3 --target 0.25
  fxprune demo -- --help        # the demo's own options

Every argument after `demo` goes to examples/demo.py, which needs fxprune's source repository.
"""


def parser() -> argparse.ArgumentParser:
    """The ``fxprune`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress lines on stderr")
    top = _Parser(prog="fxprune", description=__doc__.splitlines()[0], parents=[common],
                  epilog="Examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2] +
                  "\n\n`fxprune COMMAND --help` has more examples.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("analyze", parents=[common], epilog=ANALYZE_EXAMPLES,
                            help="channel groups, removable layers and cost of a model",
                            description="Print a model's channel groups (prunable or not, and why), its removable "
                                        "layers and its FLOPs and parameters.")
    _model_options(p)
    p.set_defaults(run=analyze_command)

    p = commands.add_parser("compact", parents=[common], epilog=COMPACT_EXAMPLES,
                            help="prune a model and save the compact one as a checkpoint",
                            description="Remove the masked channels and layers of a model and save the smaller, "
                                        "equivalent model with fxprune.checkpoint.save.")
    _model_options(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--masks", metavar="FILE", help="torch.save'd dict: group -> bool tensor, layer -> False")
    how.add_argument("--keep", type=_keep, metavar="FRACTION",
                     help="keep this fraction of every prunable group, by weight magnitude (L1)")
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write (e.g. model.fxp)")
    p.add_argument("--round-to", type=_round_to, default=DEFAULT_ROUND_TO, metavar="N",
                   help=f"keep channel counts at multiples of N, the extra channels zeroed (default {DEFAULT_ROUND_TO}, "
                        "for fp16 tensor cores and SIMD kernels; 32 for int8; 1: no rounding)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-exact also prunes groups a LayerNorm normalises over (approximate; default --exact)")
    p.set_defaults(run=compact_command)

    p = commands.add_parser("export", parents=[common], epilog=EXPORT_EXAMPLES,
                            help="export a checkpoint to ONNX (checked) and TensorRT",
                            description="Load a checkpoint written by `fxprune compact` and export it.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="file written by fxprune compact / fxprune.checkpoint.save")
    _input_options(p)
    p.add_argument("--onnx", metavar="FILE", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="make the batch dimension dynamic (default yes)")
    p.add_argument("--rtol", type=_tolerance, default=1e-4,
                   help="ONNX Runtime must match PyTorch within ATOL + RTOL * max|output| (default 1e-4)")
    p.add_argument("--atol", type=_tolerance, default=1e-5, help="see --rtol (default 1e-5)")
    p.add_argument("--tensorrt", metavar="FILE", help="TensorRT engine to write (needs tensorrt and CUDA)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="allow fp16 kernels in the engine (default yes)")
    p.add_argument("--int8", action="store_true", help="allow int8 kernels (needs Q/DQ nodes in the model)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="largest batch the engine accepts (default: the input's batch)")
    p.set_defaults(run=export_command)

    p = commands.add_parser("demo", parents=[common], epilog=DEMO_EXAMPLES, usage="%(prog)s [DEMO ARGUMENTS ...]",
                            help="run the demo (examples/demo.py): train, prune, compact, compare",
                            description="Run the demo of fxprune's source repository, passing it the remaining "
                                        "arguments.")
    p.set_defaults(run=demo_command)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``fxprune`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    top = parser()
    try:
        args, rest = top.parse_known_args(argv)
        if args.command == "demo":
            args.demo_args = rest[1:] if rest[:1] == ["--"] else rest
        elif rest:
            top.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.quiet, args.debug = getattr(args, "quiet", False), getattr(args, "debug", False)
    try:
        return args.run(args)
    except SystemExit as e:  # the demo's own argument parser
        return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_FAILURE
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"fxprune {args.command}: error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (UsageError, MaskError)) else EXIT_FAILURE
