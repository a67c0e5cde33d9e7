"""Sampled gates: Bernoulli(sigma(beta * s)) per unit with a straight-through gradient, drawn for
all the gates of a model at once."""
from __future__ import annotations

import torch
from torch import nn

from ..modules.gate import Gate


class GateSample:
    """The gates that draw together: one draw per forward pass for all of them, in a few tensor
    operations on their concatenated logits (a model with many gates pays for one draw, not one
    per gate). :meth:`clear` starts a new pass; the first gate that asks for its values draws."""

    def __init__(self) -> None:
        self.gates: list[SampledGate] = []
        self._values: dict[int, torch.Tensor] | None = None

    def add(self, gate: SampledGate) -> None:
        self.gates.append(gate)
        self._values = None

    def clear(self) -> None:
        """Draw anew at the next :meth:`values_of`."""
        self._values = None

    def probabilities(self) -> torch.Tensor:
        """sigma(beta * s) of every unit of every gate, in order (differentiable)."""
        logits = torch.cat([g.weight for g in self.gates])
        betas = {g.beta for g in self.gates}
        if len(betas) == 1:
            return torch.sigmoid(betas.pop() * logits)
        scale = torch.cat([torch.full_like(g.weight, g.beta) for g in self.gates])
        return torch.sigmoid(scale * logits)

    def values_of(self, gate: SampledGate) -> torch.Tensor:
        """``gate``'s values in this pass: 0/1 with the gradient of sigma(beta * s)."""
        if self._values is None:
            p = self.probabilities()
            z = (torch.rand(p.shape, device=p.device) < p.detach()).to(p.dtype)
            values = (z + (p - p.detach())).split([g.weight.numel() for g in self.gates])
            self._values = {id(g): v for g, v in zip(self.gates, values)}
        return self._values[id(gate)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_values": None}  # a copy draws its own (a sample is not a graph leaf)


class SampledGate(Gate):
    """A gate whose ``weight`` holds logits ``s``. In training mode its values are one sample of
    Bernoulli(sigma(beta * s)) per unit, whose gradient is that of sigma(beta * s); in eval mode
    they are ``s > 0``.

    The sample is drawn at the first call after :meth:`begin_pass` (which the gated graph calls
    first in every forward pass) and kept until the next one, so every call during one pass (a
    residual stream's gate multiplies the output of each of its producers) sees the same sample.
    Gates given the same ``sample`` draw together.
    """

    def __init__(self, key: str, logits: torch.Tensor, beta: float = 1.0, sample: GateSample | None = None):
        super().__init__(key, len(logits))
        with torch.no_grad():
            self.weight.copy_(logits)
        self.beta = beta
        self.sample = GateSample() if sample is None else sample
        self.sample.add(self)

    def probabilities(self) -> torch.Tensor:
        """sigma(beta * s): the probability that each unit is sampled on."""
        return torch.sigmoid(self.beta * self.weight)

    def begin_pass(self) -> None:
        """Draw a new sample at the next call."""
        self.sample.clear()

    def values(self) -> torch.Tensor:
        if not self.training:
            return (self.weight > 0).to(self.weight.dtype)
        return self.sample.values_of(self)
