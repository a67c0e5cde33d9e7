"""Resumable training: a run killed mid-training resumes to the same architecture and weights;
checkpoints are written atomically, and damaged or foreign ones raise CheckpointError untouched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.errors import CheckpointError
from fxprune.methods import DST, GrowEfficient, fit, resume
from training_runs import KILL, Recorded, Residual, dataset, ge_run, history, shuffled, state_digest

RUNS = Path(__file__).resolve().parent / "training_runs.py"


def kill_run(checkpoint_dir: Path | None, **kwargs):
    """The run that tests/training_runs.py kills (5 steps an epoch), here not killed."""
    return ge_run(lambda: Residual(4, 2), shuffled(dataset(40)), checkpoint_dir=checkpoint_dir, **{**KILL, **kwargs})


@pytest.fixture(scope="module")
def uninterrupted():
    """The run without a kill, and without checkpoints."""
    return kill_run(None)


# 5 steps an epoch, resized before steps 5 and 9, checkpoints after steps 3, 5 (the epoch's end), 6 and 9
@pytest.mark.parametrize("killed_at, saved_at", [
    (5, 3),  # after the first resize, which the checkpoint precedes: the resumed run resizes again
    (8, 6),  # in the second epoch, between the two resizes
])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, killed_at, saved_at):
    done = subprocess.run([sys.executable, str(RUNS), str(tmp_path), str(killed_at)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert len(resume.read(tmp_path / resume.FILE)["progress"]["history"]) == saved_at
    ge, result = kill_run(tmp_path, resume=True)
    whole_ge, whole = uninterrupted
    assert history(result) == history(whole)
    assert result.model.code == whole.model.code and state_digest(result.model) == state_digest(whole.model)
    assert ge.records["weights"] == whole_ge.records["weights"][saved_at:]  # the same steps, bit for bit
    assert ge.beta == whole_ge.beta


def test_a_finished_run_resumes_to_its_result_without_training(tmp_path, uninterrupted):
    kill_run(tmp_path)
    ge, result = kill_run(tmp_path, resume=True)
    assert ge.records["weights"] == [] and state_digest(result.model) == state_digest(uninterrupted[1].model)


def test_without_a_checkpoint_resume_starts_afresh(tmp_path, uninterrupted):
    _, result = kill_run(tmp_path / "new", resume=True)
    assert history(result) == history(uninterrupted[1]) and (tmp_path / "new" / resume.FILE).exists()
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        fit(torch.nn.Linear(64, 10), shuffled(dataset(40)), 1, torch.optim.SGD([torch.zeros(1)], lr=0.1), resume=True)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    kill_run(tmp_path, epochs=1, checkpoint_every=100)
    return tmp_path / resume.FILE


def damage(path: Path, at: int | None = None, cut: int | None = None) -> bytes:
    """Flip a byte at ``at`` or keep the first ``cut`` bytes; returns the damaged file's bytes."""
    data = bytearray(path.read_bytes())
    if at is not None:
        data[at] ^= 0xFF
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    return path.read_bytes()


@pytest.mark.parametrize("how, message", [
    (dict(at=-100), "do not match their checksum"),
    (dict(cut=2000), "do not match their checksum"),
    (dict(cut=10), "not an fxprune training checkpoint"),
    (dict(at=len(resume.MAGIC)), "format version"),
])
def test_a_damaged_checkpoint_raises_and_is_left_as_it_is(checkpoint, how, message):
    damaged = damage(checkpoint, **how)
    with pytest.raises(CheckpointError, match=message) as raised:
        kill_run(checkpoint.parent, resume=True)
    assert str(checkpoint) in str(raised.value) and checkpoint.read_bytes() == damaged


def test_a_foreign_file_raises(checkpoint):
    fxprune.save(fxprune.trace(Residual(4, 2), dataset(1).tensors[0]), checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="not an fxprune training checkpoint"):
        kill_run(checkpoint.parent, resume=True)
    assert checkpoint.read_bytes() == before


def test_a_checkpoint_of_another_kind_of_run_raises(checkpoint):
    before = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="another kind of run: setting 'target' 0.5 there, 0.3 here"):
        ge = Recorded(Residual(4, 2), dataset(1).tensors[0], target=0.3, epochs=2, lam=2.0)
        fit(ge, shuffled(dataset(40)), 2, torch.optim.SGD(ge.weights(), lr=0.1), checkpoint_dir=checkpoint.parent,
            resume=True, progress=False)
    with pytest.raises(CheckpointError, match="method 'Recorded' there, 'DST' here"):
        dst = DST(Residual(4, 2))
        fit(dst, shuffled(dataset(40)), 2, torch.optim.SGD(dst.model.parameters(), lr=0.1),
            checkpoint_dir=checkpoint.parent, resume=True, progress=False)
    assert checkpoint.read_bytes() == before


def test_a_failed_write_leaves_the_previous_checkpoint(checkpoint, monkeypatch):
    before = checkpoint.read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        resume.write(checkpoint, {"progress": {}})
    assert checkpoint.read_bytes() == before and sorted(p.name for p in checkpoint.parent.iterdir()) == [resume.FILE]
    assert resume.read(checkpoint)["progress"]["history"]  # still the previous, whole checkpoint


def test_grow_efficient_state_round_trips_through_a_file(tmp_path):
    ge, _ = kill_run(None, epochs=1)
    state = ge.state_dict()
    fxprune.save(state["base"], tmp_path / "base.fxp")  # the physical model, without its code
    state["base"] = fxprune.load(tmp_path / "base.fxp")
    torch.manual_seed(1)  # other initial weights: all come from the state
    other = GrowEfficient(Residual(4, 2), dataset(1).tensors[0], target=0.5, epochs=2, lam=2.0, round_to=1)
    other.load_state_dict(state)
    assert list(other.gates()) == list(ge.gates()) and other.beta == ge.beta
    assert {k: torch.as_tensor(v).tolist() for k, v in other.masks().items()} == \
        {k: torch.as_tensor(v).tolist() for k, v in ge.masks().items()}
    x = dataset(8).tensors[0]
    assert torch.equal(other.model.eval()(x), ge.model.eval()(x))
    for mine, theirs in zip(other.logits_parameters(), ge.logits_parameters()):
        assert torch.equal(other.gate_optimizer.state[mine]["momentum_buffer"],
                           ge.gate_optimizer.state[theirs]["momentum_buffer"])
