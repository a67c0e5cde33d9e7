"""Export to ONNX, checked against PyTorch with ONNX Runtime."""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_leaves

from fxprune.errors import ExportError
from fxprune.passes.fuse_for_inference import fuse_for_inference
from fxprune.trace import as_tuple, trace


def to_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    opset: int = 17,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    fuse: bool = True,
) -> Path:
    """Export ``model`` in eval mode to the ONNX file ``path``, check it, and return ``path``.

    ``example_inputs`` is a tensor or a tuple of tensors, batched along dim 0. The inputs are named
    ``input`` (``input_0``, ``input_1``, ... where there are several) and the outputs, flattened,
    ``output`` (``output_0``, ...). With ``dynamic_batch``, dim 0 of every input and the dims of
    every output that grow with it are dynamic. ``fuse`` first folds BatchNorm and removes dropout
    with :func:`~fxprune.passes.fuse_for_inference.fuse_for_inference`, on a copy traced with
    :func:`fxprune.trace` unless ``model`` is a GraphModule (models FX cannot trace need
    ``fuse=False``).

    The file passes ``onnx.checker.check_model`` and ONNX Runtime (CPU) must reproduce the outputs
    of ``model`` in eval mode on the example inputs, and with ``dynamic_batch`` also on the example
    repeated three times along the batch, within ``|onnx - torch| <= atol + rtol * max|torch|``
    for each output tensor: the error is measured against the output's largest magnitude, since
    float32 rounding (ONNX Runtime ordering the sums differently, BatchNorm folded into the weights)
    errs by a fraction of the values summed, not of each result, which may be near zero. Otherwise
    ``ExportError`` names the output and its largest difference. ``model`` is not changed.
    """
    if not (0 <= rtol < float("inf") and 0 <= atol < float("inf")):
        raise ValueError(f"rtol and atol must be finite and non-negative, got rtol={rtol!r}, atol={atol!r}")
    onnx, ort = require("onnx", "onnx"), require("onnxruntime", "onnx")
    path = Path(path)
    inputs = as_tuple(example_inputs)
    batches = [inputs, tuple(torch.cat([x] * 3) for x in inputs)] if dynamic_batch else [inputs]
    with _eval_mode(model), torch.no_grad():
        expected = [[t.detach() for t in tree_leaves(model(*b))] for b in batches]
        exported = model
        if fuse:
            exported = fuse_for_inference(model if isinstance(model, torch.fx.GraphModule) else trace(model, inputs))
        in_names, out_names = names("input", len(inputs)), names("output", len(expected[0]))
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {name: {0: "batch"} for name in in_names}
            for name, small, large in zip(out_names, *expected):
                dynamic_axes[name] = {d: "batch" for d in range(small.dim()) if small.shape[d] != large.shape[d]}
        with warnings.catch_warnings():
            # the TorchScript exporter is chosen on purpose: the dynamo one needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(exported, inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=in_names, output_names=out_names, dynamic_axes=dynamic_axes)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path} is not a valid ONNX model: {e}") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]  # the exporter drops unused inputs
    for batch, want in zip(batches, expected):
        by_name = dict(zip(in_names, batch))
        got = session.run(out_names, {name: by_name[name].cpu().numpy() for name in feeds})
        _compare(got, want, out_names, rtol, atol, batch[0].shape[0])
    return path


def names(prefix: str, count: int) -> list[str]:
    """ONNX names of ``count`` inputs or outputs: ``prefix`` alone, or numbered."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _compare(got: list[np.ndarray], want: list[torch.Tensor], out_names: list[str], rtol: float, atol: float,
             batch: int) -> None:
    """Raise ExportError unless every ``|got - want| <= atol + rtol * max|want|`` (per output; non-finite
    values must match exactly)."""
    for name, g, w in zip(out_names, got, want):
        g, w = g.astype(np.float64), w.cpu().numpy().astype(np.float64)
        if g.shape != w.shape:
            raise ExportError(f"ONNX output '{name}' has shape {g.shape}, PyTorch {w.shape} (batch {batch})")
        if not g.size:
            continue
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        diff = np.nan_to_num(np.where(same, 0.0, np.abs(g - w)), nan=np.inf)
        finite = np.abs(w[np.isfinite(w)])
        scale = float(finite.max()) if finite.size else 0.0
        tolerance = atol + rtol * scale
        worst = np.unravel_index(np.argmax(diff), diff.shape)
        if diff[worst] > tolerance:
            raise ExportError(
                f"ONNX output '{name}' differs from PyTorch (batch {batch}): largest difference "
                f"{diff[worst]:.3g} at index {tuple(map(int, worst))} (ONNX {g[worst]:.6g}, PyTorch "
                f"{w[worst]:.6g}), above atol + rtol * max|PyTorch| = {tolerance:.3g} "
                f"(rtol={rtol}, atol={atol}, max|PyTorch| = {scale:.3g})"
            )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, every module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def require(name: str, extra: str) -> ModuleType:
    """Import ``name``, or say which extra of fxprune installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"fxprune.export needs {name}: pip install 'fxprune[{extra}]' (or `pip install {name}`)") \
            from e
