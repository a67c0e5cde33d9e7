"""Resumable training: fit's state in a checkpoint that a killed run goes on from, batch for batch.

``fit(..., checkpoint_dir=d)`` keeps one file, ``d / FILE``, rewritten every ``checkpoint_every``
steps and after each epoch: the method's state (``method.state_dict()``: GrowEfficient's physical
model, stored as a graph with ``fxprune.save``, its logits, ``beta`` and gate optimizer; DST's or a
plain module's weights), the weight optimizer's and the schedulers' states, the history, and the
random states that decide what comes next: torch's (CPU and CUDA), Python's and NumPy's, and those
of the DataLoader's generators, now and at the start of the epoch. ``fit(..., resume=True)`` loads
it, draws the epoch's batches again from the recorded start and drops those already trained, then
continues with the saved random state: the resumed run trains on the same batches with the same
random numbers as an uninterrupted one, and ends with the same architecture and weights.

The file is written to a temporary name, synced and renamed over the old one, so a run killed
while writing leaves the previous checkpoint whole. It is ``MAGIC``, the format version and a
CRC-32 of the rest, then a ``torch.save`` payload read with ``weights_only=True``; the graph loads
through ``fxprune.load`` (allow-listed classes and functions only). A file that is not such a
checkpoint, is damaged, or was written by another kind of run (another method, settings,
optimizer, schedulers, batches per epoch or number of ranks) raises :class:`CheckpointError` and
is left as it is.
"""
from __future__ import annotations

import io
import os
import random
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import load as load_graph
from ..checkpoint import save as save_graph
from ..errors import CheckpointError
from ..optim import load_named_state_dict, named_state_dict, rebind_schedulers
from .distributed import World, describe_sampler

FILE = "fit.ckpt"
MAGIC = b"fxprune training checkpoint\n"
VERSION = 1
HEADER = struct.Struct("<II")  # format version, CRC-32 of the payload
GRAPH = "fxprune.save"  # key of a GraphModule stored as fxprune.save's bytes


class Checkpoints:
    """fit's checkpoints in ``directory``: :meth:`save` (rank 0 writes), :meth:`restore`, and
    :meth:`epoch`, which iterates the training data so that a restored run draws the same batches."""

    def __init__(self, directory: str | os.PathLike, every: int, world: World):
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {every}")
        self.path, self.every, self.world = Path(directory) / FILE, every, world
        self._epoch_start: dict[str, Any] | None = None  # the random states at the start of this epoch
        self._restored: dict[str, Any] | None = None  # the saved random states, until the next epoch starts

    def due(self, step: int) -> bool:
        """Whether a checkpoint is written after ``step`` steps."""
        return step % self.every == 0

    def epoch(self, loader: DataLoader, done: int) -> Iterator[Any]:
        """The batches of one epoch of ``loader`` after the first ``done``. The random states at the
        epoch's start are recorded for :meth:`save`; after :meth:`restore`, the epoch is drawn again
        from the saved ones, its first ``done`` batches dropped, and the random state set to the
        saved one."""
        restored, self._restored = self._restored, None
        if restored is not None and done > 0:
            self._epoch_start = restored["epoch start"]
            _set_random(self._epoch_start, loader)
            batches = iter(loader)
            for _ in range(done):  # the batches trained before the checkpoint
                next(batches)
            _set_random(restored["now"], loader)
            return batches
        if restored is not None:
            _set_random(restored["now"], loader)
        self._epoch_start = _random_state(loader)
        return iter(loader)

    def save(self, method: Any, model: nn.Module, optimizer: torch.optim.Optimizer, schedulers: list[Any],
             loader: DataLoader, progress: dict[str, Any]) -> None:
        """Write the state of a run (on rank 0 only): ``method.state_dict()``, ``optimizer`` (its
        parameters named as in ``model``, the module that trains), ``schedulers``, the random states
        and fit's ``progress`` (plain data)."""
        if not self.world.main:
            return
        state = {"signature": _signature(method, optimizer, schedulers, loader, self.world),
                 "method": _encode(method.state_dict()), "optimizer": named_state_dict(optimizer, model),
                 "schedulers": [s.state_dict() for s in schedulers], "progress": progress,
                 "random": {"epoch start": self._epoch_start, "now": _random_state(loader)}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write(self.path, state)

    def restore(self, method: Any, model_of: Callable[[Any], nn.Module], optimizer: torch.optim.Optimizer,
                schedulers: list[Any], loader: DataLoader) -> tuple[torch.optim.Optimizer, dict[str, Any]] | None:
        """Load the checkpoint into ``method`` (``method.load_state_dict``), into a new optimizer
        like ``optimizer`` over the parameters of ``model_of(method)`` (``schedulers`` are pointed
        at it and loaded) and the saved random states (applied by :meth:`epoch`). Returns the new
        optimizer and fit's progress, or None where no checkpoint was written yet. Rank 0 reads the
        file and broadcasts it, or its error, which every rank raises."""
        found = None
        if self.world.main:
            try:
                found = ("state", read(self.path)) if self.path.exists() else None
            except (CheckpointError, OSError) as e:  # raised on every rank, not only here
                found = ("error", str(e) if isinstance(e, CheckpointError) else f"{self.path}: cannot read it: {e}")
        found = self.world.broadcast_object(found)
        if found is None:
            return None
        kind, saved = found
        if kind == "error":
            raise CheckpointError(saved)
        _check_signature(self.path, saved["signature"], _signature(method, optimizer, schedulers, loader, self.world))
        try:
            method.load_state_dict(_decode(saved["method"]))
            new = load_named_state_dict(optimizer, model_of(method), saved["optimizer"])
            rebind_schedulers(schedulers, optimizer, new)
            for s, s_state in zip(schedulers, saved["schedulers"]):
                s.load_state_dict(s_state)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot restore the run from it: {type(e).__name__}: {e}") from e
        self._restored = saved["random"]
        return new, saved["progress"]


def write(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: to a temporary file, synced, then renamed over ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(MAGIC + HEADER.pack(VERSION, zlib.crc32(payload)))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def read(path: Path) -> dict[str, Any]:
    """The state that :func:`write` wrote to ``path``; :class:`CheckpointError` naming ``path`` if the
    file is not one, is damaged, or has a version this fxprune does not read."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not an fxprune training checkpoint (fit(..., checkpoint_dir=...) writes them)")
    if len(data) < len(MAGIC) + HEADER.size:
        raise CheckpointError(f"{path}: truncated training checkpoint")
    version, checksum = HEADER.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise CheckpointError(f"{path}: training checkpoint format version {version}; this fxprune reads version "
                              f"{VERSION}")
    payload = memoryview(data)[len(MAGIC) + HEADER.size:]
    if zlib.crc32(payload) != checksum:
        raise CheckpointError(f"{path}: its data do not match their checksum: the file is truncated or corrupted")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load cannot read its payload: {type(e).__name__}: {e}") from e


def _signature(method: Any, optimizer: torch.optim.Optimizer, schedulers: list[Any], loader: DataLoader,
               world: World) -> dict[str, Any]:
    """What a run must share with the run whose checkpoint it resumes."""
    settings = method.settings() if hasattr(method, "settings") else {}
    return {"method": type(method).__name__, **{f"setting '{k}'": v for k, v in settings.items()},
            "optimizer": type(optimizer).__name__, "schedulers": [type(s).__name__ for s in schedulers],
            "batches per epoch": len(loader), "sampler": describe_sampler(loader),
            "generators": len(_generators(loader)), "ranks": world.size}


def _check_signature(path: Path, saved: dict[str, Any], mine: dict[str, Any]) -> None:
    differ = [f"{k} {saved.get(k, 'absent')!r} there, {mine.get(k, 'absent')!r} here"
              for k in dict.fromkeys([*saved, *mine]) if saved.get(k) != mine.get(k)]
    if differ:
        raise CheckpointError(f"{path}: written by another kind of run: " + "; ".join(differ))


def _encode(x: Any) -> Any:
    """``x`` with every GraphModule replaced by ``{GRAPH: bytes of fxprune.save}``."""
    if isinstance(x, torch.fx.GraphModule):
        buffer = io.BytesIO()
        save_graph(x, buffer)
        return {GRAPH: buffer.getvalue()}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {GRAPH}:
            return load_graph(io.BytesIO(x[GRAPH]))
        return {k: _decode(v) for k, v in x.items()}
    return x


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The generators that order ``loader``'s batches: its own, its sampler's, its batch sampler's."""
    candidates = [getattr(loader, "generator", None), getattr(loader.sampler, "generator", None),
                  getattr(getattr(loader.batch_sampler, "sampler", None), "generator", None)]
    unique = {id(g): g for g in candidates if isinstance(g, torch.Generator)}
    return list(unique.values())


def _random_state(loader: DataLoader) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "generators": [g.get_state() for g in _generators(loader)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # only where something may draw from it
        name, keys, position, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, keys.tolist(), position, has_gauss, cached)
    return state


def _set_random(state: dict[str, Any], loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    for g, g_state in zip(_generators(loader), state["generators"], strict=True):
        g.set_state(g_state)
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
