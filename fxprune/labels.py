"""Channel labels: every tensor element carries the id of the channel ("atom") it belongs to.

The analysis runs the traced graph on integer label tensors instead of data. Data movement ops
(cat, split, view, permute, ...) run unchanged on the labels, so channels follow every index
rearrangement exactly. Ops that tie channels together (residual add, a conv reading its input,
a parameter shared by two call sites) merge atoms in a union-find. Each resulting class is one
prunable *unit*: removing it removes every element that carries one of its atoms.

Label tensors are kept as broadcast views (stride 0) along dimensions where they are constant,
so a channel map of a (N, C, H, W) activation costs C integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

NONE = -1  # an element that belongs to no channel (padding, constants)


class AtomUnionFind:
    """Union-find over consecutive integer atoms that records merges and resolves them at once.

    Nothing reads a representative while labels propagate, so :meth:`union_pairs` only stores the pairs
    to merge; :meth:`roots` then finds every connected component with a few vectorised passes
    (hook each root under the smallest root it touches, then pointer jumping), so its cost grows
    with the number of pairs, not with Python calls. Each atom's root is the smallest atom of its
    component.
    """

    def __init__(self) -> None:
        self.count = 0
        self._pairs: list[torch.Tensor] = []  # (k, 2) atom pairs to merge

    def add(self, n: int) -> None:
        self.count += n

    def union_pairs(self, pairs: torch.Tensor) -> None:
        """Merge ``pairs[i, 0]`` with ``pairs[i, 1]`` for every row."""
        if pairs.shape[0]:
            self._pairs.append(pairs)

    def roots(self) -> torch.Tensor:
        """The representative (smallest atom) of every atom's component."""
        parent = torch.arange(self.count)
        if not self._pairs:
            return parent
        pairs = torch.cat(self._pairs)
        a, b = pairs[:, 0], pairs[:, 1]
        while True:
            ra, rb = parent[a], parent[b]
            apart = ra != rb
            if not bool(apart.any()):
                return parent
            ra, rb = ra[apart], rb[apart]
            parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), "amin")
            while True:  # pointer jumping: every atom points at its root again
                up = parent[parent]
                if torch.equal(up, parent):
                    break
                parent = up
            a, b = a[apart], b[apart]


@dataclass
class Member:
    """One dimension of a parameter or buffer whose indices are channels.

    ``atoms[i]`` is the atom of index ``i`` along ``dim`` of the tensor ``owner`` (a qualified
    parameter or buffer name), or NONE when that index is not a channel. ``role`` is "out" for a
    producer's output channels, "in" for a consumer's input channels (read from argument
    ``input_arg`` of the node, along ``input_dim``), "read" for the weights through which a module
    reads its own units (an RNN's recurrent and next-layer columns, an attention's output
    projection columns) and "channel" for per-channel state (normalisation parameters, running
    statistics, a depthwise filter).
    """

    owner: str
    dim: int
    atoms: torch.Tensor
    role: str
    node: str
    input_dim: int | None = None  # for role "in": the dim of the consumer's input tensor
    input_arg: int | str = 0  # for role "in": that input's position, or its keyword
    input_groups: int = 1  # for role "in": index i reads input index i + k * len(atoms) for each k below this


@dataclass
class Producer:
    """A graph node whose output creates channels along ``dim``: a module, or a tensor attribute
    used directly (``kind`` "module" or "attribute")."""

    node: str
    name: str
    dim: int
    atoms: torch.Tensor
    kind: str = "module"


@dataclass
class LabelSpace:
    """Atoms, their union-find, and what the analysis learned about them."""

    uf: AtomUnionFind = field(default_factory=AtomUnionFind)
    count: int = 0
    blocked: dict[int, str] = field(default_factory=dict)
    inexact: dict[int, str] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    _owned: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _dims: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    producer_nodes: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # a tied tensor's other names -> its first
    grids: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)  # (owner, node, atoms per entry)
    splits: list[torch.Tensor] = field(default_factory=list)  # labels spread over several dims (a reshape)
    mixes: list[tuple[torch.Tensor, tuple[int, ...], str]] = field(default_factory=list)  # (labels, dims, reason)

    def canonical(self, name: str) -> str:
        """The first qualified name of the tensor called ``name`` (tied weights share one)."""
        return self.aliases.get(name, name)

    def add_producer(self, producer: Producer) -> None:
        """Record a node whose output creates channels."""
        self.producers.append(producer)
        self.producer_nodes.add(producer.node)

    def add_member(self, member: Member) -> None:
        """Record ``member``; a tensor dimension seen before (a module called twice) is coupled."""
        seen = self._dims.setdefault((member.owner, member.dim), member.atoms)
        if seen is not member.atoms and len(seen) == len(member.atoms):
            self.union(seen, member.atoms)
        self.members.append(member)

    def fresh(self, n: int) -> torch.Tensor:
        """``n`` new atoms."""
        atoms = torch.arange(self.count, self.count + n)
        self.count += n
        self.uf.add(n)
        return atoms

    def owned(self, owner: str, key: str, n: int) -> torch.Tensor:
        """The atoms of ``owner``'s ``key`` (created once, so every call site shares them)."""
        atoms = self._owned.get((owner, key))
        if atoms is None or len(atoms) != n:
            atoms = self._owned[(owner, key)] = self.fresh(n)
        return atoms

    def fixed(self, shape: torch.Size, reason: str) -> torch.Tensor:
        """A label tensor of one new atom that can never be removed."""
        atom = self.fresh(1)
        self.blocked[int(atom)] = reason
        return atom.reshape([1] * len(shape)).expand(shape)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Merge the atoms found at the same position of ``a`` and ``b`` (same shape)."""
        a, b = joint_compress(a, b)
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        self.uf.union_pairs(pairs[(pairs[:, 0] != pairs[:, 1]) & (pairs >= 0).all(1)])

    def union_all(self, atoms: torch.Tensor) -> int:
        """Merge every atom in ``atoms``; returns one of them, or NONE if there is none."""
        found = distinct_atoms(atoms)
        if not len(found):
            return NONE
        self.uf.union_pairs(torch.stack([found[:1].expand(len(found) - 1), found[1:]], 1))
        return int(found[0])

    def union_rows(self, rows: torch.Tensor) -> None:
        """Merge the atoms of each row of a 2-D tensor (a grouped convolution's group per row)."""
        anchor = rows.max(1, keepdim=True).values.expand_as(rows)  # an atom of the row, where it has one
        pairs = torch.stack([anchor.reshape(-1), rows.reshape(-1)], 1)
        self.uf.union_pairs(pairs[(pairs[:, 1] >= 0) & (pairs[:, 0] != pairs[:, 1])])

    def block(self, labels: torch.Tensor, reason: str) -> None:
        """No atom in ``labels`` may be removed."""
        for atom in atoms_in(labels):
            self.blocked.setdefault(atom, reason)

    def split(self, labels: torch.Tensor) -> None:
        """``labels`` spread channels over several dims (channels into heads x head size): after the
        analysis their units must vary along one dim only, so that pruning leaves a rectangle."""
        self.splits.append(compress(labels))

    def mixes_along(self, labels: torch.Tensor, dims: tuple[int, ...], reason: str) -> None:
        """An op mixes the values along ``dims`` (a normalisation): once the units are known, removing
        one that varies along them is not exact."""
        self.mixes.append((compress(labels), tuple(d % labels.dim() for d in dims), reason))

    def mark_inexact(self, labels: torch.Tensor, reason: str) -> None:
        """Removing an atom in ``labels`` would change the function (mixing across channels)."""
        for atom in atoms_in(labels):
            self.inexact.setdefault(atom, reason)

    def per_index(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """One atom per index along ``dim``: everything in a slice is merged into one unit.

        Along a dimension where the labels do not vary but vary along another one (a Linear over
        the width of an (N, C, H, W) tensor), the indices are not channels: all NONE.
        """
        small = compress(labels)
        if small.shape[dim] == 1 and labels.shape[dim] > 1 and small.numel() > 1:
            return torch.full((labels.shape[dim],), NONE, dtype=torch.long)
        small = small.movedim(dim, 0)
        small = small.reshape(small.shape[0], -1)
        first = small[:, 0].clone()
        if small.shape[1] > 1:  # an index holding several atoms merges them; its smallest one stands for them
            mixed = (small != first[:, None]).any(1).nonzero().flatten()
            rows = small[mixed]
            self.union_rows(rows)
            none = torch.iinfo(rows.dtype).max
            smallest = torch.where(rows >= 0, rows, none).min(1).values
            first[mixed] = torch.where(smallest == none, NONE, smallest)
        return first.expand(labels.shape[dim]) if first.shape[0] == 1 else first

    def roots(self) -> torch.Tensor:
        """``roots[atom]`` is the representative atom of its unit."""
        return self.uf.roots()


def view_key(t: torch.Tensor) -> tuple:
    """What identifies the elements a tensor views while it is alive: views of the same memory with
    the same shape and strides hold the same values."""
    return t.data_ptr(), t.shape, t.stride()


def distinct_atoms(labels: torch.Tensor) -> torch.Tensor:
    """The distinct atoms in a label tensor, ascending."""
    unique = torch.unique(compress(labels))
    return unique[unique >= 0]


def atoms_in(labels: torch.Tensor) -> list[int]:
    """The distinct atoms in a label tensor."""
    return distinct_atoms(labels).tolist()


def no_channels(shape: torch.Size) -> torch.Tensor:
    """Labels of ``shape`` whose elements belong to no channel."""
    return torch.full((1,) * len(shape), NONE, dtype=torch.long).expand(shape)


def along(atoms: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Labels of ``shape`` that carry ``atoms`` along ``dim`` and are constant elsewhere."""
    view = [1] * len(shape)
    view[dim] = -1
    return atoms.reshape(view).expand(shape)


def compress(t: torch.Tensor) -> torch.Tensor:
    """Shrink ``t`` to size 1 along every dimension where its values are constant."""
    for d in range(t.dim()):  # broadcast dimensions first: free, and they shrink the checks below
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    for d in range(t.dim()):
        n = t.shape[d]
        if n > 1 and torch.equal(t.narrow(d, 1, n - 1), t.narrow(d, 0, n - 1)):
            t = t.narrow(d, 0, 1)
    return t


def expand_compressed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a broadcast view of its compressed form (cheap to store and to combine)."""
    return compress(t).expand(t.shape)


def varies(t: torch.Tensor, dim: int) -> bool:
    """Whether labels differ along ``dim``."""
    return compress(t).shape[dim] > 1


def channels_vary(t: torch.Tensor, dim: int) -> bool:
    """Whether two indices along ``dim`` hold different channels at the same position of the other
    dims (entries of no channel, such as padding, aside)."""
    small = compress(t)
    rows = small.movedim(dim, 0).reshape(small.shape[dim], -1)
    if rows.shape[0] == 1:
        return False
    held = rows >= 0
    high = torch.where(held, rows, rows.new_tensor(-1)).amax(0)
    low = torch.where(held, rows, rows.new_tensor(torch.iinfo(rows.dtype).max)).amin(0)
    return bool(((high != low) & held.any(0)).any())


def joint_compress(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress two same-shaped label tensors along the dimensions where both are constant."""
    ca, cb = compress(a), compress(b)
    for d in range(a.dim()):
        if ca.shape[d] == 1 and cb.shape[d] == 1:
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
    return a, b


class IndexTable:
    """Which atoms each index holds, along chosen dims of many label tensors, as one flat table.

    Index ``i`` along ``dim`` of a label tensor holds the atoms of the slice ``labels.select(dim, i)``;
    it survives a mask when one of them is kept or when it holds none (a dim along which the labels
    are constant keeps its size). Registering every dim of every tensor once turns "which indices
    survive" for all of them into a few vectorised ops (:meth:`surviving`); :meth:`span` says where
    a key's indices lie in the result. Tensors that share their labels (a conv's output and its
    BatchNorm's) share rows.
    """

    def __init__(self) -> None:
        self._spans: dict[Any, tuple[int, int]] = {}
        self._shared: dict[tuple, tuple[int, int]] = {}
        self._rows: list[torch.Tensor] = []
        self._block: dict[int, int] = {}  # first index of a block of rows -> its position in _rows
        self._views: dict[tuple, tuple] = {}  # a label tensor seen before -> it, its spans and varying rows
        self.size = 0  # indices registered
        self._atoms: torch.Tensor | None = None
        self._row: torch.Tensor | None = None

    def add_labels(self, name: str, labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Register every dim ``d`` of ``labels`` under ``(name, d)``. Returns, for each dim along
        which the labels vary, ``(d, rows)``: row ``i`` holds the atoms of index ``i``."""
        view = view_key(labels)  # nodes that pass their labels on share them
        if view not in self._views:  # the entry holds ``labels``, so that no other tensor takes its address
            self._views[view] = (labels, *self._register(labels))
        _, spans, varying = self._views[view]
        for d, span in enumerate(spans):
            self._spans[(name, d)] = span
        return varying

    def _register(self, labels: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple[int, torch.Tensor]]]:
        small = compress(labels)
        spans, varying = [], []
        for d in range(labels.dim()):
            constant = small.shape[d] == 1 and labels.shape[d] > 1  # same atoms all along d: it keeps its size
            shared = ("constant", labels.shape[d]) if constant else (*view_key(small), d)
            if shared not in self._shared:
                # rows without atoms always survive
                rows = torch.zeros(labels.shape[d], 0, dtype=torch.long) if constant else \
                    small.movedim(d, 0).reshape(small.shape[d], -1)
                self._add_rows(shared, rows)
            spans.append(self._shared[shared])
            if small.shape[d] > 1:
                varying.append((d, self._rows[self._block[spans[-1][0]]]))
        return spans, varying

    def add_atoms(self, key: Any, atoms: torch.Tensor) -> None:
        """Register a 1-D tensor whose index ``i`` holds atom ``atoms[i]`` (NONE: no atom) under ``key``."""
        shared = ("atoms", *view_key(atoms))
        if shared not in self._shared:
            self._add_rows(shared, atoms.reshape(-1, 1))
        self._spans[key] = self._shared[shared]

    def _add_rows(self, shared: tuple, rows: torch.Tensor) -> None:
        self._shared[shared] = (self.size, rows.shape[0])
        self._block[self.size] = len(self._rows)
        self._rows.append(rows)
        self.size += rows.shape[0]
        self._atoms = None

    def span(self, key: Any) -> tuple[int, int] | None:
        """(first index, count) of ``key``'s indices in the table, or None if not registered."""
        return self._spans.get(key)

    def spans(self) -> dict[Any, tuple[int, int]]:
        """Every key and its span."""
        return self._spans

    def surviving(self, keep_atom: torch.Tensor) -> torch.Tensor:
        """For every index of the table, whether it survives when ``keep_atom[a]`` says which atoms stay."""
        if self._atoms is None:
            sizes = torch.tensor([r.shape[1] for r in self._rows] or [0], dtype=torch.long)
            counts = torch.tensor([r.shape[0] for r in self._rows] or [0], dtype=torch.long)
            self._atoms = torch.cat([r.reshape(-1) for r in self._rows]) if self._rows else torch.zeros(0, dtype=torch.long)
            self._row = torch.repeat_interleave(torch.arange(self.size), torch.repeat_interleave(sizes, counts))
        has = self._atoms >= 0
        kept = has & keep_atom[self._atoms.clamp(min=0)]
        some_kept = torch.zeros(self.size, dtype=torch.long).index_add_(0, self._row, kept.long())
        some_atom = torch.zeros(self.size, dtype=torch.long).index_add_(0, self._row, has.long())
        return (some_kept > 0) | (some_atom == 0)
