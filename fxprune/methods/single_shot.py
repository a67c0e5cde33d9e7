"""Single Shot Structured Pruning before training (3SP).

van Amersfoort, Alizadeh, Farquhar, Lane and Gal, "Single Shot Structured Pruning Before
Training", 2020. Every unit of a prunable channel group gets a gate ``c_u = 1``; one forward and
backward pass on one batch gives ``|dL/dc_u|``, the loss's sensitivity to removing the unit. Divided
by what the unit costs, it ranks all units of the model together, and the lowest go until the
network fits the budget.

>>> ss = SingleShot(model, x)
>>> masks = ss.masks((x, y), F.cross_entropy, target=0.5, metric="flops")
>>> small = ss.compact(masks, reinit=True)  # then train ``small`` from scratch
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxprune.passes.insert_gates import gates_of, insert_gates

from ..analysis import analyze
from ..compact import compact as compact_model
from ..masks import DEFAULT_ROUND_TO, rounded
from ..trace import as_tuple
from .budget import METRICS, Budget, gated_groups


class SingleShot:
    """3SP for ``model``, which is never changed; ``example_inputs`` fix the FLOPs counted.

    - Scores: ``|dL/dc_u| / cost_u``, where ``c_u`` is the gate of unit ``u`` (:func:`insert_gates`,
      on every exactly prunable group: :func:`~.budget.gated_groups`)
      and ``cost_u`` what the unit costs in the budget's metric (:meth:`Budget.unit_costs`: its
      producers' share plus what its consumers spend on it). A gate belongs to a whole group, so
      coupled channels (a residual stream, every producer of the group) are scored as one unit:
      the gradient of its gate is the sum over every place it multiplies.
    - The pass runs the model in eval mode: BatchNorm on its running statistics (in training mode
      its scale invariance would make the gradient of a gate before it vanish) and no dropout, so
      the score is deterministic.
    - Ranking: the units are sorted by score, lowest first, and removed in that order (the fewest
      that bring the cost, as :class:`Budget` computes it, to ``target`` times the dense cost).
      Each group keeps its best unit: 3SP prunes channels and hidden units, never whole layers.
    """

    def __init__(self, model: nn.Module, example_inputs: Any):
        self.model = model
        self.example_inputs = example_inputs
        self.analysis = analyze(model, example_inputs)
        self.budget = Budget(self.analysis, example_inputs)

    def sensitivities(self, batch: tuple[Any, Any],
                      loss_fn: Callable[[Any, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``|dL/dc_u|`` for every unit, by group, from one pass on ``batch = (inputs, targets)``."""
        gated = insert_gates(self.analysis, groups=gated_groups(self.analysis), layers=[]).eval()
        gates = gates_of(gated)
        inputs, targets = batch
        loss = loss_fn(gated(*as_tuple(inputs)), targets)
        grads = torch.autograd.grad(loss, [g.weight for g in gates])
        return {g.key: grad.abs() for g, grad in zip(gates, grads)}

    def scores(self, batch: tuple[Any, Any], loss_fn: Callable[[Any, Any], torch.Tensor],
               metric: str = "flops") -> dict[str, torch.Tensor]:
        """``|dL/dc_u| / cost_u`` for every unit, by group (a unit that costs nothing scores inf)."""
        costs = self.budget.unit_costs(metric)
        return {key: torch.where(costs[key] > 0, s / costs[key], torch.inf)
                for key, s in self.sensitivities(batch, loss_fn).items()}

    @torch.no_grad()
    def rank(self, scores: dict[str, torch.Tensor], target: float, metric: str = "flops",
             round_to: int | None = None) -> dict[str, torch.Tensor]:
        """Masks that remove the lowest-scoring units, the fewest that bring the cost to ``target``
        times the dense cost; each group keeps its best unit. Warns if the target is out of reach.
        ``round_to``: every group keeps a multiple of ``round_to`` channels (or all of them), the
        removed units of highest score coming back, and the target holds for that architecture."""
        keys = list(scores)
        candidates = []  # (score, group, unit), every unit but each group's best
        for key in keys:
            s = scores[key]
            best = int(s.argmax())
            candidates += [(float(s[u]), key, u) for u in range(len(s)) if u != best]
        candidates.sort(key=lambda c: c[0])
        limit = target * self.budget.dense[metric]

        def masks_without(k: int) -> dict[str, torch.Tensor]:
            masks = {key: torch.ones(len(scores[key]), dtype=torch.bool) for key in keys}
            for _, key, u in candidates[:k]:
                masks[key][u] = False
            return rounded(self.analysis, masks, round_to, scores) if round_to else masks

        def cost(k: int) -> float:
            return float(self.budget.expected({key: m.float() for key, m in masks_without(k).items()}, metric))

        lo, hi = 0, len(candidates)  # the cost only falls as units go: bisect for the fewest removals
        if cost(hi) > limit:
            warnings.warn(f"SingleShot: target {target:.3g} of the dense {metric} is out of reach keeping one unit "
                          f"per group; reached {cost(hi) / self.budget.dense[metric]:.3g}", stacklevel=2)
            return masks_without(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost(mid) <= limit else (mid + 1, hi)
        return masks_without(lo)

    def masks(self, batch: tuple[Any, Any], loss_fn: Callable[[Any, Any], torch.Tensor], target: float = 0.5,
              metric: str = "flops", round_to: int | None = DEFAULT_ROUND_TO) -> dict[str, torch.Tensor]:
        """Keep masks for every prunable group that bring the cost in ``metric`` ("flops" or
        "params") to ``target`` times the dense cost, from one pass on ``batch``; ``round_to``
        (default 8, as :meth:`compact` rounds; 1 or None: no rounding): channel counts at its
        multiples (:meth:`rank`), which the hardware runs fastest."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not 0 < target <= 1:
            raise ValueError(f"target must be a fraction of the dense cost in (0, 1], got {target}")
        return self.rank(self.scores(batch, loss_fn, metric), target, metric, round_to)

    def compact(self, masks: dict[str, torch.Tensor], reinit: bool = False, round_to: int = DEFAULT_ROUND_TO,
                scores: dict[str, torch.Tensor] | None = None) -> torch.fx.GraphModule:
        """``model`` without the masked units; ``reinit=True`` then re-initialises every module that
        has ``reset_parameters`` (training from scratch, as the paper does). ``round_to`` (default 8,
        for tensor cores and SIMD kernels) keeps channel counts at its multiples, adding the masked
        units of highest ``scores`` (from :meth:`scores`; else the first ones; zeroed, so the function
        is the same); ``round_to=1`` removes exactly the masked units."""
        small = compact_model(self.model, masks, self.example_inputs, round_to=round_to, scores=scores)
        if reinit:
            for module in small.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return small
