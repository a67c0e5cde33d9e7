"""Dynamic Sparse Training: trainable masks with one threshold per output neuron or filter.

Liu, Xu, Shi, Cheung and So, "Dynamic Sparse Training: Find Efficient Sparse Network From Scratch
With Trainable Masked Layers", ICLR 2020. Each masked layer computes with ``W * M``, where
``M = step(|W| - t)`` and ``t`` holds one trainable threshold per row of ``W`` flattened to
``(c_out, rest)``. The step's derivative is replaced by the long-tailed estimator, the objective
is ``loss + alpha * sum(exp(-t))``, and weights and thresholds share one optimizer.

>>> dst = DST(model, alpha=5e-4)
>>> opt = torch.optim.SGD(dst.model.parameters(), lr=0.01, momentum=0.9)
>>> for x, y in loader:
...     opt.zero_grad()
...     (F.cross_entropy(dst.model(x), y) + dst.penalty()).backward()
...     opt.step()
...     dst.after_step()
>>> small = dst.compact(x)  # dense GraphModule without the dead filters
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from tabulate import tabulate
from torch import nn
from torch.nn.utils import parametrize

from fxprune.passes.fold_constants import consumer_inputs, plan_folds

from ..analysis import Analysis, analyze
from ..compact import compact as compact_graph
from ..masks import resolve

MASKED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RESET_DENSITY = 0.01  # a layer keeping this fraction of its weights or less gets its thresholds reset

LayerFilter = Iterable[str] | Callable[[str, nn.Module], bool] | None


class LongTailedStep(torch.autograd.Function):
    """``step(x) = 1 if x > 0 else 0``; backward uses the long-tailed estimator
    ``H(x) = 2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, ``0`` beyond."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x.abs()
        return grad * torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0))


class ThresholdMask(nn.Module):
    """Parametrization ``W -> W * M`` with one trainable threshold per row of ``W``.

    Unstructured: ``M_ij = step(|W_ij| - t_i)``. Structured: ``M_i = step(||W_i|| / sqrt(n_i) - t_i)``
    for the whole row ``i`` (``n_i`` entries), so a masked row is a whole filter or neuron.
    """

    def __init__(self, weight: torch.Tensor, structured: bool):
        super().__init__()
        self.structured = structured
        self.threshold = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """``M``, broadcastable to ``weight``."""
        rows = weight.flatten(1)
        if self.structured:
            score = rows.norm(dim=1) / math.sqrt(rows.shape[1])
            return LongTailedStep.apply(score - self.threshold).reshape(-1, *[1] * (weight.dim() - 1))
        return LongTailedStep.apply(rows.abs() - self.threshold[:, None]).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask(weight)


class DST:
    """Dynamic Sparse Training of a deep copy of ``model``; ``model`` itself is never changed.

    Every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` is masked, or those that ``layers`` selects (qualified
    names, or a predicate ``(name, module) -> bool``). ``structured=True`` masks whole rows (the
    inferred structured variant: ``M_i = step(||W_i|| / sqrt(n_i) - t_i)``). Thresholds start at 0.

    The paper's settings: MNIST LeNet-300-100 and LeNet-5 use ``alpha=5e-4`` with SGD (lr 0.01,
    momentum 0.9, batch 64, 20 epochs); LSTMs Adam (lr 1e-3) with ``alpha=1e-4``; VGG-16 on
    CIFAR-10 SGD (lr 0.1, momentum 0.9, weight decay 1e-4) with ``alpha=5e-6``. No fine-tuning.

    ``dst.model`` is the trainable copy. Its masked weights use ``torch.nn.utils.parametrize``: in
    it, ``name.weight`` is ``W * M`` and the parameters are ``name.parametrizations.weight.original``
    (``W``) and ``name.parametrizations.weight.0.threshold`` (``t``). :meth:`finalize` gives back a
    plain model under the original parameter names.
    """

    def __init__(self, model: nn.Module, alpha: float = 5e-4, structured: bool = False, layers: LayerFilter = None):
        self.alpha = alpha
        self.structured = structured
        self.model = copy.deepcopy(model)
        self.layers = _select(self.model, layers)
        if not self.layers:
            raise ValueError("no nn.Linear or nn.Conv1d/2d/3d layer to mask")
        self._order = {name: list(module._parameters) for name, module in self.layers.items()}
        for module in self.layers.values():
            parametrize.register_parametrization(module, "weight", ThresholdMask(module.weight, structured))

    def _parts(self, name: str) -> tuple[torch.Tensor, ThresholdMask]:
        weights = self.layers[name].parametrizations.weight
        return weights.original, weights[0]

    def thresholds(self) -> dict[str, nn.Parameter]:
        """The threshold vector of every masked layer, by layer name."""
        return {name: self._parts(name)[1].threshold for name in self.layers}

    def penalty(self) -> torch.Tensor:
        """``alpha * sum over layers and rows of exp(-t_i)``, to add to the mean loss."""
        return self.alpha * sum(torch.exp(-t).sum() for t in self.thresholds().values())

    @torch.no_grad()
    def _row_masks(self) -> dict[str, torch.Tensor]:
        """Each layer's mask as a 0/1 tensor of the weight's shape flattened to (c_out, rest)."""
        out = {}
        for name in self.layers:
            weight, masker = self._parts(name)
            out[name] = masker.mask(weight).expand_as(weight).flatten(1)
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Reset to 0 the thresholds of every layer keeping ``RESET_DENSITY`` (1%) of its weights or
        fewer; call after each optimizer step."""
        for name, density in self.densities().items():
            if density <= RESET_DENSITY:
                self._parts(name)[1].threshold.zero_()

    def densities(self) -> dict[str, float]:
        """The fraction of weights each masked layer keeps (1 - its sparsity)."""
        return {name: float(m.sum()) / m.numel() for name, m in self._row_masks().items()}

    def density(self) -> float:
        """The fraction of all masked layers' weights that are kept."""
        masks = self._row_masks().values()
        return float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)

    def report(self) -> str:
        """A table of every masked layer: weights, kept weights, density, and the total."""
        rows = [(name, m.numel(), int(m.sum()), f"{float(m.sum()) / m.numel():.2%}")
                for name, m in self._row_masks().items()]
        total = sum(r[1] for r in rows)
        rows.append(("total", total, sum(r[2] for r in rows), f"{self.density():.2%}"))
        return tabulate(rows, ("layer", "weights", "kept", "density"), tablefmt="simple")

    def settings(self) -> dict[str, Any]:
        """The settings that decide how training goes on: runs that share a training state (the
        ranks of a distributed run, a resumed run) must agree on them."""
        return {"alpha": self.alpha, "structured": self.structured, "layers": list(self.layers)}

    def state_dict(self) -> dict[str, Any]:
        """The training state: ``dst.model``'s weights and thresholds."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from the :meth:`state_dict` of a DST with the same :meth:`settings`."""
        self.model.load_state_dict(state["model"])

    def finalize(self) -> nn.Module:
        """A plain copy of ``dst.model``: masked weights ``W * M`` baked in, thresholds gone, parameter
        names those of the original model."""
        final = copy.deepcopy(self.model)
        for name in self.layers:
            module = final.get_submodule(name)
            cls = type(module)  # shared with dst.model by the deep copy, and removal edits the class
            module.__class__ = type(cls.__name__, cls.__bases__, dict(vars(cls)))
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module._parameters = {k: module._parameters[k] for k in self._order[name]}  # weight first again
        return final

    def _alive(self) -> dict[str, torch.Tensor]:
        """Per masked layer, a bool per output channel: False where the whole row is masked."""
        return {name: m.any(1) for name, m in self._row_masks().items()}

    def masks(self, example_inputs: Any, analysis: Analysis | None = None) -> dict[str, torch.Tensor]:
        """Channel masks for :func:`fxprune.compact` of :meth:`finalize`, keyed by group name (True keeps).

        A channel is removed when every producer of its group is a masked layer whose row for it is
        entirely masked (several producers: a residual stream). Groups that are not prunable (the
        classifier, which reaches the output) keep everything, and so does a group with no live
        channel (removing it would remove a layer; :meth:`after_step` revives such layers anyway).
        ``analysis`` is
        ``fxprune.analyze(dst.finalize(), example_inputs)``, computed if not given.

        ``compact`` zeroes removed channels where they leave their producer (after a BatchNorm that
        directly follows it), while a dead filter still outputs a constant there (its bias through
        the BatchNorm). So ``compact(dst.finalize(), masks, x)`` equals the finalized model only
        where those constants are zero; :meth:`compact` folds them first.
        """
        analysis = analysis if analysis is not None else analyze(self.finalize(), example_inputs)
        alive = self._alive()
        out = {}
        for g in analysis.groups:
            if not g.prunable or not all(p in alive for p in g.producers):
                continue
            keep = torch.zeros(g.size, dtype=torch.bool)
            for p in g.producers:
                rows = next(m for m in g.members if m.kind == "param" and m.name == f"{p}.weight" and m.dim == 0)
                keep.index_put_((rows.unit,), alive[p][rows.index].cpu(), accumulate=True)
            if keep.any() and not keep.all():
                out[g.name] = keep
        return out

    def compact(self, example_inputs: Any) -> torch.fx.GraphModule:
        """The finalized model (eval mode) without its dead channels: a dense GraphModule with the
        same outputs.

        The constant a removed channel carries to each consumer is folded into that consumer's bias
        (and the consumer stops reading the channel) where that is exact: a linear layer or an
        unpadded convolution. A channel with any other non-zero value is kept. What was folded or
        kept is listed in ``result.meta["fxprune_report"]``.
        """
        final = self.finalize().eval()
        analysis = analyze(final, example_inputs)
        masks, report = _fold_dead(final, analysis, self.masks(example_inputs, analysis), example_inputs)
        small = compact_graph(final, masks, example_inputs)
        small.meta["fxprune_report"] = report + small.meta["fxprune_report"]
        return small


def _select(model: nn.Module, layers: LayerFilter) -> dict[str, nn.Module]:
    """The modules to mask, by qualified name."""
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, MASKED_LAYERS)}
    if layers is None:
        return candidates
    if callable(layers):
        return {name: m for name, m in candidates.items() if layers(name, m)}
    names = list(layers)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise ValueError(f"layers {unknown} are not nn.Linear or nn.Conv1d/2d/3d modules of the model")
    return {n: candidates[n] for n in names}


@torch.no_grad()
def _fold_dead(model: nn.Module, analysis: Analysis, masks: dict[str, torch.Tensor], example_inputs: Any):
    """Fold, in place in ``model``, the constants that removed channels carry into their consumers'
    biases and zero the consumers' weights for them; returns the masks with the channels that could
    not be folded kept, and the adjustments made."""
    plan = resolve(analysis, masks)
    lost = []
    for m in analysis.space.members:
        if m.role == "in":
            index = ((m.atoms >= 0) & ~plan.kept(m.atoms)).nonzero().flatten()
            if len(index):
                lost.append((m, index))
    values = consumer_inputs(analysis.gm, {(m.node, m.input_arg) for m, _ in lost}, example_inputs)
    keep, folds, report = plan_folds(analysis.gm, plan, lost, values)
    for fold in folds:
        module = model.get_submodule(fold.module)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(fold.delta))
        module.bias.add_(fold.delta)
    for m, index in lost:
        roots = analysis.roots[m.atoms[index]]
        gone = index[torch.tensor([int(r) not in keep for r in roots], dtype=torch.bool)]
        model.get_parameter(m.owner).index_fill_(m.dim, gone, 0)
    masks = {k: v.clone() for k, v in masks.items()}
    for root in keep:
        gi, ui = analysis.unit_of[root]
        masks[analysis.groups[gi].name][ui] = True
    return masks, report
