"""A multi-layer RNN whose layers keep different numbers of hidden units."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class RecurrentStack(nn.Module):
    """An ``nn.LSTM``/``nn.GRU``/``nn.RNN`` run as one single-layer module per layer, so that each
    layer can have its own width (``nn.RNNBase`` needs one ``hidden_size`` for all).

    A bidirectional layer whose two directions keep different numbers of units runs as one
    bidirectional module as wide as the wider direction: the extra units have zero weights, so they
    stay exactly zero, and ``keep_<i>`` drops them from the layer's output. The returned states are
    stacked like ``nn.RNNBase``'s, zero-padded to the widest layer.
    """

    def __init__(self, layers: list[nn.RNNBase], keep: list[torch.Tensor | None], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout
        self.lstm = layers[0].mode == "LSTM"
        for i, index in enumerate(keep):
            self.register_buffer(f"keep_{i}", index)

    def forward(self, x: torch.Tensor, hx: None = None):
        if hx is not None:
            raise ValueError("RecurrentStack takes no initial state (its layers have different widths)")
        states = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x)
            index = getattr(self, f"keep_{i}")
            if index is not None:
                x = x.index_select(-1, index)
            if self.dropout and i < len(self.layers) - 1:
                x = F.dropout(x, self.dropout, self.training)
            states.append(state)
        if self.lstm:
            return x, (_stack([h for h, _ in states]), _stack([c for _, c in states]))
        return x, _stack(states)

    @classmethod
    def from_layers_of(cls, m: nn.RNNBase) -> RecurrentStack:
        """Split ``m``, whose parameters may have different widths per layer and direction."""
        directions = ["", "_reverse"] if m.bidirectional else [""]
        gates = GATES[m.mode]
        layers, keep = [], []
        for layer in range(m.num_layers):
            get = lambda name, d: getattr(m, f"{name}_l{layer}{d}")  # noqa: E731
            hidden = [get("weight_hh", d).shape[0] // gates for d in directions]
            proj = [get("weight_hr", d).shape[0] for d in directions] if m.proj_size else hidden
            width, out_width = max(hidden), max(proj)
            new = _like(m, get("weight_ih", "").shape[1], width, out_width if m.proj_size else 0)
            for d, h, p in zip(directions, hidden, proj):
                _copy_padded(new, m, f"_l0{d}", f"_l{layer}{d}", gates, h, width)
            padded = len(set(proj)) > 1
            keep.append(torch.cat([torch.arange(p) + i * out_width for i, p in enumerate(proj)])
                        .to(get("weight_ih", "").device) if padded else None)
            layers.append(new)
        return cls(layers, keep, m.dropout)


def _like(m: nn.RNNBase, input_size: int, hidden: int, proj: int) -> nn.RNNBase:
    w = m.weight_ih_l0
    kwargs = dict(num_layers=1, bias=m.bias, batch_first=m.batch_first, bidirectional=m.bidirectional,
                  device=w.device, dtype=w.dtype)
    if m.mode == "LSTM":
        kwargs["proj_size"] = proj
    elif m.mode != "GRU":
        kwargs["nonlinearity"] = m.nonlinearity
    return type(m)(input_size, hidden, **kwargs)


@torch.no_grad()
def _copy_padded(new: nn.RNNBase, old: nn.RNNBase, to: str, source: str, gates: int, units: int, width: int) -> None:
    """Copy one direction's parameters into ``new``, each gate block padded with zero rows."""
    for name, p in new.named_parameters():
        if not name.endswith(to):
            continue
        src = getattr(old, name[: -len(to)] + source)
        p.zero_()
        p.requires_grad_(src.requires_grad)
        if name.startswith("weight_hr"):
            p[: src.shape[0], : src.shape[1]] = src
            continue
        for g in range(gates):
            rows = src[g * units:(g + 1) * units]
            if p.dim() == 1:
                p[g * width: g * width + units] = rows
            else:
                p[g * width: g * width + units, : rows.shape[1]] = rows


def _stack(states: list[torch.Tensor]) -> torch.Tensor:
    width = max(s.shape[-1] for s in states)
    return torch.cat([F.pad(s, (0, width - s.shape[-1])) for s in states])
