"""GrowEfficient: grow and prune channels and layers from a small seed with sampled gates.

Yuan, Savarese and Maire, "Growing Efficient Deep Networks by Structured Continuous
Sparsification", ICLR 2021. Every unit of a prunable channel group and every removable layer
(residual branch) has a logit ``s``. In training its gate is a sample of Bernoulli(sigma(beta * s))
whose gradient is that of sigma(beta * s) (straight-through); in eval it is ``s > 0``. ``beta`` grows
every epoch, from 1 to ``beta_final``, so the gates harden. A budget-aware penalty on the expected
cost pushes the gates off while the architecture costs more than the target and on while it costs
less. Only a seed starts on; the final architecture is ``s > 0``, without fine-tuning.

>>> ge = GrowEfficient(model, x, target=0.5, metric="flops", epochs=10)
>>> opt = torch.optim.SGD(ge.weights(), lr=0.1, momentum=0.9)
>>> for epoch in range(10):
...     for x, y in loader:
...         loss = F.cross_entropy(ge.model(x), y) + ge.penalty()
...         opt.zero_grad(); ge.gate_optimizer.zero_grad()
...         loss.backward()
...         opt.step(); ge.gate_optimizer.step()
...     ge.after_epoch()
>>> small, mapping = ge.compact()
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from tabulate import tabulate
from torch import nn

from fxprune.passes.insert_gates import gates_of, insert_gates

from ..analysis import Analysis, analyze
from ..compact import compact as compact_model
from ..cost import Cost
from ..grow import grow
from ..mapping import Mapping, TensorMap
from ..masks import DEFAULT_ROUND_TO, check_round_to, rounded
from ..modules.gate import WRAPPERS, Gate
from ..optim import load_named_state_dict, named_state_dict, remap_optimizer
from .budget import METRICS, Budget, gated_groups
from .sampled_gate import GateSample, SampledGate


class GrowEfficient:
    """Train a deep copy of ``model`` with sampled channel and layer gates toward a cost budget.

    ``target`` is the cost to reach as a fraction of ``model``'s (``metric`` "flops": FLOPs of one
    call on ``example_inputs``; "params": parameter count), as :class:`~.budget.Budget` computes it.

    Choices the paper leaves open, each a parameter:

    - Seed: the first ``ceil(seed * size)`` units of each gated group (those prunable exactly:
      :func:`~.budget.gated_groups`) start with ``s = +s0``, the others with ``s = -s0``; a fraction
      ``seed_layers`` of the removable layers, evenly spread, start on. At ``beta = 1`` an off unit
      is still sampled with probability sigma(-s0).
    - Sampling: one sample per unit per forward pass, shared by the whole batch (one subnetwork
      per step).
    - Penalty: ``lam_t * E[cost] / unit_cost``. E[cost] comes from the probabilities sigma(beta * s)
      (:class:`~.budget.Budget`: a layer's contents are weighted by its own gate too);
      ``unit_cost`` is the mean cost of a unit of the original model, so the penalty pulls on each
      unit with ``lam_t`` times its cost relative to an average unit, whatever the model's size.
      A layer gate's pull is divided by the layer's cost in average units, so that a layer moves
      at the pace of one unit (with its full cost it jumps off or on in a step and overshoots).
    - Controller: ``lam_t = lam * clip((c_t - target) / tol, -1, 1)``, with ``c_t`` the cost
      fraction of the current architecture (``s > 0``), updated at every :meth:`penalty`: full
      strength beyond ``tol`` of the target, proportional within it, positive above the budget
      (prune) and negative below it (grow). Being proportional, it settles within about ``tol`` of
      the target, where the task loss balances it.
    - ``beta`` is multiplied by ``beta_final ** (1 / (epochs - 1))`` in :meth:`after_epoch`, so the
      last of ``epochs`` epochs trains at ``beta_final``.
    - Logits have their own SGD (``lr``, Nesterov momentum ``momentum``, no weight decay).
    - A group left with no unit on keeps its unit of highest ``s`` (or, inside a removable layer,
      removes that layer, as :func:`fxprune.compact` does), so the masks always compact. The
      eval-mode gated model then differs from the compacted one (it has the group empty, and a
      layer's branch still adds the constant its emptied group leaves).
    - ``round_to`` (default 8; 1: no rounding): the final architecture keeps channel counts at
      multiples of ``round_to`` (the channel block the hardware computes in: 8 halves for a GPU's
      tensor cores, 16 floats for an AVX-512 CPU), the off units of highest ``s`` filling up each group, and the controller
      measures the cost of that rounded architecture, so that the model :meth:`compact` returns
      meets the target; :meth:`resize` keeps room for it (a group of ``n`` units on keeps at least
      ``ceil(n / round_to) * round_to`` units, or all of the original model's), which trains a
      wider model than the reserve alone would.
    - Physical resizing (:meth:`resize`, called every few steps by :func:`~.train.fit`): the units
      that are off go, except a reserve: the ``ceil(reserve * on)`` off units of highest ``s`` in
      each group while the architecture costs less than the target, else none beyond the minimum (at
      least one, and two units in all, since :func:`fxprune.grow` cannot widen a single channel):
      a reserve costs training time, and at or above the target nothing needs room to grow. A group whose reserve ran short (its units turned on) grows new units
      (:func:`fxprune.grow`, ``init="random"``, which keeps the function) with ``s = -s0 / beta``,
      so that they are sampled with probability sigma(-s0) whatever ``beta`` is; reserve units
      below that are raised to it, so that a reserve pushed far off can still come back. A layer
      whose gate is off goes once its sampling probability is below ``layer_drop``.

    ``ge.model`` is the gated GraphModule to train (:meth:`weights` are its weights, without the
    logits); its gates are ``gates_of(ge.model)``. ``ge.base`` is the same model without gates: it
    holds the very tensors ``ge.model`` trains. ``model`` itself is never changed.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target: float = 0.5, metric: str = "flops", *,
                 epochs: int, seed: float = 0.25, seed_layers: float = 1.0, s0: float = 1.0,
                 beta_final: float = 200.0, lam: float = 0.5, tol: float = 0.05, lr: float = 0.1,
                 momentum: float = 0.9, reserve: float = 0.25, layer_drop: float = 0.01, round_to: int = DEFAULT_ROUND_TO):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not 0 < target <= 1:
            raise ValueError(f"target must be a fraction of the original cost in (0, 1], got {target}")
        check_round_to(round_to)
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        self.example_inputs, self.target, self.metric = example_inputs, target, metric
        self.s0, self.lam0, self.tol, self.lam = s0, lam, tol, 0.0
        self.reserve, self.layer_drop, self.round_to = reserve, layer_drop, round_to or 1
        self.beta, self.beta_final = 1.0, beta_final
        self.beta_growth = beta_final ** (1 / (epochs - 1)) if epochs > 1 else 1.0
        base = copy.deepcopy(model)
        analysis = analyze(base, example_inputs)
        self._sizes = {g.name: g.size for g in analysis.groups}  # the original model's group sizes
        if not gated_groups(analysis) and not analysis.layers:
            raise ValueError(f"GrowEfficient: {type(model).__name__} has no exactly prunable channel group and no "
                             f"removable layer to gate (see fxprune.analyze(model, example_inputs))")
        budget = Budget(analysis, example_inputs)
        self.dense = budget.dense[metric]  # the original model's cost: targets are fractions of it
        costs = budget.unit_costs(metric)
        self.unit_cost = float(torch.cat([costs[g] for g in budget.groups]).mean())
        self._build(base, _seed_logits(analysis, seed, seed_layers, s0), analysis, budget)
        self.gate_optimizer = torch.optim.SGD(self.logits_parameters(), lr=lr, momentum=momentum, nesterov=True,
                                              weight_decay=0.0)

    def _build(self, base: nn.Module, logits: dict[str, torch.Tensor], analysis: Analysis,
               budget: Budget | None = None) -> None:
        """Gate ``base``: ``self.model`` becomes a gated copy whose gate ``key`` starts at ``logits[key]``."""
        self.base, self.analysis = base, analysis
        self.budget = budget if budget is not None else Budget(analysis, self.example_inputs, like=self.budget)
        self._sample = sample = GateSample()
        self.model = insert_gates(analysis, lambda key, size: SampledGate(key, logits[key], self.beta, sample),
                                  groups=gated_groups(analysis), share_tensors=True)
        self._gates = {g.key: g for g in sample.gates}
        device = next(iter(self._gates.values())).weight.device
        self._layout = _Layout.of(self._gates, self.budget, analysis)  # on the CPU, as the architecture
        self._hard: tuple[torch.Tensor, tuple[float, float]] | None = None  # the last architecture and its cost
        costs = self.budget.unit_costs(self.metric)
        self._layer_pace = torch.tensor([min(1.0, self.unit_cost / max(float(costs[name]), 1e-12))
                                         for name in self.budget.layers], dtype=torch.double, device=device)

    def gates(self) -> dict[str, SampledGate]:
        """The gates of ``ge.model`` by key (group or layer name)."""
        return dict(self._gates)

    def logits_parameters(self) -> list[nn.Parameter]:
        """The logit vector of every gate."""
        return [g.weight for g in self._gates.values()]

    def weights(self) -> Iterator[nn.Parameter]:
        """The parameters of ``ge.model`` other than the logits: give these to the weight optimizer."""
        logits = {id(p) for p in self.logits_parameters()}
        return (p for p in self.model.parameters() if id(p) not in logits)

    def probabilities(self) -> dict[str, torch.Tensor]:
        """sigma(beta * s) of every gate, by key (differentiable)."""
        p = self._sample.probabilities()
        return dict(zip(self._gates, p.split([g.weight.numel() for g in self._gates.values()])))

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor | bool]:
        """The current architecture: ``s > 0`` per group unit (a bool tensor) and per layer (a bool)."""
        keep = self._layout.hard(self._logits()).split([g.weight.numel() for g in self._gates.values()])
        return {key: bool(k) if key in self._layout.layer_keys else k for key, k in zip(self._gates, keep)}

    def cost(self) -> Cost:
        """FLOPs (one call on ``example_inputs``) and parameters of the current architecture."""
        return Cost(*(round(value) for value in self._architecture_cost()))

    def fraction(self) -> float:
        """The current architecture's cost in ``metric`` as a fraction of the original model's."""
        return self._architecture_cost()[METRICS.index(self.metric)] / self.dense

    @torch.no_grad()
    def _architecture_cost(self) -> tuple[float, float]:
        """FLOPs and parameters of ``s > 0``, recomputed only when some gate crossed zero."""
        hard = self._layout.hard(self._logits())
        if self._hard is None or not torch.equal(hard, self._hard[0]):
            if self.round_to > 1:  # the architecture compact() returns
                masks = rounded(self.analysis, self.masks(), self.round_to, self._scores())
                flat, layers = self.budget.flat(masks), self.budget.layer_probabilities(masks)
            else:
                flat, layers = self._layout.budget_inputs(hard.double())
            self._hard = hard, tuple(float(self.budget.evaluate(flat, layers, metric)) for metric in METRICS)
        return self._hard[1]

    def _logits(self) -> torch.Tensor:
        """Every gate's logits, in gate order, on the CPU (where architectures are decided)."""
        return torch.cat([g.weight.detach() for g in self._gates.values()]).cpu()

    def penalty(self) -> torch.Tensor:
        """``lam_t * E[cost] / unit_cost``, to add to the loss; updates ``lam_t`` (``ge.lam``) from
        the gap between the current architecture's cost and the target."""
        gap = self.fraction() - self.target
        self.lam = self.lam0 * max(-1.0, min(1.0, gap / self.tol))
        p = self._sample.probabilities()
        flat, layers = self._layout.budget_inputs(p.double())
        layers = layers.detach() + (layers - layers.detach()) * self._layer_pace  # same value, gradient scaled
        return self.lam * self.budget.evaluate(flat, layers, self.metric) / self.unit_cost

    def after_epoch(self) -> None:
        """Multiply ``beta`` by ``beta_growth`` (up to ``beta_final``); call after each epoch."""
        self.beta = min(self.beta * self.beta_growth, self.beta_final)
        for g in self._gates.values():
            g.beta = self.beta

    def settings(self) -> dict[str, float | str]:
        """The settings that decide how training goes on, with the original model's cost and unit
        cost: runs that share a training state (the ranks of a distributed run, a resumed run) must
        agree on them."""
        return {"metric": self.metric, "target": self.target, "s0": self.s0, "lam": self.lam0, "tol": self.tol,
                "reserve": self.reserve, "layer_drop": self.layer_drop, "beta_final": self.beta_final,
                "beta_growth": self.beta_growth, "round_to": self.round_to, "dense": self.dense,
                "unit_cost": self.unit_cost}

    def state_dict(self) -> dict[str, Any]:
        """The training state: the physical model with the trained weights (a GraphModule, which
        ``fxprune.save`` can store), every gate's logits, ``beta``, ``lam_t`` and the gate
        optimizer's state (by parameter name)."""
        return {"base": self.analysis.gm,  # ge.base traced: the same modules and tensors
                "logits": {k: g.weight.detach().clone() for k, g in self.gates().items()},
                "beta": self.beta, "lam": self.lam, "gate_optimizer": named_state_dict(self.gate_optimizer, self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from the :meth:`state_dict` of a GrowEfficient with the same :meth:`settings`:
        ``ge.base``, ``ge.model`` and the gate optimizer are rebuilt at the saved architecture, so
        the weight optimizer must be given the new :meth:`weights`."""
        base = state["base"]
        self.beta, self.lam = float(state["beta"]), float(state["lam"])
        self._build(base, state["logits"], analyze(base, self.example_inputs))
        self.gate_optimizer = load_named_state_dict(self.gate_optimizer, self.model, state["gate_optimizer"])

    @torch.no_grad()
    def report(self) -> str:
        """A table of every gate: units, units on, mean probability; and the cost fraction."""
        rows = [(key, g.weight.numel(), int((g.weight > 0).sum()), f"{float(g.probabilities().mean()):.3f}")
                for key, g in self.gates().items()]
        table = tabulate(rows, ("gate", "units", "on", "mean p"), tablefmt="simple")
        summary = f"{self.metric}: {self.fraction():.2%} of dense (target {self.target:.0%}), beta {self.beta:.3g}"
        return f"{table}\n{summary}"

    def compact(self, round_to: int | None = None) -> tuple[torch.fx.GraphModule, Mapping]:
        """The final architecture (``s > 0``) as a dense model with the trained weights, and the
        mapping of its tensors from ``ge.base``. ``round_to`` (default ``ge.round_to``, whose
        rounded architecture the controller counted) keeps channel counts at its multiples, adding the off units of
        highest ``s`` (zeroed: the same function); ``round_to=1`` keeps exactly the units that are on."""
        round_to = self.round_to if round_to is None else round_to
        return compact_model(self.base, self.masks(), self.example_inputs, return_mapping=True,
                             round_to=round_to, scores=self._scores())

    def _scores(self) -> dict[str, torch.Tensor]:
        """The logits of every group gate: which off units rounding keeps first."""
        return {key: gate.weight.detach().cpu() for key, gate in self._gates.items()
                if key not in self._layout.layer_keys}

    @torch.no_grad()
    def resize(self) -> Mapping:
        """Physically drop the units and layers that are off (keeping each group's reserve), grow
        groups whose reserve ran short, and gate the result; ``ge.gate_optimizer`` is carried over.
        Returns the mapping of the parameters of the previous ``ge.model`` to the new one, for
        :func:`fxprune.remap_optimizer` of the weight optimizer. The eval-mode function is kept."""
        old_model, old_analysis, gates = self.model, self.analysis, self.gates()
        logits_of = {key: g.weight.detach().cpu() for key, g in gates.items()}  # decisions on the CPU
        keep, wanted = self._physical_masks(logits_of)
        base, mapping, analysis = compact_model(self.base, keep, self.example_inputs, analysis=old_analysis,
                                                return_mapping=True, return_analysis=True)
        sources = _unit_sources(old_analysis, analysis, mapping)
        widen = {name: wanted[name] - int((logits_of[name][src] <= 0).sum()) for name, src in sources.items()}
        widen = {name: n for name, n in widen.items() if n > 0 and len(sources[name]) >= 2}
        if widen:
            base, grown, analysis = grow(base, self.example_inputs, widen=widen, init="random", analysis=analysis,
                                         return_analysis=True)
            mapping = _compose(mapping, grown)
            sources = _unit_sources(old_analysis, analysis, mapping)
        candidate = -self.s0 / self.beta
        logits = {layer.name: logits_of[layer.name].clone() for layer in analysis.layers}
        for key, src in sources.items():
            s = torch.where(src >= 0, logits_of[key][src.clamp(min=0)], candidate)
            logits[key] = torch.where(s > 0, s, s.clamp(min=candidate))  # the reserve stays within reach
        self._build(base, logits, analysis)
        self.model.train(old_model.training)
        mapping = _gated_mapping(old_model, self.model, mapping, sources)
        self.gate_optimizer = _remap_gates(self.gate_optimizer, old_model, self.model, mapping)
        return mapping

    def _physical_masks(self, logits: dict[str, torch.Tensor]) -> tuple[dict, dict[str, int]]:
        """What :meth:`resize` keeps of gates with these ``logits``: masks of the units on plus each
        group's reserve, and of the layers on or still likely; and the reserve each group wants."""
        keep: dict = {}
        for layer in self.analysis.layers:
            s = logits[layer.name]
            keep[layer.name] = bool(s > 0) or float(torch.sigmoid(self.beta * s)) >= self.layer_drop
        dropped = {name for layer in self.analysis.layers if not keep[layer.name] for name in layer.groups}
        wanted = {}
        reserve = self.reserve if self.fraction() < self.target else 0.0  # room to grow only below the target
        for key, s in logits.items():
            if key in keep or key in dropped:
                continue
            on = s > 0
            n_on = int(on.sum())
            wanted[key] = max(1, 2 - n_on, math.ceil(reserve * n_on))  # two units at least: one cannot grow
            if self.round_to > 1:  # room for the rounded architecture that compact() returns
                wanted[key] = max(wanted[key], min(-(-n_on // self.round_to) * self.round_to, self._sizes[key]) - n_on)
            off = (~on).nonzero().flatten()
            keep[key] = on.clone()
            keep[key][off[s[off].argsort(descending=True)[:wanted[key]]]] = True
        return keep, wanted


@dataclass
class _Layout:
    """Where each gate's units sit in the concatenated logits of all gates (gate order), and how
    they feed the budget: ``flat_index`` gathers :meth:`Budget.flat`'s vector from the logits'
    probabilities followed by a 1, ``layer_index`` each layer's own probability."""

    flat_index: torch.Tensor
    layer_index: torch.Tensor
    layer_keys: frozenset[str]
    always_on: list[tuple[int, int]]  # (offset, size) of each group gate outside every layer

    @staticmethod
    def of(gates: dict[str, Gate], budget: Budget, analysis: Analysis) -> _Layout:
        sizes = [g.weight.numel() for g in gates.values()]
        offsets = dict(zip(gates, [0, *itertools.accumulate(sizes)]))
        one = sum(sizes)
        flat = [torch.arange(offsets[name], offsets[name] + size) if name in gates else torch.full((size,), one)
                for name, size in budget.groups.items()]
        inside = {name for layer in analysis.layers for name in layer.groups}
        return _Layout(
            flat_index=torch.cat(flat + [torch.tensor([one])]),
            layer_index=torch.tensor([offsets[name] for name in budget.layers], dtype=torch.long),
            layer_keys=frozenset(budget.layers),
            always_on=[(offsets[key], size) for (key, size) in zip(gates, sizes)
                       if key not in budget.layers and key not in inside],
        )

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        """``s > 0``, with the unit of highest ``s`` on in each group outside every layer that has none on."""
        keep = logits > 0
        for start, size in self.always_on:
            if not keep[start:start + size].any():
                keep[start + int(logits[start:start + size].argmax())] = True
        return keep

    def budget_inputs(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`Budget.evaluate`'s two inputs from one value per unit of every gate, in gate order."""
        ext = torch.cat([values, values.new_ones(1)])
        return ext[self.flat_index], ext[self.layer_index]


def _seed_logits(analysis: Analysis, seed: float, seed_layers: float, s0: float) -> dict[str, torch.Tensor]:
    """+s0 for the seed (the first units of each group, evenly spread layers), -s0 elsewhere."""
    logits = {}
    for name in gated_groups(analysis):
        size = analysis.group(name).size
        logits[name] = torch.where(torch.arange(size) < max(1, math.ceil(seed * size)), s0, -s0)
    n = len(analysis.layers)
    on = set(torch.linspace(0, n - 1, math.ceil(seed_layers * n)).round().long().tolist()) if n else set()
    for i, layer in enumerate(analysis.layers):
        logits[layer.name] = torch.tensor([s0 if i in on else -s0])
    return logits


def _base_names(gated: nn.Module) -> dict[str, str]:
    """Name in ``gated`` -> name in the ungated model, for every parameter and buffer outside the
    gates (a module wrapped in a GatedModule or GatedBatchNorm holds its tensors under ``<path>.module.``)."""
    wrapped = [f"{path}.module." for path, m in gated.named_modules() if isinstance(m, WRAPPERS)]
    out = {}
    for name, _ in [*gated.named_parameters(), *gated.named_buffers()]:
        if not name.startswith("gates."):
            inner = next((w for w in wrapped if name.startswith(w)), None)
            out[name] = name if inner is None else inner[:-len("module.")] + name[len(inner):]
    return out


def _unit_sources(old: Analysis, new: Analysis, mapping: Mapping) -> dict[str, torch.Tensor]:
    """Per gated group of ``new``: the unit of ``old``'s group of the same name that each of its
    units comes from (-1: a new unit), read through ``mapping`` (old model -> new model)."""
    out = {}
    for name in gated_groups(new):
        g = new.group(name)
        m = next(m for m in g.members if m.kind == "param")
        tm = mapping[m.name]
        before = next(o for o in old.group(g.name).members
                      if o.kind == "param" and o.name == tm.source and o.dim == m.dim)
        unit_at = torch.full((int(before.index.max()) + 1,), -1)
        unit_at[before.index] = before.unit
        index = tm.index.get(m.dim)
        old_index = m.index if index is None else index[m.index]
        src = torch.full((g.size,), -1)
        src[m.unit] = torch.where(old_index >= 0, unit_at[old_index.clamp(min=0)], -1)
        out[g.name] = src
    return out


def _compose(first: Mapping, second: Mapping) -> Mapping:
    """The mapping of two rewrites in a row: ``first`` (A -> B), then ``second`` (B -> C)."""
    out = {}
    for name, tm in second.items():
        before = first.get(tm.source) if tm.source is not None else None
        if before is None:
            out[name] = TensorMap(None)
            continue
        index = dict(before.index)
        for d, idx in tm.index.items():
            index[d] = torch.where(idx >= 0, before.index[d][idx.clamp(min=0)], -1) if d in before.index else idx
        out[name] = TensorMap(before.source, index)
    return out


def _gated_mapping(old: nn.Module, new: nn.Module, mapping: Mapping, sources: dict[str, torch.Tensor]) -> Mapping:
    """The mapping of the parameters of gated model ``old`` to those of gated model ``new``, from
    ``mapping`` between their ungated models and, per group gate, the old unit of each new unit."""
    to_old = {b: n for n, b in _base_names(old).items()}
    to_base = _base_names(new)
    old_paths = {g.key: path for path, g in old.named_modules() if isinstance(g, Gate)}
    out = {}
    for path, m in new.named_modules():
        if isinstance(m, Gate):
            source = old_paths.get(m.key)
            out[f"{path}.weight"] = TensorMap(f"{source}.weight" if source else None,
                                              {0: sources[m.key]} if m.key in sources else {})
    for name, _ in new.named_parameters():
        if name in to_base:
            tm = mapping[to_base[name]]
            out[name] = TensorMap(to_old.get(tm.source) if tm.source is not None else None, tm.index)
    return out


def _remap_gates(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module,
                 mapping: Mapping) -> torch.optim.Optimizer:
    """``optimizer`` of the gates of gated model ``old`` carried over to those of ``new``: only the
    ``gates`` submodules are remapped, so that no other parameter can join it."""
    inner = {name[len("gates."):]: TensorMap(tm.source[len("gates."):] if tm.source else None, tm.index)
             for name, tm in mapping.items() if name.startswith("gates.")}
    return remap_optimizer(optimizer, old.gates, new.gates, inner)
