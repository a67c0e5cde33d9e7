"""Gates: learnable multipliers on a group's channels or on a residual branch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """One value per unit of a channel group (or one for a layer), multiplied into the tensors the
    unit lives in. ``key`` is the group or layer name: ``hard()`` is directly a mask for
    ``compact``. Subclasses say how ``values()`` follows from their parameters; this one is a plain
    trainable vector, initially ``init``.

    Called as ``gate(x, units, dim)`` it returns ``x * values()[units]`` along ``dim`` (``units``:
    the unit of each index of ``x`` there); called as ``gate()`` it returns ``values()``.
    """

    def __init__(self, key: str, size: int, init: float = 1.0):
        super().__init__()
        self.key = key
        self.weight = nn.Parameter(torch.full((size,), float(init)))

    def values(self) -> torch.Tensor:
        """The current gate value of every unit."""
        return self.weight

    def begin_pass(self) -> None:
        """Called at the start of every forward pass of the gated model (a sampled gate draws anew)."""

    def hard(self) -> torch.Tensor:
        """Which units stay (bool)."""
        return self.weight.detach() > 0

    def forward(self, x: torch.Tensor | None = None, units: torch.Tensor | None = None, dim: int = 1) -> torch.Tensor:
        values = self.values()
        if x is None:
            return values
        if units is None:  # a layer gate: one value
            return x * values.reshape([]).to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * values[units].to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.key!r}, size={self.weight.numel()}"


class GateSet(nn.Module):
    """The gates of a gated model, its ``gates`` submodule. The gated graph calls it first, once per
    forward pass, to tell every gate that a pass begins; being part of the graph, this survives
    copies of the model, which drop forward hooks."""

    _is_impure = True  # its call has no users: dead-code elimination must keep it

    def forward(self) -> None:
        for gate in self.children():
            gate.begin_pass()


class GatedModule(nn.Module):
    """``module`` whose parameters' entries and outputs belong to gated units: each parameter in
    ``params`` is multiplied by the gate values of its entries' units along a dim, and each output
    in ``outputs`` likewise, on every call (an RNN's hidden units, attention heads). The gate
    values come as the keyword ``gates`` (a tuple, one tensor per gate the module reads)."""

    def __init__(self, module: nn.Module, params: dict[str, list[tuple[int, int, torch.Tensor]]],
                 outputs: dict[int, list[tuple[int, int, torch.Tensor]]]):
        super().__init__()
        self.module = module
        self.param_names = list(params)
        self.param_sites = [[(gate, dim) for gate, dim, _ in sites] for sites in params.values()]
        self.output_sites = {i: [(gate, dim) for gate, dim, _ in sites] for i, sites in outputs.items()}
        for i, sites in enumerate(params.values()):
            for j, (_, _, units) in enumerate(sites):
                self.register_buffer(f"param_units_{i}_{j}", units)
        for i, sites in outputs.items():
            for j, (_, _, units) in enumerate(sites):
                self.register_buffer(f"output_units_{i}_{j}", units)

    def _factor(self, gates: tuple, sites, prefix: str, like: torch.Tensor) -> torch.Tensor:
        factor = torch.ones((), dtype=like.dtype, device=like.device)
        for j, (gate, dim) in enumerate(sites):
            units = getattr(self, f"{prefix}_{j}")
            shape = [1] * like.dim()
            shape[dim] = -1
            # an index whose unit is -1 belongs to no gated unit: factor 1
            values = torch.cat([gates[gate].to(like.dtype), torch.ones(1, dtype=like.dtype, device=like.device)])
            factor = factor * values[units].reshape(shape)
        return factor

    def forward(self, *args, gates: tuple = (), **kwargs):
        from torch.func import functional_call
        from torch.utils._pytree import tree_flatten, tree_unflatten

        params = {}
        for i, name in enumerate(self.param_names):
            p = self.module.get_parameter(name)
            params[name] = p * self._factor(gates, self.param_sites[i], f"param_units_{i}", p)
        out = functional_call(self.module, params, args, kwargs)
        leaves, spec = tree_flatten(out)
        for i, sites in self.output_sites.items():
            leaves[i] = leaves[i] * self._factor(gates, sites, f"output_units_{i}", leaves[i])
        return tree_unflatten(leaves, spec)


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # exactly these: a subclass may compute otherwise


class GatedBatchNorm(nn.Module):
    """A BatchNorm whose output channels are gated through its affine parameters: gate values ``g``
    scale ``weight`` and ``bias``, so ``bn(x; w * g, b * g) == bn(x) * g`` costs a multiply of two
    vectors instead of one of the whole output (forward and backward). Each gate that multiplies
    its output is one site (:meth:`add_gate`), whose values come in order as the keyword ``gates``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if type(module) not in BATCH_NORMS or not module.affine:
            raise TypeError(f"GatedBatchNorm needs an affine {', '.join(c.__name__ for c in BATCH_NORMS)}, got {module}")
        self.module = module
        self.sites = 0
        self.direct: set[int] = set()  # sites whose units are 0..C-1: the gate values as they are

    def add_gate(self, units: torch.Tensor) -> None:
        """Gate the channels by one more gate: ``units[c]`` is its unit of channel ``c``."""
        self.register_buffer(f"units_{self.sites}", units.to(self.module.weight.device, copy=True))
        if torch.equal(units, torch.arange(len(units))):
            self.direct.add(self.sites)
        self.sites += 1

    def forward(self, x: torch.Tensor, gates: tuple = ()) -> torch.Tensor:
        factor = None
        for j, values in enumerate(gates):
            values = values.to(x.dtype) if j in self.direct else values.to(x.dtype)[getattr(self, f"units_{j}")]
            factor = values if factor is None else factor * values
        bn = self.module
        weight, bias = (bn.weight, bn.bias) if factor is None else (bn.weight * factor, bn.bias * factor)
        # as torch.nn.modules.batchnorm._BatchNorm.forward, with these affine parameters
        bn._check_input_dim(x)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        stats = not bn.training or bn.track_running_stats
        return F.batch_norm(x, bn.running_mean if stats else None, bn.running_var if stats else None,
                            weight, bias, use_batch, momentum, bn.eps)


WRAPPERS = (GatedModule, GatedBatchNorm)  # gated modules that hold the original one as ``module``
