"""fit on two ranks (torch.distributed, gloo on 127.0.0.1): synchronised gates, resizes and metrics.

One spawned session of two ranks runs every scenario of tests/training_runs.py (tiny models, a
few steps each) and saves what each returned; the tests compare the ranks' records, and the
two-rank run with one process training on the global batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fxprune
import training_runs
from fxprune.methods.train import TRAIN_FLOPS_PER_FORWARD
from training_runs import ResidualMLP, dataset, ge_run, mlp_outcome, sharded

RANKS = 2
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(training_runs.rank_main, args=(RANKS, free_port(), str(out)), nprocs=RANKS,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 300 s")
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(RANKS)]


def outcome(ranks: list[dict], scenario: str) -> list[dict]:
    results = [r[scenario] for r in ranks]
    assert not any("raised" in r for r in results), [r.get("raised") for r in results]
    return results


def test_every_rank_trains_the_same_weights_gates_and_architectures(ranks):
    first, second = outcome(ranks, "ge")
    records = first["records"]
    assert len(records["weights"]) == 8  # 4 steps an epoch
    assert len(records["resize"]) == 3  # before fit, then twice in it
    for kind in ("weights", "gradients", "resize"):  # gradients: all-reduced into the current buckets
        assert records[kind] == second["records"][kind], kind
    assert len(set(records["resize"])) == 3  # each resize changed the architecture or the weights
    assert first["final"] == second["final"]
    assert {r[4] for r in first["history"]} != {first["history"][0][4]}  # the parameter count moved


def test_every_rank_draws_the_same_gate_sample(ranks):
    first, second = outcome(ranks, "ge")
    assert first["records"]["sample"] == second["records"]["sample"]
    assert len(set(first["records"]["sample"])) > 1  # a new sample (or new weights) at each step


def test_metrics_are_reduced_and_only_rank_zero_prints_plots_and_checkpoints(ranks):
    first, second = outcome(ranks, "ge")
    assert first["history"] == second["history"]  # the ranks' batches differ: these are reduced
    assert [r[5] is not None for r in first["history"]] == [False, False, False, True] * 2  # tested each epoch
    assert "epoch 2/2: test accuracy" in first["printed"] and second["printed"] == ""
    assert (first["plot"], second["plot"]) == (True, False)
    assert (first["checkpoint"], second["checkpoint"]) == (True, False)
    torch.manual_seed(0)
    x = dataset().tensors[0][:1]
    ge = training_runs.Recorded(training_runs.Residual(4, 2), x, target=0.5, epochs=2, lam=2.0, round_to=1)
    ge.resize()  # the physical model of the first step
    assert first["history"][0][2] == TRAIN_FLOPS_PER_FORWARD * fxprune.cost(ge.base, x).flops * 2 * 6  # both ranks


def test_two_ranks_train_like_one_process_on_the_global_batch(ranks):
    """Without BatchNorm, two ranks with 6 samples each equal one process with their 12."""
    torch.manual_seed(0)
    ge, result = ge_run(ResidualMLP, sharded(dataset(), 12, num_replicas=1, rank=0))
    alone = mlp_outcome(ge, result)
    for rank in outcome(ranks, "mlp"):
        assert rank["code"] == alone["code"]
        assert {k: torch.as_tensor(v).tolist() for k, v in rank["masks"].items()} == \
            {k: torch.as_tensor(v).tolist() for k, v in alone["masks"].items()}
        for name, t in alone["state"].items():
            torch.testing.assert_close(rank["state"][name], t, rtol=1e-4, atol=1e-5, msg=name)
        assert [r[0] for r in rank["history"]] == pytest.approx([r[0] for r in alone["history"]], rel=1e-4)


@pytest.mark.parametrize("scenario, names", [
    ("other model", "rank 1 disagrees with rank 0 on parameter 'stem.weight': (3, 1, 3, 3) torch.float32 on rank 1, "
                    "(2, 1, 3, 3) torch.float32 on rank 0"),
    ("other masks", "rank 1 disagrees with rank 0 on mask 'stem'"),
    ("no sampler", "samples with a RandomSampler"),
])
def test_ranks_that_disagree_raise_on_every_rank(ranks, scenario, names):
    for r in ranks:
        raised = r[scenario].get("raised", "")
        assert raised.startswith("DistributedError: the ranks of this run do not agree") and names in raised, raised


def test_dst_thresholds_stay_synchronised(ranks):
    first, second = outcome(ranks, "dst")
    assert first == second


def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(ranks):
    first, second = outcome(ranks, "resume")
    assert first["whole"] == first["resumed"] == second["whole"] == second["resumed"]
    assert first["history"][0] == first["history"][1]  # seconds aside, the same records
    assert first["files"] == ["fit.ckpt"] and second["files"] == []  # rank 1 read rank 0's checkpoint


def test_the_example_runs_under_torchrun(tmp_path):
    """examples/distributed.py as the README launches it, on two ranks."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(EXAMPLE), "--epochs", "1",
                           "--samples", "400", "--quiet", "--checkpoint-dir", str(tmp_path), "--summary",
                           str(tmp_path / "summary.json")],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("2 rank(s): 2 steps") == 1, done.stdout  # printed by rank 0 only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == RANKS and summary["steps"] == 2 and summary["flops"] > 0
    assert (tmp_path / "fit.ckpt").exists()
