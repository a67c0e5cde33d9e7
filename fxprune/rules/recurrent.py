"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN and their cells.

Hidden unit h of a layer owns row h of every gate block of ``weight_ih``, ``weight_hh`` and the
biases (i, f, g, o for LSTM; r, z, n for GRU; one block for RNN), column h of ``weight_hh``, and
its entry of every state. Each layer and direction has its own group of hidden units, named
``<module>.hidden_l<k>[_reverse]``; an LSTM with ``proj_size`` has a second group per layer for
the projected outputs (``<module>.proj_l<k>[_reverse]``), which are what the next layer, the
recurrence and the output see. A masked unit's gate rows are zero, so its state stays exactly zero.

The stacked states ``h_n``/``c_n`` hold every layer in one tensor: when they are passed in or used,
the layers' units are coupled index by index so that the tensor stays dense after compaction. A
``RecurrentStack`` (what compaction makes of an RNN whose layers keep different widths) has the
same groups, so it can be compacted again with the same mask names.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..labels import along, no_channels
from ..modules.recurrent import GATES, RecurrentStack, directions_of
from .registry import RuleContext, element_read, rule

CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def states_used(node: torch.fx.Node) -> bool:
    """Whether anything reads the states an RNN returns next to its output."""
    return element_read(node, 1)


def _gate_rows(ctx: RuleContext, weight_ih: str, owner: str, hidden: torch.Tensor, gates: int, input_atoms,
               input_role: str, recurrent_atoms: torch.Tensor, bias_names: list[str]) -> None:
    """Members of one layer: weight_ih and weight_hh (``owner``) rows per gate block, their columns, biases."""
    rows = hidden.repeat(gates)
    ctx.member(weight_ih, 0, rows, "out")
    ctx.member(weight_ih, 1, input_atoms, input_role, input_dim=-1)
    ctx.member(owner, 0, rows, "out")
    ctx.member(owner, 1, recurrent_atoms, "read")
    for name in bias_names:
        ctx.member(name, 0, rows, "out")


def _couple_rows(ctx: RuleContext, rows: list[torch.Tensor]) -> None:
    for other in rows[1:]:
        ctx.space.union(rows[0], other)


def _state_labels(rows: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Labels of a stacked state (layers * directions, [batch,] features) from its rows."""
    stacked = torch.stack(rows)
    return stacked.reshape(len(rows), *[1] * (len(shape) - 2), stacked.shape[1]).expand(shape)


@rule(nn.RNNBase, RecurrentStack)
def recurrent(ctx: RuleContext, x: torch.Tensor, hx=None) -> tuple:
    """out, h_n[, c_n] <- the stacked recurrence over x (see the module docstring)."""
    m, space, target = ctx.module, ctx.space, ctx.node.target
    layers = directions_of(m)
    lstm = isinstance(layers[0][0][1], nn.LSTM)
    layer_in, input_role = space.per_index(x, -1), "in"
    outs, hidden_rows = [], []
    for layer, directions in enumerate(layers):
        layer_out = []
        for d, (path, module, suffix) in enumerate(directions):
            name = lambda p: ctx.param_name(f"{path}.{p}{suffix}" if path else f"{p}{suffix}")  # noqa: E731
            unit = f"_l{layer}{'_reverse' if d else ''}"
            owner = name("weight_hh")
            hidden = ctx.channels(owner, module.hidden_size, f"{target}.hidden{unit}", key="hidden")
            out = hidden
            if module.proj_size:
                out = ctx.channels(name("weight_hr"), module.proj_size, f"{target}.proj{unit}")
                ctx.member(name("weight_hr"), 0, out, "out")
                ctx.member(name("weight_hr"), 1, hidden, "read")
            biases = [name("bias_ih"), name("bias_hh")] if module.bias else []
            _gate_rows(ctx, name("weight_ih"), owner, hidden, GATES[module.mode], layer_in, input_role, out, biases)
            layer_out.append(out)
            hidden_rows.append(hidden)
        outs.extend(layer_out)
        layer_in, input_role = torch.cat(layer_out), "read"
    out_meta, state_meta = ctx.node.meta["tensor_meta"]
    output = along(layer_in, -1, out_meta.shape)
    if isinstance(m, RecurrentStack):  # its states are zero-padded: not channels
        return output, _not_channels(state_meta)
    h_meta, c_meta = state_meta if lstm else (state_meta, None)
    if hx is not None or states_used(ctx.node):
        _couple_rows(ctx, outs)
        _couple_rows(ctx, hidden_rows)
    h_n = _state_labels(outs, h_meta.shape)
    c_n = _state_labels(hidden_rows, c_meta.shape) if lstm else None
    if hx is not None:
        for given, labels in zip(hx if lstm else (hx,), (h_n, c_n)):
            space.union(given, labels)
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def _not_channels(meta):
    if hasattr(meta, "shape"):
        return no_channels(meta.shape)
    return tuple(_not_channels(m) for m in meta)


@rule(nn.RNNCellBase)
def recurrent_cell(ctx: RuleContext, x: torch.Tensor, hx=None):
    """h'[, c'] <- one step of the cell; the incoming state shares the hidden units."""
    m = ctx.module
    owner = ctx.param_name("weight_hh")
    hidden = ctx.channels(owner, m.hidden_size, f"{ctx.node.target}.hidden", key="hidden")
    biases = [ctx.param_name(b) for b in ("bias_ih", "bias_hh")] if m.bias else []
    gates = next(g for cls, g in CELL_GATES.items() if isinstance(m, cls))
    _gate_rows(ctx, ctx.param_name("weight_ih"), owner, hidden, gates, ctx.space.per_index(x, -1), "in", hidden, biases)
    lstm = isinstance(m, nn.LSTMCell)
    if hx is not None:
        for given in hx if lstm else (hx,):
            ctx.space.union(ctx.space.per_index(given, -1), hidden)
    meta = ctx.node.meta["tensor_meta"]
    if lstm:
        return tuple(along(hidden, -1, t.shape) for t in meta)
    return along(hidden, -1, meta.shape)
