"""Contractions: einsum, matmul, bmm: out[o] <- sum over the contracted indices of a[..] * b[..].

Each index letter that two operands share (a batch index such as an attention head, or a
contracted one) must keep the same positions in both, so their labels are coupled position by
position, as in broadcasting arithmetic. A contracted letter's channels leave the output: removing
one drops terms that are zero in the masked model (unless every operand may be non-zero there).
Where an output position is made of several units along a contracted letter (q k^T of attention:
head h's entries of every head dim), they merge into one: that position exists until all of them
are removed, so q, k and v of a head become one unit.
"""
from __future__ import annotations

import operator
import string

import torch

from ..labels import NONE, compress
from .registry import RuleContext, rule


def contract(ctx: RuleContext, operands: list[tuple[torch.Tensor, str, object]], out: str,
             shape: torch.Size | None = None) -> torch.Tensor:
    """Labels of a contraction of ``operands`` (labels, one letter per dim, their graph argument)
    into the letters ``out``, of ``shape`` (default: the node's output)."""
    letters = list(dict.fromkeys(c for _, lets, _ in operands for c in lets))
    joint = []
    for labels, lets, _ in operands:  # every operand over all letters (size 1 where it lacks one)
        present = [c for c in letters if c in lets]
        small = compress(labels).permute(*[lets.index(c) for c in present])
        joint.append(small.reshape([small.shape[present.index(c)] if c in lets else 1 for c in letters]))
    full = torch.broadcast_shapes(*(t.shape for t in joint))
    joint = [t.expand(full) for t in joint]
    _block_unsliceable(ctx, joint, [lets for _, lets, _ in operands], letters)
    for t in joint[1:]:
        ctx.space.union(joint[0], t)
    combined = joint[0]
    for t in joint[1:]:
        combined = torch.where(combined >= 0, combined, t)
    kept = [letters.index(c) for c in out]
    summed = [i for i, c in enumerate(letters) if c not in out]
    small = compress(combined).permute(*kept, *summed)
    rows = small.reshape(small.shape[:len(kept)].numel(), -1)
    if rows.shape[1] == 1:
        merged = rows[:, 0]
    elif small.shape[:len(kept)].numel() > 1:  # an output position made of several units: one unit
        merged = torch.tensor([ctx.space.union_all(row) for row in rows], dtype=torch.long)
    else:  # the contracted channels leave the output
        if all(ctx.input_tainted(arg) for _, _, arg in operands):
            ctx.space.mark_inexact(combined, f"{ctx.where} sums over channels that may be non-zero when masked")
        merged = torch.full((rows.shape[0],), NONE, dtype=torch.long)
    return merged.reshape(small.shape[:len(kept)]).expand(shape or ctx.out_shape())


def _block_unsliceable(ctx: RuleContext, joint: list[torch.Tensor], lets: list[str], letters: list[str]) -> None:
    """Channels along a shared letter meet an operand without channels there, which cannot lose them."""
    for i, a in enumerate(joint):
        for j, b in enumerate(joint):
            shared = [letters.index(c) for c in lets[i] if c in lets[j]]
            if i != j and any(compress(a).shape[d] > 1 for d in shared) and bool((compress(b) < 0).any()):
                ctx.space.block(a, f"{ctx.where} contracts channels with a tensor that has none there")


def einsum_letters(equation: str, dims: list[int]) -> tuple[list[str], str]:
    """The letters of each operand and of the output, with '...' spelled out."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    free = [c for c in string.ascii_letters if c not in equation]
    ellipsis = max((d - len(t.replace("...", "")) for t, d in zip(terms, dims) if "..." in t), default=0)
    spelled = "".join(free[:ellipsis])
    terms = [t.replace("...", spelled[len(spelled) - (d - len(t.replace("...", ""))):]) for t, d in zip(terms, dims)]
    if not arrow:
        counts = {c: "".join(terms).count(c) for c in "".join(terms)}
        output = spelled + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in spelled))
    return terms, output.replace("...", spelled)


@rule(torch.einsum)
def einsum(ctx: RuleContext, equation: str, *operands) -> torch.Tensor:
    args = ctx.node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands, args = operands[0], ctx.node.args[1]
    terms, output = einsum_letters(equation, [t.dim() for t in operands])
    return contract(ctx, list(zip(operands, terms, args)), output)


@rule(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", torch.mm, "mm")
def matmul(ctx: RuleContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # out[.., n, m] <- sum_k a[.., n, k] b[.., k, m]
    batch = string.ascii_lowercase[:max(a.dim(), b.dim(), 2) - 2]
    a_lets = "k" if a.dim() == 1 else batch[len(batch) - (a.dim() - 2):] + "yk"
    b_lets = "k" if b.dim() == 1 else batch[len(batch) - (b.dim() - 2):] + "kz"
    out = batch + ("y" if a.dim() > 1 else "") + ("z" if b.dim() > 1 else "")
    return contract(ctx, [(a, a_lets, ctx.node.args[0]), (b, b_lets, ctx.node.args[1])], out)
