"""``apply_masks`` (the reference semantics) and ``compact`` (the dense, smaller equivalent)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils._pytree import tree_flatten

from fxprune.passes.fold_constants import Adjustment, consumer_inputs, dropped_inputs, fold_constants, plan_folds
from fxprune.passes.mask_channels import mask_channels
from fxprune.passes.remove_layers import remove_layers, zero_layers
from fxprune.passes.resize_modules import resize_modules
from fxprune.passes.rewrite_shapes import Shapes, rewrite_shapes
from fxprune.passes.slice_parameters import replace_tensors, slice_parameters

from .analysis import Analysis, analyze
from .collection import gc_paused
from .derive import compacted_analysis
from .errors import CompactError, TraceError
from .mapping import Mapping, compact_mapping
from .masks import Masks, Plan, resolve
from .trace import as_tuple, meta_shadow, propagate_shapes


def _analysis(model: nn.Module, example_inputs: Any, analysis: Analysis | None) -> Analysis:
    return analysis if analysis is not None else analyze(model, example_inputs)


@gc_paused()
def apply_masks(model: nn.Module, masks: Masks, example_inputs: Any, analysis: Analysis | None = None) -> torch.fx.GraphModule:
    """A copy of ``model``, shapes unchanged, in which every masked channel is exactly zero where it
    leaves its producer (after a BatchNorm that directly follows it), and the output of every
    removed layer is multiplied by 0. ``model`` is not changed."""
    analysis = _analysis(model, example_inputs, analysis)
    plan = resolve(analysis, masks, exact=False)  # zeroing is well defined even where removal is not exact
    gm = replace_tensors(analysis.gm, lambda name, t: None)  # a copy sharing no storage
    zero_layers(gm, plan.removed_layers)
    mask_channels(gm, plan)
    return gm


def compact(model: nn.Module, masks: Masks, example_inputs: Any, analysis: Analysis | None = None,
            exact: bool = True, return_mapping: bool = False, round_to: int | None = None,
            scores: dict[str, torch.Tensor] | None = None, return_analysis: bool = False, verify: bool = True) -> Any:
    """A new, dense ``GraphModule`` without the masked channels, equal to ``apply_masks``.

    ``masks`` maps a group name, or a producing module's qualified name, to a 1-D bool tensor
    (True keeps), and a removable layer's name (``analysis.layers``) to False to remove it: the
    residual branch goes and its block computes y = x. A removed channel that still carries a constant is folded into its consumer's
    bias; one that carries anything else is kept (zeroed) and reported. Folding uses eval-mode
    values. The adjustments are in ``result.meta["fxprune_report"]``. ``model`` is not changed.

    ``exact=False`` also prunes groups that are only approximately prunable (a LayerNorm over the
    channels then normalises over the kept ones, as other pruning tools do); the largest deviation
    from ``apply_masks`` on ``example_inputs`` is then measured, warned about and stored in
    ``result.meta["fxprune_deviation"]``.

    ``round_to=8`` (32 for int8) keeps channel counts at multiples that tensor cores use: each
    group that loses channels keeps more of its masked ones, those with the highest
    ``scores[group]`` (else the first), still zeroed, so the result is the same function. It must be
    a positive int; None (the default here) or 1 rounds nothing.

    ``return_mapping=True`` returns ``(result, mapping)``: for every parameter and buffer of the
    result, the tensor of ``model`` it comes from and which of its indices it keeps
    (:class:`~fxprune.mapping.TensorMap`); :func:`~fxprune.optim.remap_optimizer` uses it.

    ``return_analysis=True`` also returns the analysis of the result (last in the tuple:
    ``(result, analysis)`` or ``(result, mapping, analysis)``), equal to ``analyze(result,
    example_inputs)``: it is derived from ``analysis`` without tracing again where only widths
    changed, and computed afresh where the graph changed (removed layers, zeroed channels kept).

    ``verify=False`` skips the final check that the result runs on meta tensors with the shapes the
    masks predict (under a tenth of the time of ``analyze`` + ``compact``); the result's node shapes
    (``tensor_meta``) are then set from that prediction.
    """
    with gc_paused():  # not a decorator: the warnings below then point at the caller's line
        analysis = _analysis(model, example_inputs, analysis)
        plan, folds, report = _plan(model, masks, example_inputs, analysis, exact, round_to, scores)
        if any(a.action == "kept" for a in report):
            warnings.warn("fxprune kept some masked channels (zeroed): " + "; ".join(
                str(a) for a in report if a.action == "kept"), stacklevel=2)
        gm = slice_parameters(analysis.gm, plan)
        remove_layers(gm, plan.removed_layers)
        fold_constants(gm, folds, plan)
        shapes = Shapes.of_plan(plan)
        resize_modules(gm, analysis.gm, shapes)
        rewrite_shapes(gm, shapes)
        mask_channels(gm, plan, compacted=True)
        if verify:
            verify_shapes(gm, shapes, example_inputs)
        else:
            predict_shapes(gm, shapes)
        gm.meta["fxprune_report"] = report
        approximate = [g.name for g, keep in zip(analysis.groups, plan.keep_unit) if not g.exact and not bool(keep.all())]
        if approximate:
            gm.meta["fxprune_deviation"] = deviation = _deviation(gm, apply_masks(model, masks, example_inputs, analysis), example_inputs)
            warnings.warn(f"compact(exact=False) pruned groups that are not exactly prunable ({', '.join(approximate)}): "
                          f"the largest deviation from apply_masks on example_inputs is {deviation:.3g}", stacklevel=2)
        extra = ((compact_mapping(gm, plan),) if return_mapping else ()) + \
            ((compacted_analysis(plan, gm, example_inputs),) if return_analysis else ())
        return (gm, *extra) if extra else gm


def _plan(model, masks, example_inputs, analysis, exact, round_to, scores) -> tuple[Plan, list, list[Adjustment]]:
    """The plan, the constants to fold and the adjustments. A removed channel that is not zero at a
    consumer is folded or kept; each keep re-plans with every unit kept so far (so that what a plan
    drops was always measured), until no channel needs keeping."""
    plan = resolve(analysis, masks, exact=exact, round_to=round_to, scores=scores)
    _check_not_emptied(plan)
    kept, for_values, folds, values = [], {}, [], None
    while True:
        for_values.update({(gi, ui): value for gi, ui, value in plan.kept_for_values})
        lost = _exact_only(plan, dropped_inputs(plan))
        if not lost:
            folds, report = [], []
            break
        if values is None:  # the values reaching each consumer in the masked model; later plans drop less
            reference = apply_masks(model, masks, example_inputs, analysis).eval()
            values = consumer_inputs(reference, {(m.node, m.input_arg) for m, _ in lost}, example_inputs)
        keep, folds, report = plan_folds(analysis.gm, plan, lost, values)
        if not keep:
            break
        kept += report
        units = {root for root, (gi, ui) in analysis.unit_of.items() if bool(plan.keep_unit[gi][ui])}
        plan = resolve(analysis, masks, force_keep=keep | units, exact=exact, round_to=round_to, scores=scores)
    report = [a for a in kept if a.action == "kept"] + report + [
        Adjustment(analysis.groups[gi].name, ui, value.name, "kept", "no other channel of that value survives the masks")
        for (gi, ui), value in for_values.items()]
    return plan, folds, list(dict.fromkeys(report))


def _exact_only(plan: Plan, lost: list) -> list:
    """The lost inputs of exactly prunable groups (the others are removed whatever they carry)."""
    analysis, out = plan.analysis, []
    exact_group = torch.tensor([g.exact for g in analysis.groups], dtype=torch.bool)
    for m, index in lost:
        exact = exact_group[analysis.group_of[analysis.roots[m.atoms[index]]]]
        if bool(exact.any()):
            out.append((m, index[exact]))
    return out


@torch.no_grad()
def _deviation(gm: torch.fx.GraphModule, reference: torch.fx.GraphModule, example_inputs: Any) -> float:
    """The largest absolute difference between the outputs of ``gm`` and ``reference`` (eval mode)."""
    training = gm.training
    got, want = gm.eval()(*as_tuple(example_inputs)), reference.eval()(*as_tuple(example_inputs))
    gm.train(training)
    pairs = zip(tree_flatten(got)[0], tree_flatten(want)[0])
    return max((float((a - b).abs().max()) for a, b in pairs if isinstance(a, torch.Tensor) and a.numel()), default=0.0)


def _check_not_emptied(plan: Plan) -> None:
    """A tensor left without any channel has no dense form. ``resolve`` keeps a unit of every value
    the analysis finds emptiable, so this names the node where that failed, rather than emit a graph
    that cannot run."""
    for p in plan.analysis.space.producers:  # units inside a module (an RNN direction, attention heads)
        if p.node not in plan.removed_nodes and not bool(plan.keep_atom[p.atoms].any()):
            raise CompactError(f"the plan removes every channel of '{p.name}' (node '{p.node}')")
    shapes = Shapes.of_plan(plan)
    for node in plan.analysis.gm.graph.nodes:
        labels = plan.analysis.labels.get(node.name)
        if node.name in plan.removed_nodes:
            continue
        if isinstance(labels, torch.Tensor) and labels.numel() and 0 in shapes.new_shape(node):
            raise CompactError(f"the plan removes every channel of node '{node.name}' ({node.format_node()})")


def verify_shapes(gm: torch.fx.GraphModule, shapes: Shapes, example_inputs: Any) -> None:
    """Check that every used node of the rewritten graph ``gm`` has the shape ``shapes`` predicts.

    Parameters read directly (``get_attr``) are sliced by their members, which label tensors cannot
    always express (a weight passed to ``F.linear`` has channels along both dims): their users are checked.
    """
    try:
        propagate_shapes(gm, example_inputs)
    except TraceError as e:
        raise CompactError(f"the rewritten graph does not run: {e}") from e
    for node in gm.graph.nodes:
        labels = shapes.labels(node)
        meta = node.meta.get("tensor_meta")
        if isinstance(labels, torch.Tensor) and hasattr(meta, "shape") and node.users and node.op != "get_attr":
            expected = shapes.new_shape(node)
            if list(meta.shape) != expected:
                raise CompactError(
                    f"node '{node.name}' ({node.format_node()}) has shape {list(meta.shape)} after "
                    f"rewriting; expected {expected}"
                )


def predict_shapes(gm: torch.fx.GraphModule, shapes: Shapes) -> None:
    """Set every node's ``tensor_meta`` in the rewritten graph ``gm`` to the shape ``shapes``
    predicts, without running the graph. A parameter read directly has its own shape; a node with
    several outputs (a split, an RNN, whose unread states may have any width) runs alone on meta
    tensors; a node the rewrite added (the multiplication by a mask) is shaped like its first input."""
    for node in gm.graph.nodes:
        labels, meta = shapes.labels(node), node.meta.get("tensor_meta")
        if node.op == "get_attr":  # sliced by its members, which its labels may not tell (see verify_shapes)
            if isinstance(value := _attribute(gm, node.target), torch.Tensor):
                node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        elif isinstance(labels, torch.Tensor) and isinstance(meta, TensorMetadata):
            node.meta["tensor_meta"] = _resized(meta, shapes.new_shape(node))
        elif labels is not None and meta is not None:
            node.meta["tensor_meta"] = _run_alone(gm, node)
        elif labels is None and node.all_input_nodes and "tensor_meta" in node.all_input_nodes[0].meta:
            node.meta["tensor_meta"] = node.all_input_nodes[0].meta["tensor_meta"]


def _resized(meta: TensorMetadata, shape: list[int]) -> TensorMetadata:
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * max(shape[d + 1], 1)
    return meta._replace(shape=torch.Size(shape), stride=tuple(stride), memory_format=torch.contiguous_format)


def _run_alone(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """The ``tensor_meta`` of ``node`` run on meta tensors shaped by its inputs' ``tensor_meta``."""
    def meta_value(meta: Any) -> Any:
        if isinstance(meta, TensorMetadata):
            return torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        return type(meta)(meta_value(m) for m in meta) if isinstance(meta, (list, tuple)) else meta

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: meta_value(n.meta.get("tensor_meta")))
    with torch.no_grad():
        if node.op == "call_module":
            out = meta_shadow(gm.get_submodule(node.target))(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    return torch.fx.node.map_aggregate(out, lambda t: _extract_tensor_metadata(t) if isinstance(t, torch.Tensor) else t)


def _attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)
