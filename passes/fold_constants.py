"""Removed channels that still carry a value.

A masked channel is zero where it leaves its producer, but an op after it may turn zero into a
constant (a BatchNorm shift, sigmoid(0) = 0.5) or into something input-dependent (adding a
broadcast tensor). The values that reach each consumer are measured on the masked reference model:
a constant is folded into the consumer's bias where that is exact (a linear layer, an unpadded
convolution); any other non-zero value keeps its channel. Nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from fxprune.masks import Plan
from fxprune.trace import as_tuple


@dataclass(frozen=True)
class Adjustment:
    """What happened to a removed channel: folded into a consumer's bias or kept (zeroed) because it
    is not zero at ``consumer``, or kept because value ``consumer`` would lose every channel."""

    group: str
    channel: int
    consumer: str
    action: str  # "folded" or "kept"
    detail: str

    def __str__(self) -> str:
        return f"group '{self.group}' channel {self.channel} at '{self.consumer}': {self.action} ({self.detail})"


@dataclass
class Fold:
    """Add ``delta`` to the bias of module ``module``."""

    module: str
    delta: torch.Tensor


def _input(node: torch.fx.Node, arg: int | str) -> Any:
    """Argument ``arg`` (a position or a keyword) of ``node``."""
    return node.args[arg] if isinstance(arg, int) else node.kwargs.get(arg)


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[tuple[str, int | str]]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}
        self.args_of: dict[str, list] = {}
        for node, arg in wanted:
            self.args_of.setdefault(node, []).append(arg)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.args_of:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            for arg in self.args_of[n.name]:
                value = args[arg] if isinstance(arg, int) else kwargs[arg]
                self.seen.setdefault((n.name, arg), []).append(value.detach().clone())  # later in-place ops
        return super().run_node(n)


def consumer_inputs(reference: torch.fx.GraphModule, wanted: set[tuple[str, int | str]], example_inputs: Any) -> dict:
    """Input ``arg`` of each (node, arg) in ``wanted``, on the example and on a perturbed copy of it."""
    probe = _Capture(reference, wanted)
    with torch.no_grad():
        for inputs in (as_tuple(example_inputs), _perturbed(as_tuple(example_inputs))):
            probe.run(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])  # in-place ops
    return {k: torch.cat(v) for k, v in probe.seen.items()}


def _perturbed(inputs: tuple) -> tuple:
    g = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        elif isinstance(x, torch.Tensor) and x.numel() > 0:
            x = x.flatten()[torch.randperm(x.numel(), generator=g)].reshape(x.shape)
        out.append(x)
    return tuple(out)


def dropped_inputs(plan: Plan) -> list[tuple[Any, torch.Tensor]]:
    """The "in" members that lose channels which may be non-zero there, with the indices they lose."""
    analysis, out = plan.analysis, []
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    for m in analysis.space.members:
        if m.role == "in" and m.node not in plan.removed_nodes and getattr(_input(nodes[m.node], m.input_arg), "name", None) in analysis.tainted:
            lost = ((m.atoms >= 0) & ~plan.kept(m.atoms)).nonzero().flatten()
            if len(lost):
                out.append((m, lost))
    return out


def plan_folds(gm: torch.fx.GraphModule, plan: Plan, lost_inputs: list, values: dict[str, torch.Tensor]):
    """Decide, per removed channel reaching a consumer (``lost_inputs``, from
    :func:`dropped_inputs`), to drop, fold or keep it.

    Returns (unit roots to keep, folds, adjustments). A channel kept for one consumer is kept for
    all, so folds are decided only once every keep is known.
    """
    analysis = plan.analysis
    nodes = {n.name: n for n in gm.graph.nodes}
    keep, seen, folds, report = set(), [], [], []
    for m, lost in lost_inputs:
        node = nodes[m.node]
        module = gm.get_submodule(node.target) if node.op == "call_module" else None  # F.linear: nothing to fold into
        x = values[(m.node, m.input_arg)].movedim(m.input_dim, 0)
        x = x.reshape(m.input_groups, -1, *x.shape[1:]).transpose(0, 1)  # index i: channel i of every group
        x = x[lost].reshape(len(lost), m.input_groups, -1)
        first = x[:, :, 0]
        constant = ((x == first[..., None]).all(2) & torch.isfinite(first)).all(1)  # each channel holds one value
        const = torch.where(constant[:, None], first, torch.zeros(()))
        roots = analysis.roots[m.atoms[lost]]
        foldable = _foldable(module)  # only where input_groups == 1
        kept = (~constant | ((const != 0).any(1) & (not foldable))).nonzero().flatten()
        for i, root in zip(kept.tolist(), roots[kept].tolist()):
            keep.add(root)
            why = f"constant {float(const[i][const[i] != 0][0]):.4g} that {_kind(module)} cannot fold into a bias" \
                if constant[i] else "input-dependent value"
            report += _adjustments(analysis, [root], _consumer(node), "kept", [why])
        seen.append((m, node, module, lost, const[:, 0], roots))
    kept_roots = torch.tensor(sorted(keep), dtype=torch.long)
    for m, node, module, lost, const, roots in seen:
        fold = (const != 0) & ~torch.isin(roots, kept_roots)
        if bool(fold.any()):
            folds.append(Fold(node.target, _delta(module, m.dim, lost, torch.where(fold, const, 0.0))))
            at = fold.nonzero().flatten()
            report += _adjustments(analysis, roots[at].tolist(), node.target, "folded",
                                   [f"constant {value:.4g} into bias" for value in const[at].tolist()])
    return keep, folds, list(dict.fromkeys(report))


def _adjustments(analysis, roots: list[int], consumer: str, action: str, details: list[str]) -> list[Adjustment]:
    """One Adjustment per unit root, at ``consumer``."""
    index = torch.tensor(roots, dtype=torch.long)
    return [Adjustment(analysis.groups[gi].name, ui, consumer, action, detail) for gi, ui, detail in
            zip(analysis.group_of[index].tolist(), analysis.unit_in[index].tolist(), details)]


def _consumer(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _kind(module: nn.Module | None) -> str:
    if module is None:
        return "a function"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        return "a padded conv"
    return f"a {type(module).__name__}"


def _foldable(module: nn.Module | None) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        return module.padding == "valid" or all(p == 0 for p in module.padding)
    return False


def _delta(module: nn.Module, dim: int, lost: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    w = module.weight.detach().index_select(dim, lost)
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(2)
    return w @ const.to(w.dtype)


def fold_constants(gm: torch.fx.GraphModule, folds: list[Fold], plan: Plan) -> None:
    """Add each fold's delta (over the original output channels) to its module's bias, in place.

    ``gm`` is already sliced: the delta is restricted to the output channels ``plan`` keeps.
    """
    for fold in folds:
        m = gm.get_submodule(fold.module)
        weight = plan.analysis.gm.get_submodule(fold.module).weight
        owner = plan.analysis.space.canonical(f"{fold.module}.weight")
        out = next(x for x in plan.analysis.space.members if x.owner == owner and x.role == "out" and x.dim == 0)
        delta = fold.delta[plan.kept(out.atoms)]
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=weight.requires_grad)
        with torch.no_grad():
            m.bias.add_(delta)
