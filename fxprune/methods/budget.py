"""Expected cost of a model as a differentiable function of per-unit keep probabilities.

Every unit of a prunable channel group stays with probability ``p`` and every removable layer
with probability ``q``, independently. The FLOPs of each node (per call, counted by
``FlopCounterMode`` on the example inputs) scale with the fraction of its weight entries that
stay: for a weight whose dims hold channels, ``numel * prod over those dims of mean(p)`` (an entry
in no group counts as 1), so a conv or linear layer costs ``F * mean_in(p) * mean_out(p)`` and a
depthwise conv, whose in and out channels are one unit ("channel" dim), ``F * mean(p)``. A node
without such weights (a matmul of two activations) has a fixed cost. Parameters scale the same
way, tensor by tensor. Everything inside a removable layer's branch is multiplied by the
probability that the layer stays: ``q`` times, for each group whose emptying removes that layer,
the probability ``1 - prod(1 - p)`` that it keeps a unit. With 0/1 probabilities the result is
the cost of ``fxprune.compact`` of the corresponding masks (matmul- and convolution-like FLOPs,
as :func:`fxprune.cost` counts them).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import Analysis
from ..masks import innermost_layer
from ..trace import as_tuple

METRICS = ("flops", "params")
Probabilities = Mapping[str, "torch.Tensor | bool"]  # group -> p per unit; layer -> q (one element, or a bool)


class _FlopsPerNode(torch.fx.Interpreter):
    """Runs the graph and counts the FLOPs of every node on its own."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return out


def flops_per_node(gm: torch.fx.GraphModule, example_inputs: Any) -> dict[str, int]:
    """The FLOPs of every node of ``gm`` for one call on ``example_inputs``, run on a copy in eval
    mode with gradients enabled (so that attention takes its unfused path, whose matrix products
    the counter sees)."""
    counter = _FlopsPerNode(copy.deepcopy(gm).eval())
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):  # RNNs as matrix products, as fxprune.cost counts them
            counter.run(*as_tuple(example_inputs))
    return counter.flops


def gated_groups(analysis: Analysis) -> list[str]:
    """The groups whose units the methods gate: prunable exactly (``compact`` removes their units
    without changing the others; a LayerNorm over a group makes it approximate)."""
    return [g.name for g in analysis.groups if g.prunable and g.exact]


@dataclass
class _Term:
    """``weight`` (dense FLOPs or parameters) times the mean keep probability of the entries along
    each of ``dims`` (indices into the flat probability vector) times the probability that each of
    ``layers`` stays."""

    weight: float
    dims: list[torch.Tensor]
    layers: list[int]


@dataclass
class _Share:
    """A node's FLOPs spent multiplying ``weight`` (a parameter of ``numel`` entries), or, without
    a weight, a fixed cost of a node whose inputs and output had ``shapes``."""

    weight: str | None
    flops: float
    numel: int
    shapes: list | None = None


def _shapes(node: torch.fx.Node) -> list:
    """The shapes of ``node``'s inputs and output, as shape propagation recorded them."""
    return [getattr(x.meta.get("tensor_meta"), "shape", None) for x in (*node.all_input_nodes, node)]


@dataclass
class _Polynomial:
    """Terms in tensors, for one vectorised evaluation: term ``t`` is ``weight[t]`` times the mean
    of ``flat[entries]`` over each of its segments ``dims[t]`` times ``alive[layers[t]]``, both
    padded with the index of a constant 1 (the last segment, and the last of ``alive``)."""

    weight: torch.Tensor  # (terms,)
    dims: torch.Tensor  # (terms, most dims): segment indices
    layers: torch.Tensor  # (terms, most layers): layer indices
    entries: torch.Tensor  # flat indices of every segment's entries, one segment after another
    segment: torch.Tensor  # the segment of each entry
    counts: torch.Tensor  # entries per segment

    @staticmethod
    def of(terms: list[_Term], one: int, n_layers: int) -> _Polynomial:
        parts = [index for t in terms for index in t.dims] + [torch.tensor([one])]
        first = [0, *itertools.accumulate(len(t.dims) for t in terms)]
        entries, segment = _segments(parts)
        return _Polynomial(
            weight=torch.tensor([t.weight for t in terms], dtype=torch.double),
            dims=_padded([list(range(first[i], first[i + 1])) for i in range(len(terms))], len(parts) - 1),
            layers=_padded([t.layers for t in terms], n_layers),
            entries=entries, segment=segment, counts=torch.tensor([len(x) for x in parts], dtype=torch.double),
        )


@dataclass
class _Emptied:
    """The groups whose emptying removes a layer: the flat indices of their units, the group of
    each unit (a segment), and the layer of each group."""

    units: torch.Tensor
    segment: torch.Tensor
    layer: torch.Tensor

    @staticmethod
    def of(pairs: list[tuple[int, str]], offsets: dict[str, int], sizes: dict[str, int]) -> _Emptied:
        units, segment = _segments([torch.arange(offsets[g], offsets[g] + sizes[g]) for _, g in pairs])
        return _Emptied(units, segment, torch.tensor([i for i, _ in pairs], dtype=torch.long))


def _moved(record, device: torch.device):
    """A copy of the dataclass ``record`` with its tensors on ``device``."""
    return dataclasses.replace(record, **{f.name: getattr(record, f.name).to(device) for f in dataclasses.fields(record)
                                          if isinstance(getattr(record, f.name), torch.Tensor)})


def _segments(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``parts`` (1-D long tensors) in one tensor, and the part each entry comes from."""
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in parts], dtype=torch.long)
    return torch.cat(parts), torch.repeat_interleave(torch.arange(len(parts)), lengths)


def _ones(probs: Probabilities) -> Callable[[int], torch.Tensor]:
    """n -> n float64 ones on the device of ``probs``."""
    like = next((p for p in probs.values() if isinstance(p, torch.Tensor)), torch.ones(()))
    return lambda n: torch.ones(n, dtype=torch.double, device=like.device)


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """``rows`` as a (len(rows), longest) long tensor, padded with ``pad``."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Budget:
    """Expected FLOPs and parameters of ``analysis.gm`` given keep probabilities.

    ``like``: the budget of a model with the same graph and example inputs and other widths (the
    model before a resize compacted or grew it). Its FLOPs per node, scaled by the size of each
    weight the node multiplies, stand in for counting them again: exact for convolutions, linear
    and recurrent layers, whose FLOPs go with their weights' sizes. Where that cannot be exact (other
    input shapes, a node ``like`` does not have, a product of activations that changed shape) the
    FLOPs are counted as usual.

    >>> budget = Budget(analysis, x)
    >>> p = {g: torch.full((size,), 0.5, requires_grad=True) for g, size in budget.groups.items()}
    >>> budget.expected(p, "flops").backward()  # differentiable in every p
    """

    def __init__(self, analysis: Analysis, example_inputs: Any, like: Budget | None = None):
        self.analysis = analysis
        self.groups = {g.name: g.size for g in analysis.groups if g.prunable}  # prunable group -> units
        self.layers = [layer.name for layer in analysis.layers]
        self._offsets, start = {}, 0  # flat p: every group's units, then a constant 1 at ``start``
        for name, size in self.groups.items():
            self._offsets[name], start = start, start + size
        self._one = start
        self._root_index = torch.full((len(analysis.group_of),), start, dtype=torch.long)  # atom root -> flat index
        for gi, g in enumerate(analysis.groups):
            if g.name in self._offsets:
                roots = (analysis.group_of == gi).nonzero().flatten()
                self._root_index[roots] = self._offsets[g.name] + analysis.unit_in[roots]
        emptied = [(self.layers.index(layer.name), name) for name in self.groups
                   if (layer := innermost_layer(analysis.layers, name)) is not None]
        self._emptied = _Emptied.of(emptied, self._offsets, self.groups)  # as compact removes layers
        self._members: dict[str, list] = {}
        for m in analysis.space.members:
            self._members.setdefault(m.owner, []).append(m)
        self._layer_nodes = [set(layer.nodes) for layer in analysis.layers]
        self._tensors = dict(analysis.gm.named_parameters())
        self._nodes = {n.name: n for n in analysis.gm.graph.nodes}
        self._weights: dict[str, list[str]] = {}  # node -> the weight matrices it multiplies
        for owner, ms in self._members.items():
            if owner in self._tensors and self._tensors[owner].dim() >= 2:
                for node in dict.fromkeys(m.node for m in ms):
                    self._weights.setdefault(node, []).append(owner)
        self.shares = (like is not None and self._rescaled(like)) or self._shares(flops_per_node(analysis.gm, example_inputs))
        terms = {"flops": self._flops_terms(), "params": self._params_terms()}
        self.dense = {metric: sum(t.weight for t in ts) for metric, ts in terms.items()}
        self._compiled = {metric: _Polynomial.of(ts, self._one, len(self.layers)) for metric, ts in terms.items()}
        self._placed = {torch.device("cpu"): (self._compiled, self._emptied)}

    def _shares(self, flops: dict[str, int]) -> dict[str, list[_Share]]:
        """Per node with FLOPs, how they divide over its weights (by size), or one fixed share."""
        out = {}
        for node, total in flops.items():
            if total:
                owners = sorted(self._weights.get(node, ()))
                size = sum(self._tensors[w].numel() for w in owners)
                out[node] = [_Share(w, total * self._tensors[w].numel() / size, self._tensors[w].numel())
                             for w in owners] or [_Share(None, float(total), 0, _shapes(self._nodes[node]))]
        return out

    def _rescaled(self, like: Budget) -> dict[str, list[_Share]] | None:
        """``like``'s shares with each weight's FLOPs scaled by its new size; None where that is not exact."""
        inputs = [_shapes(n) for n in self._nodes.values() if n.op == "placeholder"]
        if inputs != [_shapes(n) for n in like._nodes.values() if n.op == "placeholder"]:
            return None  # other example inputs: FLOPs do not scale with the weights alone
        if not set(self._weights) <= set(like.shares) | set(like._weights):
            return None  # a node that multiplies a weight ``like`` never saw
        out = {}
        for node, shares in like.shares.items():
            if node not in self._nodes or sorted(self._weights.get(node, ())) != [s.weight for s in shares if s.weight]:
                return None
            new = []
            for share in shares:
                if share.weight is None:
                    if _shapes(self._nodes[node]) != share.shapes:
                        return None
                    new.append(share)
                else:
                    numel = self._tensors[share.weight].numel()
                    new.append(_Share(share.weight, share.flops * numel / share.numel, numel))
            out[node] = new
        return out

    def _dims(self, owner: str, node: str | None = None) -> list[torch.Tensor]:
        """Flat index of every entry along each channel dim of tensor ``owner`` (as ``node`` uses it)."""
        out = {}
        for m in self._members.get(owner, ()):
            if (node is None or m.node == node) and m.dim not in out:
                roots = self.analysis.roots[m.atoms.clamp(min=0)]
                out[m.dim] = torch.where(m.atoms >= 0, self._root_index[roots], self._one)
        return list(out.values())

    def _layers_holding(self, nodes: set[str]) -> list[int]:
        return [i for i, inside in enumerate(self._layer_nodes) if nodes and nodes <= inside]

    def _flops_terms(self) -> list[_Term]:
        """One term per share of each node's FLOPs (a weight it multiplies, or a fixed cost)."""
        terms = []
        for node, shares in self.shares.items():
            layers = self._layers_holding({node})
            terms += [_Term(s.flops, self._dims(s.weight, node) if s.weight else [], layers) for s in shares]
        return terms

    def _params_terms(self) -> list[_Term]:
        """One term per parameter; it goes with a layer when only that layer's nodes use it."""
        owners: dict[str, list[str]] = {}  # module path -> the parameters under it
        for name in self._tensors:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                owners.setdefault(".".join(parts[:i]), []).append(name)
        users: dict[str, set[str]] = {}
        for node in self.analysis.gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                for name in owners.get(node.target, ()):
                    users.setdefault(name, set()).add(node.name)
        return [_Term(t.numel(), self._dims(name), self._layers_holding(users.get(name, set())))
                for name, t in self._tensors.items()]

    def flat(self, probs: Probabilities) -> torch.Tensor:
        """Every group's unit probabilities in one float64 vector (1 for groups not in ``probs``), then a 1."""
        ones = _ones(probs)
        parts = [ones(size) if probs.get(name) is None else torch.as_tensor(probs[name]).reshape(size).double()
                 for name, size in self.groups.items()]
        return torch.cat(parts + [ones(1)])

    def layer_probabilities(self, probs: Probabilities) -> torch.Tensor:
        """Every removable layer's own probability of staying, in order (1 for layers not in ``probs``)."""
        ones = _ones(probs)
        return torch.cat([ones(0)] + [ones(1) if probs.get(name) is None
                                      else torch.as_tensor(probs[name]).reshape(1).double() for name in self.layers])

    def expected(self, probs: Probabilities, metric: str = "flops") -> torch.Tensor:
        """E[FLOPs] of one call on the example inputs, or E[parameters] (a float64 scalar tensor)."""
        return self.evaluate(self.flat(probs), self.layer_probabilities(probs), metric)

    def evaluate(self, flat: torch.Tensor, layers: torch.Tensor, metric: str = "flops") -> torch.Tensor:
        """:meth:`expected` from the unit probabilities as :meth:`flat` lays them out and each
        layer's own probability (:meth:`layer_probabilities`): a few vectorised operations."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        compiled, emptied = self._on(flat.device)
        terms = compiled[metric]
        sums = flat.new_zeros(len(terms.counts)).index_add(0, terms.segment, flat[terms.entries])
        means = sums / terms.counts
        alive = self._alive(flat, layers, emptied)
        return (terms.weight * means[terms.dims].prod(1) * alive[terms.layers].prod(1)).sum()

    def _on(self, device: torch.device) -> tuple[dict[str, _Polynomial], _Emptied]:
        """The polynomials and the emptied layers' indices on ``device`` (moved once, then kept)."""
        if device not in self._placed:
            self._placed[device] = ({metric: _moved(t, device) for metric, t in self._compiled.items()},
                                    _moved(self._emptied, device))
        return self._placed[device]

    def _alive(self, flat: torch.Tensor, layers: torch.Tensor, emptied: _Emptied) -> torch.Tensor:
        """The probability that each removable layer stays (then a 1): its own, times, for each
        group whose emptying removes it, the probability ``1 - prod(1 - p)`` that the group keeps a unit."""
        alive = torch.cat([layers.to(flat.dtype), flat[self._one:]])
        if emptied.units.numel():
            none_kept = flat.new_ones(len(emptied.layer)).scatter_reduce(
                0, emptied.segment, 1 - flat[emptied.units], "prod")
            alive = alive * torch.ones_like(alive).scatter_reduce(0, emptied.layer, 1 - none_kept, "prod")
        return alive

    def fraction(self, probs: Probabilities, metric: str = "flops") -> torch.Tensor:
        """:meth:`expected` as a fraction of the dense cost."""
        return self.expected(probs, metric) / self.dense[metric]

    def unit_costs(self, metric: str = "flops", probs: Probabilities | None = None) -> dict[str, torch.Tensor]:
        """What each unit of every group, and each layer (one value), costs: d E[cost] / d p at
        ``probs`` (default: everything kept). A unit's is its producers' share plus what its
        consumers spend on it; a layer's, everything inside it."""
        probs = dict(probs or {})
        sizes = {**self.groups, **{name: 1 for name in self.layers}}
        leaves = {name: probs.get(name, torch.ones(size)).detach().float().reshape(size).clone().requires_grad_()
                  for name, size in sizes.items()}
        with torch.enable_grad():
            total = self.expected({**probs, **leaves}, metric)
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        return {name: torch.zeros(sizes[name]) if g is None else g for name, g in zip(leaves, grads)}
