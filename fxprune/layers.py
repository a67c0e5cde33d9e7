"""Removable layers: residual branches y = x + F(x) found in the graph.

A branch is the set of nodes that lie between the skip input ``x`` and the add, used by nothing
else, holding at least one parameter. Removing it leaves y = x, the function that
``apply_masks`` gives when it multiplies F(x) by 0.
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

import torch
import torch.fx

from .trace import LAYER_NAME

ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")
IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


@dataclass
class Layer:
    """A residual branch: ``add`` computes ``skip + branch_out`` and ``nodes`` compute ``branch_out``
    from ``skip`` alone. ``groups`` are the channel groups that live only inside the branch."""

    name: str
    add: str
    skip: str
    branch_out: str
    nodes: list[str]
    modules: list[str]
    groups: list[str]

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, {len(self.nodes)} nodes, modules={self.modules})"


def find_layers(gm: torch.fx.GraphModule, taken: set[str] = frozenset()) -> list[Layer]:
    """Every residual branch of ``gm``, in graph order, named after the module that holds it
    (``taken``: names already used, such as group names). The name is recorded on the add node, so
    that the rewritten models derived from ``gm`` keep it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(iter(gm.graph.find_nodes(op="output")))
    live = _ancestors(output) | {output}
    found = []
    for add in gm.graph.nodes:
        if not _is_add(add):
            continue
        x, y = add.args[:2]
        for skip, out in ((x, y), (y, x)):
            nodes = _branch(gm, order, live, add, skip, out)
            writes_skip = any(in_place(gm, n) and n.args[:1] == (skip,) for n in nodes)  # removal would undo it
            if nodes and _has_parameters(gm, nodes) and not writes_skip:
                found.append((add, skip, out, nodes))
                break
    blocks = [_block(add, nodes) for add, _, _, nodes in found]
    used = set(taken) | {add.meta[LAYER_NAME] for add, *_ in found if LAYER_NAME in add.meta}  # kept names first
    layers = []
    for (add, skip, out, nodes), block in zip(found, blocks):
        name = add.meta.get(LAYER_NAME)  # named before this model was rewritten: keep the name
        if name is None:
            name = block or add.name
            if block and blocks.count(block) > 1:  # a block with several branches (a transformer layer)
                first = next(o for o in map(_owner, nodes) if o is not None and o != block)
                name = f"{block}:{first[len(block) + 1:].split('.')[0]}"
            name = unique_name(name, used)
            add.meta[LAYER_NAME] = name
        layers.append(Layer(name, add.name, skip.name, out.name, [n.name for n in nodes],
                            list(dict.fromkeys(n.target for n in nodes if n.op == "call_module")), []))
    return layers


def in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into its first input (relu(inplace=True), x.add_(y), x += y)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or node.target in IN_PLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("_"))
    return False


def _is_add(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in ADDS or len(node.args) < 2:
        return False
    x, y = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    return isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node) and x is not y and alpha == 1


def _branch(gm: torch.fx.GraphModule, order: dict, live: set, add: torch.fx.Node, skip: torch.fx.Node,
            out: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes on the paths from ``skip`` to ``out``, with the constants only they use; [] unless
    all of them serve only ``add`` and removing them leaves a tensor of the add's shape. Other
    inputs (a decoder's memory) may enter the branch.

    Only nodes between ``skip`` and ``out`` in graph order can lie on those paths, so the search
    stays within that stretch of the graph (linear time over a model's layers)."""
    shape = lambda n: getattr(n.meta.get("tensor_meta"), "shape", None)  # noqa: E731
    if shape(skip) is None or shape(skip) != shape(add) or out is skip:
        return []
    chain = {skip}
    while _is_identity(gm, skip):  # x + F(x) written as F(x) + self.shortcut(x), an nn.Identity
        skip = skip.args[0]
        chain.add(skip)
    upstream = _ancestors(out, after=order[skip] - 1, order=order)  # out's ancestors from skip on
    if skip not in upstream:
        return []
    below = {skip}  # descendants of skip among them, in graph order
    for n in sorted(upstream, key=order.get):
        if any(a in below for a in n.all_input_nodes):
            below.add(n)
    inside = (below | {out}) - chain
    for n in list(inside):  # unused results (an attention's weights) go with the branch
        for u in n.users:
            if u not in live:
                inside |= {u} | (_descendants(u) - live)
    # constants only the branch uses join it, users first, so that a chain of them joins whole
    feeds = {n: n in upstream or n is out for n in inside}  # whether it leads to out
    waiting = [(-order[a], a) for n in inside for a in n.all_input_nodes if a not in inside and a not in chain]
    heapq.heapify(waiting)
    while waiting:
        _, n = heapq.heappop(waiting)
        if n in inside or n.op == "placeholder" or not all(u in inside for u in n.users):
            continue
        if any(feeds[u] for u in n.users):  # one of out's ancestors
            inside.add(n)
            feeds[n] = True
            for a in n.all_input_nodes:
                if a not in inside:
                    heapq.heappush(waiting, (-order[a], a))
    if any(n.op == "output" or any(u not in inside and u is not add for u in n.users) for n in inside):
        return []
    return sorted(inside, key=order.get)


def _ancestors(node: torch.fx.Node, after: int = -1, order: dict | None = None) -> set[torch.fx.Node]:
    """The nodes ``node`` depends on (only those later than position ``after`` in ``order``)."""
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and (order is None or order[a] > after):
                seen.add(a)
                todo.append(a)
    return seen


def _descendants(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _is_identity(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Identity) and \
        len(node.args) == 1 and isinstance(node.args[0], torch.fx.Node)


def _has_parameters(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> bool:
    for n in nodes:
        if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()):
            return True
        if n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.nn.Parameter):
            return True
    return False


def _attr(gm: torch.fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _owner(node: torch.fx.Node) -> str | None:
    """The qualified name of the module a call or an attribute belongs to."""
    if node.op == "call_module":
        return node.target
    return node.target.rpartition(".")[0] if node.op == "get_attr" else None


def _block(add: torch.fx.Node, nodes: list[torch.fx.Node]) -> str:
    """The module that holds a branch: the deepest module whose forward computes the add and that
    contains every module of the branch (without a record of the add's module: the deepest module
    containing the branch's modules)."""
    paths = [o.split(".") for o in map(_owner, nodes) if o is not None]
    common = []
    for pieces in zip(*paths):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    common = ".".join(common)
    stack = [path for path, _ in add.meta.get("nn_module_stack", {}).values()]
    holders = [p for p in stack if common == p or common.startswith(p + ".")]
    return holders[-1] if holders else common


def unique_name(base: str, used: set[str]) -> str:
    """``base``, or ``base#2``, ``base#3``... the first not in ``used``; it joins ``used``."""
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}#{i}"
    used.add(name)
    return name
