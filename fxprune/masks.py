"""Masks: which channels to keep, checked against an :class:`Analysis` and resolved to units."""
from __future__ import annotations

import difflib
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .analysis import Analysis, ChannelGroup
from .emptiable import Emptiable
from .errors import MaskError
from .labels import Producer, compress
from .layers import Layer

Masks = Mapping[str, "torch.Tensor | bool"]
# The channel multiple that the methods' and the command line's compaction keep by default: fp16
# tensor cores and the SIMD kernels of CPU runtimes (ONNX Runtime) work on blocks of 8 channels.
DEFAULT_ROUND_TO = 8


@dataclass
class Plan:
    """Resolved masks: the units that stay, and each producer's own channel mask.

    ``keep_atom[a]`` says whether atom ``a`` survives compaction. ``producer_masks`` holds, for
    every producer that zeroes some of its channels, a bool mask over its output channels; a channel
    of a kept unit that its producer masks is zeroed there, so disagreeing masks stay exact.
    """

    analysis: Analysis
    keep_unit: list[torch.Tensor]
    keep_atom: torch.Tensor
    producer_masks: dict[tuple[str, str], tuple[Producer, torch.Tensor]]  # by (node, producer name)
    removed_layers: list[Layer] = field(default_factory=list)
    removed_nodes: set[str] = field(default_factory=set)  # the nodes of the removed layers
    kept_for_values: list[tuple[int, int, Emptiable]] = field(default_factory=list)  # (group, unit, value)

    @functools.cached_property
    def _surviving(self) -> torch.Tensor:
        return self.analysis.index_table().surviving(self.keep_atom)

    @functools.cached_property
    def _sizes(self) -> dict:
        spans = self.analysis.index_table().spans()
        if not spans:
            return {}
        counts = torch.cat([torch.zeros(1, dtype=torch.long), self._surviving.long().cumsum(0)])
        where = torch.tensor(list(spans.values()), dtype=torch.long)
        return dict(zip(spans, (counts[where.sum(1)] - counts[where[:, 0]]).tolist()))

    def kept_at(self, key) -> torch.Tensor:
        """Which indices survive, for a key of ``analysis.index_table()``: ``(node name, dim)`` of a
        node's output, or the position of a member in ``analysis.space.members``."""
        start, n = self.analysis.index_table().span(key)
        return self._surviving[start:start + n]

    def size_at(self, key) -> int:
        """How many indices survive, for a key of ``analysis.index_table()`` (see :meth:`kept_at`)."""
        return self._sizes[key]

    def kept(self, labels: torch.Tensor) -> torch.Tensor:
        """Whether each position of a label tensor survives."""
        return torch.where(labels >= 0, self.keep_atom[labels.clamp(min=0)], True)

    def kept_along(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """Which indices along ``dim`` of a tensor with these labels survive: those holding a kept
        channel, or no channel at all."""
        small = compress(labels)
        dim %= labels.dim()
        rows = small.movedim(dim, 0).reshape(small.shape[dim], -1)
        kept = ((rows >= 0) & self.kept(rows)).any(1) | (rows < 0).all(1)
        if small.shape[dim] == 1:  # constant along dim: it shrinks only if it has a single index
            return kept.expand(1) if labels.shape[dim] == 1 else torch.ones(labels.shape[dim], dtype=torch.bool)
        return kept

    def surviving(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels of the compacted tensor: ``labels`` without the removed indices of every dim."""
        small = compress(labels)
        for d in range(small.dim()):
            if small.shape[d] > 1:
                small = small[(slice(None),) * d + (self.kept_along(small, d),)]
        return small


def resolve(analysis: Analysis, masks: Masks, force_keep: set[int] = frozenset(), exact: bool = True,
            round_to: int | None = None, scores: Mapping[str, torch.Tensor] | None = None) -> Plan:
    """Check ``masks`` and turn them into a :class:`Plan`. Raises :class:`MaskError` naming the key.

    A key may name a removable layer (``analysis.layers``) with False to remove it. A group that the
    masks empty and that lives inside a removable layer removes the innermost such layer instead.
    ``force_keep`` lists unit roots that must stay whatever the masks say. A value that the masks
    would leave without any channel (``analysis.emptiable``) keeps one of its units, zeroed: the one
    with the highest ``scores[group]``, else the one with the fewest channels. ``round_to`` keeps, in
    every group that loses channels, extra masked units (zeroed, so the function is the same) until
    its channel count is a multiple of ``round_to``: those with the highest ``scores[group]``, else
    the first ones. ``exact=False`` also
    accepts masks on groups that are prunable only approximately (normalised across channels).
    """
    check_round_to(round_to)
    _check_scores(analysis, scores or {})
    groups = {g.name: (i, g) for i, g in enumerate(analysis.groups)}
    producers = _producers_by_name(analysis)
    votes = [torch.zeros(g.size, dtype=torch.bool) for g in analysis.groups]  # some mask keeps it
    heard = [torch.zeros(g.size, dtype=torch.bool) for g in analysis.groups]  # some mask covers it
    own: dict[tuple[str, str], tuple[Producer, torch.Tensor]] = {}
    by_group: dict[int, torch.Tensor] = {}
    layers = {layer.name: layer for layer in analysis.layers}
    removed = {}
    for key, mask in masks.items():
        if key in layers:
            if not _layer_flag(key, mask):
                removed[key] = layers[key]
            continue
        gi, g = groups.get(key, (None, None))
        plist = producers.get(key, [])
        mask = _check_tensor(key, mask)
        if g is not None and len(mask) == g.size:
            _check_prunable(key, g, mask, exact)
            by_group[gi] = mask
            votes[gi] |= mask
            heard[gi][:] = True
        elif plist and len(mask) == len(plist[0].atoms):
            p = plist[0]
            gi, units = _units_of(analysis, p.atoms)
            g = analysis.groups[gi]
            _check_prunable(key, g, mask, exact)
            votes[gi].index_put_((units,), mask, accumulate=True)
            heard[gi][units] = True  # a producer says nothing of the units it does not cover
            own.update({(q.node, q.name): (q, mask) for q in plist})
        else:
            raise MaskError(_bad_key(key, mask, g, plist, groups, producers))
    keep_unit = [v | ~h for v, h in zip(votes, heard)]
    for g, keep in zip(analysis.groups, keep_unit):
        if not keep.any():
            layer = innermost_layer(analysis.layers, g.name)
            if layer is None:
                raise MaskError(
                    f"mask for group '{g.name}' removes every channel, and the group lives in no "
                    "removable layer; keep at least one channel")
            removed.setdefault(layer.name, layer)
    inside = {name for layer in removed.values() for name in layer.groups}
    keep_unit = [torch.ones_like(k) if g.name in inside else k for g, k in zip(analysis.groups, keep_unit)]
    masked_atom = _keep_atoms(analysis, keep_unit)
    keep_unit = [k.clone() for k in keep_unit]
    for root in force_keep:
        gi, ui = analysis.unit_of[root]
        keep_unit[gi][ui] = True
    removed_nodes = {n for layer in removed.values() for n in (*layer.nodes, layer.add)}
    kept_for_values = _keep_a_unit_of_each_value(analysis, keep_unit, scores or {}, removed_nodes)
    if round_to and round_to > 1:
        _round_up(analysis, keep_unit, int(round_to), scores or {}, inside)
    keep_atom = _keep_atoms(analysis, keep_unit)
    return Plan(analysis, keep_unit, keep_atom, _producer_masks(analysis, masked_atom, own, by_group, removed_nodes),
                list(removed.values()), removed_nodes, kept_for_values)


def _keep_a_unit_of_each_value(analysis: Analysis, keep_unit: list[torch.Tensor], scores: Mapping[str, torch.Tensor],
                               removed_nodes: set[str]) -> list[tuple[int, int, Emptiable]]:
    """Keep, for each value that would lose every channel (outside the removed layers), one of its
    units; returns the (group, unit, value) kept."""
    kept, size = [], None
    for value in analysis.emptiable:
        groups, units = analysis.group_of[value.units].tolist(), analysis.unit_in[value.units].tolist()
        if value.node in removed_nodes or any(bool(keep_unit[g][u]) for g, u in zip(groups, units)):
            continue
        if size is None:
            size = torch.bincount(analysis.roots, minlength=len(analysis.roots))  # atoms per unit root
        rank = [(float(scores[analysis.groups[g].name][u]) if analysis.groups[g].name in scores else 0.0, -int(size[r]))
                for g, u, r in zip(groups, units, value.units.tolist())]
        best = max(range(len(rank)), key=rank.__getitem__)
        keep_unit[groups[best]][units[best]] = True
        kept.append((groups[best], units[best], value))
    return kept


def _check_scores(analysis: Analysis, scores: Mapping[str, torch.Tensor]) -> None:
    for g in analysis.groups:
        score = scores.get(g.name)
        if score is not None and tuple(score.shape) != (g.size,):
            raise MaskError(f"scores['{g.name}'] has shape {tuple(score.shape)}; group '{g.name}' has {g.size} units")


def rounded(analysis: Analysis, masks: Masks, round_to: int, scores: Mapping[str, torch.Tensor] | None = None,
            exact: bool = True) -> dict[str, torch.Tensor | bool]:
    """What ``compact(..., round_to=round_to, scores=scores)`` keeps of ``masks``: every group named
    in ``masks`` as the keep mask of its units that stay, every layer named as whether it stays (a
    group the masks empty removes its layer). A cost computed from these is the cost of the model
    ``compact`` returns."""
    plan = resolve(analysis, masks, exact=exact, round_to=round_to, scores=scores)
    removed = {layer.name for layer in plan.removed_layers}
    layers = {layer.name for layer in analysis.layers}
    keep = {g.name: k for g, k in zip(analysis.groups, plan.keep_unit)}
    return {key: (key not in removed) if key in layers else keep.get(key, mask) for key, mask in masks.items()}


def check_round_to(round_to: int | None) -> None:
    """``round_to`` is None or a positive int (1: no rounding); raise ValueError otherwise."""
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1):
        raise ValueError(f"round_to must be a positive int (1 or None: no rounding), got {round_to!r}")


def _round_up(analysis: Analysis, keep_unit: list[torch.Tensor], round_to: int, scores: Mapping[str, torch.Tensor],
              skip: set[str]) -> None:
    """Keep more units of each group that loses some, so that its channel count (units times the
    channels of a unit) is a multiple of ``round_to``, or the whole group."""
    per_unit = {}
    for p in analysis.space.producers:
        gi, _ = _units_of(analysis, p.atoms)
        per_unit.setdefault(gi, len(p.atoms) // analysis.groups[gi].size or 1)
    for gi, (g, keep) in enumerate(zip(analysis.groups, keep_unit)):
        if g.name in skip or bool(keep.all()):
            continue
        step = round_to // math.gcd(round_to, per_unit.get(gi, 1))
        extra = min(g.size, -(-int(keep.sum()) // step) * step) - int(keep.sum())
        if extra > 0:
            score = scores.get(g.name)
            rank = -score.detach().cpu().float() if score is not None else torch.arange(g.size, dtype=torch.float)
            masked = (~keep).nonzero().flatten()
            keep[masked[torch.argsort(rank[masked], stable=True)[:extra]]] = True


def _layer_flag(key: str, mask) -> bool:
    """A layer's mask: True keeps it, False removes it."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.numel() == 1:
        return bool(mask)
    if isinstance(mask, bool):
        return mask
    raise MaskError(f"mask '{key}' names a removable layer: give True (keep) or False (remove), got {mask!r}")


def innermost_layer(layers: list[Layer], group: str) -> Layer | None:
    """The smallest removable layer that holds every producer of ``group``."""
    holding = [layer for layer in layers if group in layer.groups]
    return min(holding, key=lambda layer: len(layer.nodes), default=None)


def _producers_by_name(analysis: Analysis) -> dict[str, list[Producer]]:
    out: dict[str, list[Producer]] = {}
    for p in analysis.space.producers:
        out.setdefault(p.name, []).append(p)
    return out


def _check_tensor(key: str, mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"mask '{key}' must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise MaskError(f"mask '{key}' must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1:
        raise MaskError(f"mask '{key}' must be 1-D, got shape {tuple(mask.shape)}")
    return mask.detach().cpu()


def _check_prunable(key: str, g: ChannelGroup, mask: torch.Tensor, exact: bool) -> None:
    if g.prunable or bool(mask.all()) or (not exact and not g.blocked):
        return
    hint = "; pass exact=False to prune it anyway, normalising over the kept channels" if not g.blocked else ""
    raise MaskError(f"mask '{key}' removes channels of group '{g.name}', which is not prunable: {g.reason}{hint}")


def _bad_key(key, mask, g, plist, groups, producers) -> str:
    if g is not None:
        return f"mask '{key}' has {len(mask)} entries; group '{key}' has {g.size} channels"
    if plist:
        return f"mask '{key}' has {len(mask)} entries; module '{key}' produces {len(plist[0].atoms)} channels"
    close = difflib.get_close_matches(key, list(dict.fromkeys([*groups, *producers])), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"mask '{key}' names no channel group or producing module{hint}"


def _keep_atoms(analysis: Analysis, keep_unit: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat(keep_unit) if keep_unit else torch.ones(0, dtype=torch.bool)
    offsets = torch.tensor([0] + [len(k) for k in keep_unit]).cumsum(0)
    g, u = analysis.group_of, analysis.unit_in
    keep_root = torch.where(g >= 0, flat[(offsets[g.clamp(min=0)] + u).clamp(min=0, max=max(len(flat) - 1, 0))], True) \
        if len(flat) else torch.ones(len(g), dtype=torch.bool)
    return keep_root[analysis.roots]


def _units_of(analysis: Analysis, atoms: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The group of a producer's atoms, and the unit index of each."""
    roots = analysis.roots[atoms]
    return int(analysis.group_of[roots[0]]), analysis.unit_in[roots]


def _producer_masks(analysis, masked_atom, own, by_group, removed_nodes) -> dict:
    """Each producer's own channel mask, for the producers that zero some channel (outside the
    removed layers)."""
    out = {}
    for p in analysis.space.producers:
        if p.node in removed_nodes:
            continue
        gi, units = _units_of(analysis, p.atoms)
        if (p.node, p.name) in own:
            mask = own[(p.node, p.name)][1]
        elif gi in by_group:
            mask = by_group[gi][units]
        else:
            mask = masked_atom[p.atoms]
        if not bool(mask.all()):
            out[(p.node, p.name)] = (p, mask)
    return out
