"""fit on several processes with torch.distributed: DistributedDataParallel and DistributedSampler.

:func:`~.train.fit` trains distributed when a process group is initialized: launch the script
with ``torchrun --nproc_per_node=N script.py``, call :func:`setup` first, and give ``fit`` a
``DataLoader(dataset, sampler=DistributedSampler(dataset))``, so that each rank trains on its own
shard. Before training, the ranks compare fingerprints of their models, masks, settings and data
(:meth:`World.agree`, one collective): a rank that differs raises :class:`DistributedError` on
every rank instead of hanging in a later collective.

How the ranks stay identical:

- Weights, GrowEfficient's logits and DST's thresholds are parameters of the module that
  ``DistributedDataParallel`` wraps: their gradients are averaged over the ranks, and every rank's
  optimizers take the same steps.
- Random numbers: fit gives every rank rank 0's torch random state when it starts, so all ranks
  draw the same numbers: the same gate sample at each step (one subnetwork per global batch, as
  GrowEfficient samples on one process), the same initial weights of grown units, and also the
  same dropout masks and DataLoader worker seeds. The data differ: DistributedSampler, with its
  own seed, gives each rank other samples.
- Buffers (BatchNorm statistics) follow each rank's batches; DDP copies rank 0's at every forward
  pass, and fit broadcasts rank 0's before each resize and at the end of each epoch.
- A resize is then a deterministic function of the same inputs on every rank. Its result is
  checked (the architectures' fingerprints are compared after each resize) and wrapped in a new
  ``DistributedDataParallel``, whose gradient buckets hold the new parameters.

So N ranks with batches of B train like one process with batches of N * B from the same
DistributedSampler order, except for BatchNorm's batch statistics (per rank) and the order of
floating-point sums.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import DistributedError

SHOWN_DIFFERENCES = 3  # per disagreeing rank, in the error message


def setup(backend: str | None = None, timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): ``nccl`` where CUDA exists,
    each rank on ``cuda:LOCAL_RANK``, else ``gloo`` on the CPU; ``timeout`` bounds every collective
    (torch's default where None). Returns this rank's device. Run without torchrun (no
    ``WORLD_SIZE``), it joins nothing: fit then trains in this process."""
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return device


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` ranks: 0 of 1 where no process group is initialized
    (or a group of one), and then every method is a no-op."""

    rank: int = 0
    size: int = 1

    @staticmethod
    def current() -> World:
        """The ranks of the initialized process group (one process where there is none)."""
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World()

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which shows progress, plots and writes checkpoints."""
        return self.rank == 0

    def agree(self, fingerprint: Mapping[str, str], problem: str | None = None) -> None:
        """Raise :class:`DistributedError` on every rank where any rank reports a ``problem`` or a
        ``fingerprint`` (:func:`fingerprint`) other than rank 0's; the message names the rank and
        the first entries that differ."""
        if self.size == 1:
            return
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, (dict(fingerprint), problem))
        messages = [f"rank {r}: {p}" for r, (_, p) in enumerate(gathered) if p]
        reference = gathered[0][0]
        for r, (theirs, _) in enumerate(gathered[1:], 1):
            differ = [k for k in dict.fromkeys([*reference, *theirs]) if reference.get(k) != theirs.get(k)]
            if differ:
                shown = [f"{k}: {theirs.get(k, 'absent')} on rank {r}, {reference.get(k, 'absent')} on rank 0"
                         for k in differ[:SHOWN_DIFFERENCES]]
                more = f" (and {len(differ) - SHOWN_DIFFERENCES} more)" if len(differ) > SHOWN_DIFFERENCES else ""
                messages.append(f"rank {r} disagrees with rank 0 on " + "; ".join(shown) + more)
        if messages:
            raise DistributedError("the ranks of this run do not agree: " + " | ".join(messages))

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in a new DistributedDataParallel (which broadcasts rank 0's parameters and
        buffers), or ``module`` itself on one rank."""
        if self.size == 1:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    @torch.no_grad()
    def broadcast_state(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers of ``module`` (one broadcast per dtype
        and device)."""
        if self.size == 1:
            return
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        key = lambda t: (str(t.dtype), str(t.device))  # noqa: E731
        for _, group in itertools.groupby(sorted(tensors, key=key), key=key):
            group = list(group)
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            for t, values in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(values.view_as(t))

    def broadcast_random(self) -> None:
        """Give every rank rank 0's torch random state (of the CPU, and of the current CUDA device
        where CUDA is in use)."""
        if self.size == 1:
            return
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        states = [torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None]
        dist.broadcast_object_list(states, src=0)
        torch.set_rng_state(states[0])
        if cuda and states[1] is not None:
            torch.cuda.set_rng_state(states[1])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable), on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """The sums of ``values`` over the ranks (in float64)."""
        if self.size == 1:
            return list(values)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()


def fingerprint(model: nn.Module, masks: Mapping[str, torch.Tensor | bool] | None = None,
                **settings: Any) -> dict[str, str]:
    """What the ranks of a run must agree on, entry by entry: every parameter's and buffer's name,
    shape and dtype, ``model``'s graph (its generated code; for another module, its printed tree),
    the units that each of ``masks`` keeps, and each of ``settings``."""
    out = {}
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        out.update({f"{kind} '{name}'": f"{tuple(t.shape)} {t.dtype}" for name, t in named})
    text = model.code if isinstance(model, torch.fx.GraphModule) else repr(model)
    out["the model's graph"] = f"code {_digest(text.encode())}"
    for key, mask in (masks or {}).items():
        if isinstance(mask, torch.Tensor):
            keep = mask.detach().bool().cpu()
            out[f"mask '{key}'"] = f"{int(keep.sum())} of {keep.numel()} on ({_digest(keep.numpy().tobytes())})"
        else:
            out[f"mask '{key}'"] = "on" if mask else "off"
    return out | {f"setting {k}": repr(v) for k, v in settings.items()}


def sampler_of(loader: DataLoader) -> Any:
    """The sampler that orders ``loader``'s samples (the one inside its batch sampler, if given)."""
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return inner if isinstance(inner, DistributedSampler) else getattr(loader, "sampler", None)


def describe_sampler(loader: DataLoader) -> str:
    """The sampler's class and, for a DistributedSampler, the settings that every rank must share."""
    s = sampler_of(loader)
    if isinstance(s, DistributedSampler):
        return f"DistributedSampler(num_replicas={s.num_replicas}, shuffle={s.shuffle}, seed={s.seed}, " \
               f"drop_last={s.drop_last})"
    return type(s).__name__


def sampler_problem(loader: DataLoader, world: World) -> str | None:
    """Why ``loader`` cannot feed this rank of ``world`` (None where it can)."""
    s = sampler_of(loader)
    if world.size == 1:
        return None
    if not isinstance(s, DistributedSampler):
        return (f"train_data samples with a {type(s).__name__}, so each of the {world.size} ranks would train on "
                "all the data; give fit DataLoader(dataset, sampler=DistributedSampler(dataset), ...)")
    if (s.num_replicas, s.rank) != (world.size, world.rank):
        return (f"train_data's DistributedSampler is for rank {s.rank} of {s.num_replicas}, but this is rank "
                f"{world.rank} of {world.size}")
    return None


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell ``loader``'s DistributedSampler (if it has one) which epoch starts, so that it shuffles
    anew, in the same order on every rank."""
    s = sampler_of(loader)
    if isinstance(s, DistributedSampler):
        s.set_epoch(epoch)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]
