"""Where each tensor of a rewritten model comes from: old name, and old index per new index."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from fxprune.passes.slice_parameters import kept_indices

from .masks import Plan
from .modules.masked import MaskedModule
from .modules.recurrent import GATES, RecurrentStack, directions_of, renamed


@dataclass
class TensorMap:
    """A tensor of the new model: ``source`` names the tensor of the old model it comes from (None
    for a new tensor), and ``index[d][i]`` is the old index of new index ``i`` along dim ``d``, or -1
    for a new entry. Dims not in ``index`` are unchanged."""

    source: str | None
    index: dict[int, torch.Tensor] = field(default_factory=dict)

    def carry(self, old: torch.Tensor | None, shape: torch.Size, fill: float = 0.0) -> torch.Tensor:
        """A tensor of ``shape`` holding ``old``'s entries where they map, ``fill`` where they are new."""
        if old is None or self.source is None:
            return torch.full(shape, fill, dtype=old.dtype if old is not None else torch.float32,
                              device=old.device if old is not None else None)
        out = old.detach().clone() if not self.index else old.detach()
        for dim, idx in sorted(self.index.items()):  # index_select writes new storage
            idx = idx.to(out.device)
            out = out.index_select(dim, idx.clamp(min=0))
            new = (idx < 0).reshape([-1 if d == dim else 1 for d in range(out.dim())])
            out = out.masked_fill(new, fill) if bool((idx < 0).any()) else out
        return out


Mapping = dict[str, TensorMap]  # by qualified name in the new model (every name of a tied tensor)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by qualified name, a tied one under each of its names."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def identity_mapping(model: nn.Module) -> Mapping:
    """Every tensor of ``model`` maps to itself."""
    return {name: TensorMap(name) for name in named_tensors(model)}


def compact_mapping(gm: torch.fx.GraphModule, plan: Plan) -> Mapping:
    """The mapping from ``plan.analysis.gm`` to ``gm``, its compaction under ``plan``."""
    return rewrite_mapping(gm, plan.analysis.gm, kept_indices(plan), plan.analysis.space.aliases)


def rewrite_mapping(gm: torch.fx.GraphModule, before: torch.fx.GraphModule, index: dict[str, dict[int, torch.Tensor]],
                    aliases: dict[str, str]) -> Mapping:
    """The mapping from ``before`` to ``gm`` when the tensors of ``before`` (by canonical name)
    took, along each dim, the old indices ``index[name][dim]`` (-1: new)."""
    old = named_tensors(before)
    moved = _moved_names(gm, before)
    out = {}
    for name, t in named_tensors(gm).items():
        source, gates = moved.get(name, (name, 1))
        if source not in old:
            out[name] = TensorMap(None)
            continue
        kept = index.get(aliases.get(source, source), {})
        shape = old[source].shape
        out[name] = TensorMap(source, {d: _widened(kept.get(d, torch.arange(shape[d])), t.shape[d], gates if d == 0 else 1)
                                       for d in range(t.dim()) if d in kept or t.shape[d] != shape[d]})
    return out


def _moved_names(gm: torch.fx.GraphModule, before: torch.fx.GraphModule) -> dict[str, tuple[str, int]]:
    """New name -> (old name, gate blocks along dim 0) for the tensors compaction moved: inside a
    MaskedModule, or an RNN rebuilt as a RecurrentStack (or back)."""
    out = {}
    for path, module in gm.named_modules():
        inner = module.module if isinstance(module, MaskedModule) else module
        prefix = f"{path}.module." if inner is not module else f"{path}."
        if not isinstance(inner, (nn.RNNBase, RecurrentStack)) and inner is module:
            continue
        try:
            old_module = before.get_submodule(path)
        except AttributeError:  # a module the rewrite added
            continue
        names = renamed(old_module, inner) if isinstance(inner, (nn.RNNBase, RecurrentStack)) else {}
        for local, _ in named_tensors(inner).items():
            old_local = next((o for o, n in names.items() if n == local), local)
            gates = GATES[_mode(inner)] if local.rpartition(".")[2].startswith(("weight_ih", "weight_hh", "bias_")) else 1
            out[prefix + local] = (f"{path}.{old_local}", gates)
    return out


def _mode(m: nn.Module) -> str:
    return m.mode if isinstance(m, nn.RNNBase) else directions_of(m)[0][0][1].mode


def _widened(idx: torch.Tensor, size: int, blocks: int) -> torch.Tensor:
    """``idx`` padded with new entries (-1) up to ``size``, at the end of each of ``blocks`` equal
    blocks (an RNN's gate blocks widened with units that stay zero)."""
    if size == len(idx):
        return idx
    pieces = idx.reshape(blocks, -1)
    pad = torch.full((blocks, size // blocks - pieces.shape[1]), -1, dtype=idx.dtype)
    return torch.cat([pieces, pad], 1).reshape(-1)
