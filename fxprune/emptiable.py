"""Values that masks keeping a unit of every group can still empty, and so keep one unit.

A group is the set of units tied together by their producers, but a value of the graph may carry
only some of its units: a split piece, one input of a cat, a producer whose channels a channel
shuffle merged into a few units of a wider group (ShuffleNet's branches, where after every block
half of the stream's units leave it, until one unit carries a whole branch). Masks that keep some
of the group but none of the value's units would leave a tensor without channels, which has no
dense form. Such a value keeps one of its units, masked and zeroed, so that compaction stays exact
for every mask that keeps a unit of each group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .labels import Producer, compress, view_key


@dataclass
class Emptiable:
    """A value whose every channel lies in ``units`` (unit roots), which hold no whole group."""

    node: str  # the node that computes it
    name: str  # how to name it: the producing module, else the node
    units: torch.Tensor


def find_emptiable(values: list[tuple[str, str, torch.Tensor]], producers: list[Producer], roots: torch.Tensor,
                   group_of: torch.Tensor, sizes: list[int], removable: list[bool]) -> list[Emptiable]:
    """The values (``(node, name, labels)``, after every producer's own channels) that masks can
    empty: every index along some dim carries a channel, and all their units are of groups that
    may lose units (not blocked), none of them whole. One per distinct set of units, the fewest units
    first (so that a unit kept for one value serves the larger values that hold it)."""
    size, open_ = torch.tensor(sizes, dtype=torch.long), torch.tensor(removable, dtype=torch.bool)
    found: dict[tuple[int, ...], Emptiable] = {}
    seen = set()  # values that share their labels (a conv's output and its BatchNorm's) decide alike
    for node, name, labels in [(p.node, p.name, p.atoms) for p in producers] + values:
        if view_key(labels) in seen:
            continue
        seen.add(view_key(labels))
        small = compress(labels)
        if not _shrinks_to_nothing(labels, small):
            continue
        units = torch.unique(roots[small[small >= 0]])
        g = group_of[units]
        if bool((g < 0).any()) or not bool(open_[g].all()):
            continue
        if bool((torch.bincount(g, minlength=len(sizes))[g] == size[g]).any()):  # holds a whole group
            continue
        found.setdefault(tuple(units.tolist()), Emptiable(node, name, units))
    return sorted(found.values(), key=lambda e: len(e.units))


def _shrinks_to_nothing(labels: torch.Tensor, small: torch.Tensor) -> bool:
    """Whether removing every channel in ``labels`` leaves a dim of size 0: every element holds a
    channel (also where all hold one, so that the labels are constant), or along some dim that is not
    constant (or has size 1) every index holds one (an index holding none always stays)."""
    if labels.dim() == 0 or labels.numel() == 0:
        return False
    has = small >= 0
    if bool(has.all()):
        return True
    for d in range(small.dim()):
        if small.shape[d] == 1 < labels.shape[d]:  # constant along d: keeps its size
            continue
        if bool(has.movedim(d, 0).reshape(small.shape[d], -1).any(1).all()):
            return True
    return False


def group_notes(emptiable: list[Emptiable], unit_of: dict[int, tuple[int, int]], count: int) -> list[str | None]:
    """Per group: which of its units compaction keeps (zeroed) when the masks empty a value."""
    alone: list[dict[int, list[str]]] = [{} for _ in range(count)]
    shared: list[list[Emptiable]] = [[] for _ in range(count)]
    for e in emptiable:
        where = [unit_of[int(r)] for r in e.units]
        for gi in dict.fromkeys(g for g, _ in where):
            if len(where) == 1:
                alone[gi].setdefault(where[0][1], []).append(e.name)
            else:
                shared[gi].append(e)
    notes = []
    for units, values in zip(alone, shared):
        parts = []
        if len(units) == 1:
            (unit, names), = units.items()
            parts.append(f"unit {unit} stays, zeroed if masked: it carries all of '{names[0]}'")
        elif units:
            first = next(iter(units.values()))[0]
            parts.append(f"units {', '.join(map(str, sorted(units)))} stay, zeroed if masked: each carries all of a "
                         f"value (e.g. '{first}')")
        if values:
            parts.append(f"a masked unit stays where the masks remove every unit of one of {_plural(len(values), 'value')} "
                         f"(e.g. '{values[0].name}', {len(values[0].units)} units)")
        notes.append("; ".join(parts) or None)
    return notes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
