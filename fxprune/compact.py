"""``apply_masks`` (the reference semantics) and ``compact`` (the dense, smaller equivalent)."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx
from torch import nn

from fxprune.passes.fold_constants import consumer_inputs, dropped_inputs, fold_constants, plan_folds
from fxprune.passes.mask_channels import mask_channels
from fxprune.passes.resize_modules import resize_modules
from fxprune.passes.rewrite_shapes import Shapes, rewrite_shapes
from fxprune.passes.slice_parameters import slice_parameters

from .analysis import Analysis, analyze
from .errors import CompactError, MaskError, TraceError
from .masks import Masks, Plan, resolve
from .trace import propagate_shapes


def _analysis(model: nn.Module, example_inputs: Any, analysis: Analysis | None) -> Analysis:
    return analysis if analysis is not None else analyze(model, example_inputs)


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` that shares no storage with it."""
    return copy.deepcopy(gm)


def apply_masks(model: nn.Module, masks: Masks, example_inputs: Any, analysis: Analysis | None = None) -> torch.fx.GraphModule:
    """A copy of ``model``, shapes unchanged, in which every masked channel is exactly zero where it
    leaves its producer (after a BatchNorm that directly follows it). ``model`` is not changed."""
    analysis = _analysis(model, example_inputs, analysis)
    plan = resolve(analysis, masks)
    gm = _copy(analysis.gm)
    mask_channels(gm, plan.producer_masks)
    return gm


def compact(model: nn.Module, masks: Masks, example_inputs: Any, analysis: Analysis | None = None) -> torch.fx.GraphModule:
    """A new, dense ``GraphModule`` without the masked channels, equal to ``apply_masks``.

    ``masks`` maps a group name, or a producing module's qualified name, to a 1-D bool tensor
    (True keeps). A removed channel that still carries a constant is folded into its consumer's
    bias; one that carries anything else is kept (zeroed) and reported. Folding uses eval-mode
    values. The adjustments are in ``result.meta["fxprune_report"]``. ``model`` is not changed.
    """
    analysis = _analysis(model, example_inputs, analysis)
    plan = resolve(analysis, masks)
    _check_not_emptied(plan)
    folds, report = [], []
    lost = dropped_inputs(plan)
    if lost:
        reference = apply_masks(model, masks, example_inputs, analysis).eval()
        values = consumer_inputs(reference, {m.node for m, _ in lost}, example_inputs)
        keep, folds, report = plan_folds(analysis.gm, plan, lost, values)
        if keep:
            plan = resolve(analysis, masks, force_keep=keep)
            warnings.warn("fxprune kept some masked channels (zeroed): " + "; ".join(
                str(a) for a in report if a.action == "kept"), stacklevel=2)
    gm = slice_parameters(analysis.gm, plan)
    fold_constants(gm, folds, plan)
    resize_modules(gm, analysis.gm, Shapes(plan))
    rewrite_shapes(gm, plan)
    mask_channels(gm, _kept_but_masked(plan))
    _verify(gm, plan, example_inputs)
    gm.meta["fxprune_report"] = report
    return gm


def _check_not_emptied(plan: Plan) -> None:
    """A tensor left without any channel (a split piece whose channels are all masked) has no
    dense form: say which node, rather than emit a graph that cannot run."""
    shapes = Shapes(plan)
    for node in plan.analysis.gm.graph.nodes:
        labels = plan.analysis.labels.get(node.name)
        if isinstance(labels, torch.Tensor) and labels.numel() and 0 in shapes.new_shape(node):
            raise MaskError(
                f"the masks remove every channel of node '{node.name}' ({node.format_node()}); "
                "keep at least one channel there"
            )


def _kept_but_masked(plan: Plan) -> dict:
    """Producer masks over the surviving channels, where some survivor is masked by its producer."""
    out = {}
    for node, (p, mask) in plan.producer_masks.items():
        survivors = mask[plan.keep_atom[p.atoms]]
        if not bool(survivors.all()):
            out[node] = (p, survivors)
    return out


def _verify(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any) -> None:
    """Check that every node of the compact graph has the shape the plan predicts."""
    try:
        propagate_shapes(gm, example_inputs, owned=True)
    except TraceError as e:
        raise CompactError(f"the compacted graph does not run: {e}") from e
    shapes = Shapes(plan)
    for node in gm.graph.nodes:
        labels = plan.analysis.labels.get(node.name)
        meta = node.meta.get("tensor_meta")
        if isinstance(labels, torch.Tensor) and hasattr(meta, "shape"):
            expected = shapes.new_shape(node)
            if list(meta.shape) != expected:
                raise CompactError(
                    f"node '{node.name}' ({node.format_node()}) has shape {list(meta.shape)} after "
                    f"compaction; expected {expected}"
                )
