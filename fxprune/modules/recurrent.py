"""A multi-layer RNN whose layers, and the two directions of a layer, keep different numbers of units."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")

Direction = tuple[str, nn.RNNBase, str]  # (path of the module inside its owner, module, parameter suffix)


class RecurrentStack(nn.Module):
    """An ``nn.LSTM``/``nn.GRU``/``nn.RNN`` whose layers have their own widths (``nn.RNNBase`` needs
    one ``hidden_size`` for all). Layer i is one single-layer module or, where its two directions
    differ, a forward module and a reverse one that reads the sequence flipped. It returns
    ``(output, states)`` like ``nn.RNNBase``, the states zero-padded to the widest layer.
    """

    def __init__(self, layers: list[nn.Module], dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)  # each an nn.RNNBase, or an nn.ModuleList([forward, reverse])
        self.dropout, self.batch_first = dropout, batch_first

    def forward(self, x: torch.Tensor, hx: None = None):
        if hx is not None:
            raise ValueError("RecurrentStack takes no initial state: its layers have different widths")
        time = 1 if self.batch_first and x.dim() == 3 else 0
        states = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.ModuleList):
                forward_out, forward_state = layer[0](x)
                reverse_out, reverse_state = layer[1](x.flip(time))
                x = torch.cat([forward_out, reverse_out.flip(time)], -1)
                states += [forward_state, reverse_state]
            else:
                x, state = layer(x)
                states.append(state)
            if self.dropout and i < len(self.layers) - 1:
                x = F.dropout(x, self.dropout, self.training)
        if isinstance(states[0], tuple):
            return x, (_stack([h for h, _ in states]), _stack([c for _, c in states]))
        return x, _stack(states)

    @classmethod
    def from_parameters(cls, like: nn.RNNBase, layers: list[list[dict[str, torch.Tensor]]],
                        dropout: float, batch_first: bool) -> RecurrentStack:
        """A stack holding ``layers[i][d]`` (parameters by name without suffix) as layer i, direction d;
        ``like`` gives the cell type, bias and nonlinearity."""
        built: list[nn.Module] = []
        for directions in layers:
            if len({widths(like, p) for p in directions}) == 1:
                built.append(_single(like, directions, batch_first))
            else:
                built.append(nn.ModuleList([_single(like, [p], batch_first) for p in directions]))
        return cls(built, dropout, batch_first)


def directions_of(m: nn.Module) -> list[list[Direction]]:
    """Per layer, per direction: where the parameters of an ``nn.RNNBase`` or a ``RecurrentStack`` live."""
    if isinstance(m, nn.RNNBase):
        suffixes = ["", "_reverse"] if m.bidirectional else [""]
        return [[("", m, f"_l{k}{s}") for s in suffixes] for k in range(m.num_layers)]
    out = []
    for i, layer in enumerate(m.layers):
        if isinstance(layer, nn.ModuleList):
            out.append([(f"layers.{i}.{j}", sub, "_l0") for j, sub in enumerate(layer)])
        else:
            out.append([(f"layers.{i}", layer, s) for s in (["_l0", "_l0_reverse"] if layer.bidirectional else ["_l0"])])
    return out


def parameter_names(m: nn.Module) -> list[list[dict[str, str]]]:
    """Per layer, per direction: the qualified name of each parameter (by name without suffix)."""
    return [[{name: f"{path}.{name}{suffix}" if path else f"{name}{suffix}" for name in parameters_of((path, module, suffix))}
             for path, module, suffix in directions] for directions in directions_of(m)]


def renamed(before: nn.Module, after: nn.Module) -> dict[str, str]:
    """Where each parameter of ``before`` lives in ``after`` (the same RNN, rebuilt as a stack or back)."""
    return {old[name]: new[name]
            for layer_old, layer_new in zip(parameter_names(before), parameter_names(after))
            for old, new in zip(layer_old, layer_new) for name in old}


def parameters_of(direction: Direction) -> dict[str, torch.Tensor]:
    """The parameters of one direction, by their names without suffix."""
    _, module, suffix = direction
    return {name: getattr(module, name + suffix) for name in PARAMETERS if hasattr(module, name + suffix)}


def widths(like: nn.RNNBase, params: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(hidden units, projected units or 0) of one direction's parameters."""
    hidden = params["weight_hh"].shape[0] // GATES[like.mode]
    return hidden, params["weight_hr"].shape[0] if "weight_hr" in params else 0


def _single(like: nn.RNNBase, directions: list[dict[str, torch.Tensor]], batch_first: bool) -> nn.RNNBase:
    """One layer holding ``directions`` (one, or forward and reverse of equal widths)."""
    hidden, proj = widths(like, directions[0])
    if proj and proj >= hidden:  # nn.LSTM needs proj_size < hidden_size: add units that stay zero
        directions = [_with_dead_units(p, GATES[like.mode], proj + 1) for p in directions]
        hidden = proj + 1
    kwargs = dict(num_layers=1, bias=like.bias, batch_first=batch_first, bidirectional=len(directions) == 2,
                  device="meta")
    if like.mode == "LSTM":
        kwargs["proj_size"] = proj
    elif like.mode != "GRU":
        kwargs["nonlinearity"] = like.nonlinearity
    module = type(like)(directions[0]["weight_ih"].shape[1], hidden, **kwargs)
    for suffix, params in zip(["_l0", "_l0_reverse"], directions):
        for name, t in params.items():
            setattr(module, name + suffix, t if isinstance(t, nn.Parameter) else nn.Parameter(t, t.requires_grad))
    module._init_flat_weights()
    return module


def _with_dead_units(params: dict[str, torch.Tensor], gates: int, width: int) -> dict[str, torch.Tensor]:
    """Widen one direction to ``width`` hidden units with zero gate rows and zero projection columns:
    such a unit's state stays exactly zero, so the function is unchanged."""
    hidden = params["weight_hh"].shape[0] // gates
    out = {}
    for name, t in params.items():
        if name == "weight_hr":
            grown = F.pad(t.detach(), (0, width - hidden))
        else:
            blocks = t.detach().reshape(gates, hidden, *t.shape[1:])
            grown = F.pad(blocks, (0, 0) * (t.dim() - 1) + (0, width - hidden)).reshape(gates * width, *t.shape[1:])
        out[name] = nn.Parameter(grown, t.requires_grad)
    return out


def _stack(states: list[torch.Tensor]) -> torch.Tensor:
    width = max(s.shape[-1] for s in states)
    return torch.cat([F.pad(s, (0, width - s.shape[-1])) for s in states])
