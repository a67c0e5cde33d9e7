"""The registry of channel rules: one small handler per op, keyed by module class, function or method.

A rule receives a :class:`RuleContext` and the node's arguments with every tensor replaced by its
label tensor (see :mod:`fxprune.labels`), and returns the output's labels. Rules say how channels
flow through their op; anything not registered is a boundary.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from ..labels import LabelSpace, Member, Producer, along, expand_compressed

Rule = Callable[..., Any]
RULES: dict[Any, Rule] = {}
_BY_CLASS: dict[type, Rule | None] = {}  # module class -> its rule, found through the MRO once


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a channel rule for module classes, functions, or method names (strings)."""

    def register(fn: Rule) -> Rule:
        for target in targets:
            RULES[target] = fn
        _BY_CLASS.clear()
        return fn

    return register


def find_rule(node: torch.fx.Node, gm: torch.fx.GraphModule, module: nn.Module | None = None) -> Rule | None:
    """The rule for ``node``: by module class (most derived first), function, or method name.

    Functions of optional libraries are registered by qualified name ("package.module.function").
    ``module`` is the module a call_module node calls, where the caller has it at hand.
    """
    if node.op == "call_module":
        cls = type(module if module is not None else gm.get_submodule(node.target))
        if cls not in _BY_CLASS:
            _BY_CLASS[cls] = next((RULES[c] for c in cls.__mro__ if c in RULES), None)
        return _BY_CLASS[cls]
    found = RULES.get(node.target)
    if found is None and callable(node.target):
        found = RULES.get(f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}")
    return found


def describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """A readable name for the op a node runs."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


@dataclass
class RuleContext:
    """What a rule may read about its node and record into the label space."""

    space: LabelSpace
    node: torch.fx.Node
    gm: torch.fx.GraphModule
    tainted: bool = False
    tainted_inputs: set[str] = field(default_factory=set)  # nodes whose masked channels may be non-zero
    called: nn.Module | None = None  # the module a call_module node calls, if already looked up

    def taint(self) -> None:
        """This op may turn a zeroed channel into a non-zero value (a shift, sigmoid(0) = 0.5)."""
        self.tainted = True

    def input_tainted(self, arg: Any) -> bool:
        """Whether argument ``arg`` (a node of the graph) may carry non-zero values in masked channels."""
        return isinstance(arg, torch.fx.Node) and arg.name in self.tainted_inputs

    def follows_producer(self) -> bool:
        """Whether the first input comes straight from a producer that feeds only this node."""
        x = self.node.args[0] if self.node.args else None
        return isinstance(x, torch.fx.Node) and len(x.users) == 1 and x.name in self.space.producer_nodes

    @property
    def module(self) -> nn.Module:
        if self.called is None:
            self.called = self.gm.get_submodule(self.node.target)
        return self.called

    @property
    def where(self) -> str:
        return f"{describe(self.node, self.gm)} at node '{self.node.name}'"

    def out_shape(self) -> torch.Size:
        return self.node.meta["tensor_meta"].shape

    def param_name(self, attr: str) -> str:
        """The canonical name of the called module's parameter ``attr`` (the first name of a tied one)."""
        return self.space.canonical(f"{self.node.target}.{attr}")

    def channels(self, owner: str, n: int, name: str, dim: int = -1, key: str = "out") -> torch.Tensor:
        """``n`` channels owned by parameter ``owner``, produced by this node and named ``name``
        (they leave it along ``dim`` of its output); returns their atoms."""
        atoms = self.space.owned(owner, key, n)
        self.space.add_producer(Producer(self.node.name, name, dim, atoms))
        return atoms

    def produce(self, owner: str, n: int, dim: int, name: str | None = None, key: str = "out") -> torch.Tensor:
        """New output channels along ``dim`` owned by parameter ``owner``; returns output labels."""
        shape = self.out_shape()
        dim = dim % len(shape)
        return along(self.channels(owner, n, name or self.node.target, dim, key), dim, shape)

    def member(self, owner: str, dim: int, atoms: torch.Tensor, role: str, input_dim: int | None = None,
               input_arg: int | str = 0, input_groups: int = 1) -> None:
        """Index ``i`` of ``owner`` along ``dim`` belongs to ``atoms[i]`` (for an "in" member, the
        channel at index ``i`` along ``input_dim`` of the node's input ``input_arg``, and with
        ``input_groups`` the same index of every group of ``len(atoms)`` channels)."""
        self.space.add_member(Member(owner, dim, atoms, role, self.node.name, input_dim, input_arg, input_groups))

    def argument(self, position: int, keyword: str) -> int | str:
        """How the node passes an argument: its ``position`` if given positionally, else ``keyword``."""
        return position if len(self.node.args) > position else keyword

    def module_member(self, attr: str, dim: int, atoms: torch.Tensor, role: str) -> None:
        """Like :meth:`member`, for a parameter or buffer of the called module, if it is set."""
        if getattr(self.module, attr, None) is not None:
            self.member(self.param_name(attr), dim, atoms, role)

    def boundary(self, args: Any, reason: str | None = None) -> Any:
        """Block every channel in ``args``; the output carries fixed, unremovable channels."""
        reason = reason or f"reaches {self.where}, which fxprune has no channel rule for"
        for labels in tensors_in(args):
            self.space.block(labels, reason)
        return fixed_like(self.space, self.node.meta.get("tensor_meta"), reason)


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_read(node: torch.fx.Node) -> bool:
    """Whether a node's value is used: by anything but ``getitem`` nodes whose values are unused."""
    return any(not _is_getitem(u) or is_read(u) for u in node.users)


def element_read(node: torch.fx.Node, index: int) -> bool:
    """Whether element ``index`` of a node's tuple output is used (the whole tuple counts)."""
    return any(not _is_getitem(u) or (u.args[1] == index and is_read(u)) for u in node.users)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of arguments."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def fixed_like(space: LabelSpace, meta: Any, reason: str) -> Any:
    """Fixed labels shaped like ``meta`` (a TensorMetadata or a nest of them)."""
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return space.fixed(meta.shape, reason)
    if isinstance(meta, (list, tuple)):
        return type(meta)(fixed_like(space, m, reason) for m in meta)
    if isinstance(meta, dict):
        return {k: fixed_like(space, m, reason) for k, m in meta.items()}
    return None


def run_on_labels(ctx: RuleContext, args: tuple, kwargs: dict) -> Any:
    """Run the node's own op on label tensors: right for every op that only moves elements."""
    node = ctx.node
    if node.op == "call_method":
        name = "reshape" if node.target == "view" else node.target
        out = getattr(args[0], name)(*args[1:], **kwargs)
    else:
        out = (torch.reshape if node.target is torch.Tensor.view else node.target)(*args, **kwargs)
    return compressed(out)


def compressed(value: Any) -> Any:
    """Every label tensor in a nest, in its cheap broadcast form."""
    if isinstance(value, torch.Tensor):
        return expand_compressed(value)
    if isinstance(value, (list, tuple)):
        return type(value)(compressed(v) for v in value)
    return value


def same(labels: torch.Tensor) -> torch.Tensor:
    """Labels passed through unchanged, kept in their cheap broadcast form."""
    return expand_compressed(labels)
