"""A module run with fixed masks on some of its parameters' entries and on its outputs."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten


class MaskedModule(nn.Module):
    """``module`` whose parameters are multiplied by ``param_masks`` (by name, broadcastable) and
    whose outputs are multiplied by ``output_masks`` (a nest with one tensor per output tensor;
    ``torch.ones(())`` or None leaves an output alone) on every call. This zeroes channels that live inside a module (an RNN's hidden units, an
    attention head) while the parameters themselves stay whole and trainable."""

    def __init__(self, module: nn.Module, param_masks: dict[str, torch.Tensor], output_masks: Any = None):
        super().__init__()
        self.module = module
        self.masked_names = list(param_masks)
        for i, mask in enumerate(param_masks.values()):
            self.register_buffer(f"param_mask_{i}", mask)
        leaves, _ = tree_flatten(output_masks)
        self.output_masked = [isinstance(leaf, torch.Tensor) and not bool((leaf == 1).all()) for leaf in leaves]
        for i, (mask, masked) in enumerate(zip(leaves, self.output_masked)):
            if masked:
                self.register_buffer(f"output_mask_{i}", mask)

    def _masked_parameters(self) -> dict[str, torch.Tensor]:
        return {name: self.module.get_parameter(name) * getattr(self, f"param_mask_{i}")
                for i, name in enumerate(self.masked_names)}

    def baked(self) -> "MaskedModule":
        """A copy whose module holds its masked parameters, with the output masks only: the same
        outputs, without ``functional_call`` (for inference and export)."""
        module = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, value in self._masked_parameters().items():
                module.get_parameter(name).copy_(value)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
        masks = [getattr(self, f"output_mask_{i}") if masked else torch.ones(()) for i, masked in enumerate(self.output_masked)]
        return MaskedModule(module, {}, masks).train(self.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = self._masked_parameters()
        out = functional_call(self.module, params, args, kwargs) if params else self.module(*args, **kwargs)
        if not any(self.output_masked):
            return out
        leaves, spec = tree_flatten(out)
        leaves = [x * getattr(self, f"output_mask_{i}").to(x.dtype) if masked else x
                  for i, (x, masked) in enumerate(zip(leaves, self.output_masked))]
        return tree_unflatten(leaves, spec)
