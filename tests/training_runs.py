"""Training runs that the distributed and resume tests start in other processes.

Tiny models and data, a GrowEfficient that records digests of what it trains, the scenarios that
each spawned rank of tests/test_distributed.py runs (:func:`rank_main`), and a run that kills
itself mid-training for tests/test_resume.py (``python tests/training_runs.py DIR STEP``).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fxprune.methods import DST, GrowEfficient, fit
from fxprune.methods.distributed import setup
from fxprune.methods.train import FitResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_budget import Residual  # noqa: E402

PROBE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
KILL = dict(epochs=2, resize_every=4, checkpoint_every=3)  # the run that tests/test_resume.py kills


def dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    """``n`` 8x8 one-channel images labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1))


def sharded(data: TensorDataset, batch_size: int, **sampler: Any) -> DataLoader:
    """Batches of this rank's shard (``sampler``: DistributedSampler's num_replicas and rank, if given)."""
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, seed=0, **sampler))


def shuffled(data: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))


class ResidualMLP(nn.Module):
    """Linear layers with two removable residual blocks and no BatchNorm."""

    def __init__(self, width: int = 16, blocks: int = 2):
        super().__init__()
        self.inp, self.out = nn.Linear(64, width), nn.Linear(width, 10)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))

    def forward(self, x):
        x = F.relu(self.inp(x.flatten(1)))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def digest(*parts: torch.Tensor | str) -> str:
    """SHA-1 of tensors' bytes and strings, in order."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """Of a module's graph (if it has one) and every parameter and buffer, by name."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return digest(getattr(module, "code", ""), *[x for name, t in named for x in (name, t)])


class Stopped(Exception):
    """Raised by :class:`Recorded` at its ``stop_at`` step (a crash)."""


class Recorded(GrowEfficient):
    """A GrowEfficient that records digests: after every step, of its weights, their gradients and
    a gated forward pass of :data:`PROBE` drawn from the current random state (the gate sample the
    next step would draw); after every resize, of the new gated model. At step ``stop_at`` it
    raises :class:`Stopped`, or with ``kill`` kills its process."""

    def __init__(self, *args: Any, stop_at: int | None = None, kill: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stop_at, self.kill, self.steps = stop_at, kill, 0
        self.records: dict[str, list[str]] = {"weights": [], "gradients": [], "sample": [], "resize": []}

    def after_step(self) -> None:
        self.steps += 1
        params = list(self.model.parameters())
        self.records["weights"].append(digest(*params))
        self.records["gradients"].append(digest(*[p.grad for p in params if p.grad is not None]))
        with torch.random.fork_rng(devices=[]):
            self.records["sample"].append(digest(copy.deepcopy(self.model).train()(PROBE)))
        if self.steps == self.stop_at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Stopped(f"stopped at step {self.steps}")

    def resize(self):
        mapping = super().resize()
        self.records["resize"].append(state_digest(self.model))
        return mapping


def ge_run(model: Callable[[], nn.Module], loader: DataLoader, epochs: int = 2, resize_every: int = 3,
           prepare: Callable[[GrowEfficient], None] | None = None, stop_at: int | None = None, kill: bool = False,
           **fit_kwargs: Any) -> tuple[Recorded, FitResult]:
    """GrowEfficient from a seed of a quarter of the units toward half the FLOPs (unrounded: the
    tiny groups would round whole), SGD with a step schedule; ``prepare`` edits it before training."""
    torch.manual_seed(0)
    ge = Recorded(model(), loader.dataset.tensors[0][:1], target=0.5, epochs=epochs, lam=2.0, round_to=1,
                  stop_at=stop_at, kill=kill)
    ge.resize()
    if prepare is not None:
        prepare(ge)
    optimizer = torch.optim.SGD(ge.weights(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    kwargs = {"progress": False, **fit_kwargs}
    return ge, fit(ge, loader, epochs, optimizer, schedulers=[scheduler], resize_every=resize_every, **kwargs)


# --------------------------------------------------------------------------- the ranks' scenarios


def history(result: FitResult) -> list[tuple]:
    return [(r.loss, r.accuracy, r.train_flops, r.flops, r.params, r.test_accuracy) for r in result.history]


def scenario_ge(rank: int, out: Path) -> dict[str, Any]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ge, result = ge_run(lambda: Residual(4, 2), sharded(dataset(), 6), progress=True,
                            plot=out / f"plot-{rank}.png", checkpoint_dir=out / f"ge-{rank}",
                            test_data=sharded(dataset(16, seed=1), 8))
    return {"records": ge.records, "final": state_digest(result.model), "history": history(result),
            "printed": printed.getvalue(), "plot": (out / f"plot-{rank}.png").exists(),
            "checkpoint": (out / f"ge-{rank}" / "fit.ckpt").exists()}


def scenario_mlp(rank: int, out: Path) -> dict[str, Any]:
    ge, result = ge_run(ResidualMLP, sharded(dataset(), 6))
    return mlp_outcome(ge, result)


def mlp_outcome(ge: GrowEfficient, result: FitResult) -> dict[str, Any]:
    return {"masks": ge.masks(), "code": result.model.code, "state": result.model.state_dict(),
            "history": history(result)}


def scenario_other_model(rank: int, out: Path) -> dict[str, Any]:
    ge_run(lambda: Residual(4 if rank == 0 else 6, 2), sharded(dataset(), 6))
    return {}


def scenario_other_masks(rank: int, out: Path) -> dict[str, Any]:
    def switch_on(ge: GrowEfficient) -> None:
        with torch.no_grad():
            ge.gates()["stem"].weight[-1] = 1.0 if rank == 1 else -1.0
    ge_run(lambda: Residual(4, 2), sharded(dataset(), 6), prepare=switch_on)
    return {}


def scenario_no_sampler(rank: int, out: Path) -> dict[str, Any]:
    ge_run(lambda: Residual(4, 2), shuffled(dataset()))
    return {}


def scenario_dst(rank: int, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    dst = DST(Residual(4, 2), alpha=0.05, structured=True)
    optimizer = torch.optim.SGD(dst.model.parameters(), lr=0.05, momentum=0.9)
    result = fit(dst, sharded(dataset(), 6), 2, optimizer, progress=False)
    return {"thresholds": digest(*dst.thresholds().values()), "trained": state_digest(dst.model),
            "final": state_digest(result.model), "history": history(result)}


def scenario_resume(rank: int, out: Path) -> dict[str, Any]:
    run = lambda name, **kwargs: ge_run(lambda: Residual(4, 2), sharded(dataset(), 6),  # noqa: E731
                                        checkpoint_dir=out / f"{name}-{rank}", checkpoint_every=3, **kwargs)
    _, whole = run("whole")
    with contextlib.suppress(Stopped):
        run("cut", stop_at=5)
    _, resumed = run("cut", resume=True)
    return {"whole": state_digest(whole.model), "resumed": state_digest(resumed.model),
            "history": (history(whole), history(resumed)),
            "files": sorted(p.name for p in (out / f"cut-{rank}").glob("*"))}


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ge": scenario_ge, "mlp": scenario_mlp, "other model": scenario_other_model, "other masks": scenario_other_masks,
    "no sampler": scenario_no_sampler, "dst": scenario_dst, "resume": scenario_resume,
}


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One spawned rank: join the group that torchrun's environment variables describe, run every
    scenario, and save what each returned, or the exception it raised, to ``out/rank-<rank>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    setup(timeout=timedelta(seconds=60))
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank, Path(out))
        except Exception as e:  # recorded for the test to judge
            results[name] = {"raised": f"{type(e).__name__}: {e}"}
    torch.save(results, Path(out) / f"rank-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":  # the run that kills itself: python tests/training_runs.py CHECKPOINT_DIR STEP
    torch.set_num_threads(1)
    ge_run(lambda: Residual(4, 2), shuffled(dataset(40)), checkpoint_dir=sys.argv[1], stop_at=int(sys.argv[2]),
           kill=True, **KILL)
