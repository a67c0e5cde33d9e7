"""What the benchmark scripts write about a run: machine, code version, command, and their doc section.

Shared by ``compact_speed.py`` and ``torchvision_coverage.py``, which import it as a sibling module
(``from report import ...``: a script run as ``python benchmarks/<script>.py`` has its own folder on
``sys.path``).
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_HEADER = ("# Benchmarks\n\nMeasurements of fxprune's own cost. Each section names the command that "
              "produced it and the machine it ran on; rerun the command to refresh the section.\n")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor() where that is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS does not give them."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine(extra: Sequence[str], torch_note: str = "", tail: Sequence[str] = ()) -> str:
    """'CPU, cores, torch version + torch_note, *extra, Python, OS, *tail', comma-separated."""
    import torch

    return ", ".join([cpu_model(), f"{os.cpu_count()} logical cores", f"torch {torch.__version__}{torch_note}",
                      *extra, f"Python {platform.python_version()}", f"{platform.system()} {platform.release()}",
                      *tail])


def code_version() -> str:
    """fxprune's commit, and whether the working tree had uncommitted changes to it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxprune", "passes"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "fxprune (not a git checkout)"
    return f"fxprune at commit {head}" + (" plus uncommitted changes" if dirty else "")


def command(script: str | Path) -> str:
    """The command line that ran ``script`` with this process's arguments, relative to the repo root."""
    return "python " + shlex.join([os.path.relpath(Path(script).resolve(), ROOT), *sys.argv[1:]])


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the ``heading`` section of the markdown file ``path`` (up to the next '## ') by ``text``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip() + "\n\n", doc, count=1).rstrip() + "\n"
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(doc)
