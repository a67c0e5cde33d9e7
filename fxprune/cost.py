"""Model cost: FLOPs of one forward pass and parameter count."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.func import functional_call
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .trace import no_attention_fastpath

__all__ = ["Cost", "cost"]


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@dataclass(frozen=True)
class Cost:
    """FLOPs of one forward pass (a multiply-add counts as 2) and number of parameter elements."""

    flops: int
    params: int

    def __str__(self) -> str:
        return f"{_si(self.flops)} FLOPs, {_si(self.params)} params"


def _slots(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under one name per (module, attribute) slot.

    A module reused at several paths gets one name, so ``functional_call`` swaps each
    slot once and restores it correctly; tied tensors in distinct slots get a name each.
    """
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        owned = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in owned:
            if (id(module), name) not in seen:
                seen.add((id(module), name))
                state[f"{prefix}.{name}" if prefix else name] = tensor
    return state


def _count_flops(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    inputs: tuple,
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    memo: dict[int, torch.Tensor] = {}

    def convert_once(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = convert(t)
        return memo[id(t)]

    state, inputs = pytree.tree_map_only(torch.Tensor, convert_once, (state, inputs))
    # without oneDNN, CPU RNNs run as matrix products the counter sees, not as one fused op it cannot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 notice, raised when its flags change
        with FlopCounterMode(display=False) as counter, torch.backends.mkldnn.flags(enabled=False), \
                no_attention_fastpath():
            functional_call(model, state, inputs, tie_weights=False)
    return counter.get_total_flops()


def cost(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> Cost:
    """Count the FLOPs of ``model(*example_inputs)`` and the model's parameter elements.

    FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
    matmul- and convolution-like ops only (elementwise ops, normalization and pooling
    are free); recurrent layers count their gate matrix products. The forward pass runs through :func:`torch.func.functional_call` on
    fake tensors (:class:`FakeTensorMode`), so no real arithmetic is done and the
    model's own parameters and buffers (e.g. BatchNorm running stats in train mode)
    are never touched. A model whose control flow depends on tensor values runs
    instead on clones of its parameters, buffers and inputs. Shared parameters are
    counted once.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    state = _slots(model)
    with torch.no_grad():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                flops = _count_flops(model, state, inputs, mode.from_tensor)
        except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException):
            flops = _count_flops(model, state, inputs, torch.clone)
    return Cost(flops=int(flops), params=sum(p.numel() for p in model.parameters()))
