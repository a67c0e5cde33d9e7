#!/usr/bin/env python
"""What fxprune finds and removes in attention and recurrent models.

For torchvision's vit_b_16 and swin_t (``weights=None``, constant parameters redrawn by
``fxprune.zoo.randomize_constants``, input 1x3x224x224) and for a character LSTM language model
(embedding 64, two LSTM layers of 256 units, vocabulary 103, input 1x100 tokens; untrained):

1. ``fxprune.analyze``: the groups by kind (attention heads, feed-forward or hidden units, residual
   stream, ...) and whether they are prunable, exactly prunable only with ``exact=False``, or blocked;
2. ``fxprune.compact`` keeping every other unit of every prunable group: FLOPs, parameters, and the
   largest difference from ``apply_masks``;
3. the same plus the groups that are only approximately prunable (``compact(..., exact=False)``):
   the deviation that ``compact`` reports.

    python benchmarks/sequence_models.py            # writes its section of docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from report import ROOT, code_version, command, machine, write_section

SECTION = "## Attention and recurrent models"


class CharLSTM(nn.Module):
    """Embedding -> two-layer LSTM -> linear read-out, as in examples/char_lstm.py."""

    def __init__(self, vocab: int = 103, embed: int = 64, hidden: int = 256):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(vocab, embed), nn.LSTM(embed, hidden, 2, batch_first=True), nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    from fxprune.zoo import randomize_constants, torchvision_models

    tv = torchvision_models()
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    return {
        "vit_b_16": (randomize_constants(tv.vit_b_16()).eval(), image),
        "swin_t": (randomize_constants(tv.swin_t()).eval(), image),
        "char LSTM": (CharLSTM().eval(), torch.randint(0, 103, (1, 100))),
    }


def kind(name: str) -> str:
    """A group's kind, from its name."""
    for pattern, label in ((r"\.heads$", "attention heads"), (r"mlp\.0$", "MLP hidden units"),
                           (r"\.hidden_l\d+", "LSTM hidden units"), (r"\.qkv\.bias$", "q/k/v rows")):
        if re.search(pattern, name):
            return label
    return name


def state(group) -> str:
    return "prunable" if group.prunable else "exact=False only" if not group.blocked else "blocked"


def measure(name: str, model: nn.Module, x: torch.Tensor) -> dict:
    import fxprune

    start = time.process_time()
    analysis = fxprune.analyze(model, x)
    seconds = time.process_time() - start
    counts = Counter((kind(g.name), g.size, state(g)) for g in analysis.groups)
    groups = "; ".join(f"{n}× {k} ({size}, {s})" if n > 1 else f"{k} ({size}, {s})" for (k, size, s), n in counts.items())
    every_other = lambda groups: {g.name: torch.arange(g.size) % 2 == 0 for g in groups}  # noqa: E731
    exact_masks = every_other(g for g in analysis.groups if g.prunable)
    small = fxprune.compact(model, exact_masks, x, analysis=analysis)
    with torch.no_grad():
        error = float((small(x) - fxprune.apply_masks(model, exact_masks, x, analysis=analysis)(x)).abs().max())
    approximate = every_other(g for g in analysis.groups if not g.blocked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loose = fxprune.compact(model, approximate, x, analysis=analysis, exact=False)
    dense, exact_cost, loose_cost = fxprune.cost(model, x), fxprune.cost(small, x), fxprune.cost(loose, x)
    return {"model": name, "groups": groups, "analyze s": f"{seconds:.2f}", "dense": str(dense),
            "exact, every other unit": f"{exact_cost} (max error {error:.1e})",
            "with exact=False": f"{loose_cost} (deviation {loose.meta.get('fxprune_deviation', 0.0):.2g})"
            if len(approximate) > len(exact_masks) else "–"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(name, model, x) for name, (model, x) in models().items()]
    table = tabulate(rows, headers="keys", tablefmt="github")
    print(table)
    if not args.no_doc:
        text = "\n".join([
            SECTION, "", f"Command: `{command(__file__)}`", "", f"Machine: {machine([], ' (1 thread)')}.", "",
            f"Code: {code_version()}.", "", __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(), "",
            "Groups: count × kind (units, state); \"exact=False only\" groups are normalised by a LayerNorm. "
            "FLOPs by `fxprune.cost`; errors are the largest absolute output difference from `apply_masks`.", "",
            table, "",
        ])
        write_section(args.doc, SECTION, text)
        print(f"wrote section '{SECTION}' of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
