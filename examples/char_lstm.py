"""Train a character-level LSTM language model, prune its hidden units by magnitude, and compact it.

The model (embedding, two-layer LSTM, linear read-out) learns the English text bundled with
CPython (the pydoc help topics) or any UTF-8 text file. Each LSTM layer's hidden units are
scored by the norm of their gate weights and the weakest are removed; the compact model is
checked against fxprune's reference semantics (``apply_masks``) on the whole validation
split, then compared with the original for perplexity, size, FLOPs and CPU latency.

With ``--method single-shot`` the units (hidden units and embedding dims) are chosen before any
training instead, by SingleShot's loss sensitivity per FLOP on one batch, until the model keeps
the fraction ``--keep`` of its FLOPs; the compact model is then trained from scratch for as many
steps as the original.

    python examples/char_lstm.py                          # pydoc topics, keep half the units
    python examples/char_lstm.py --keep 0.25 --finetune 0
    python examples/char_lstm.py --method single-shot     # half the FLOPs, chosen at initialisation
    python examples/char_lstm.py --text my_book.txt --steps 3000
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import fxprune
from fxprune import data
from fxprune.methods import SingleShot

from common import TOLERANCE, finish, latencies, ms, parse, pruning_arguments, ratio, seed_everything, table  # examples/common.py

Masks = dict[str, torch.Tensor]
METHODS = ("magnitude", "single-shot")


# --------------------------------------------------------------------------- model


class CharLSTM(nn.Module):
    """Embedding -> ``layers``-layer LSTM -> linear read-out: (N, T) int64 -> (N, T, vocab) logits."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 256, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.embed(x))
        return self.head(y)


# --------------------------------------------------------------------------- training and evaluation


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``(N, T, vocab)`` logits against ``(N, T)`` next characters, over all positions."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def _batches(dataset: TensorDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of ``dataset``, epoch after epoch, forever."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size)
    while True:
        yield from loader


def train(model: nn.Module, dataset: TensorDataset, steps: int, lr: float = 3e-3, batch_size: int = 32,
          clip: float = 1.0, desc: str = "train") -> nn.Module:
    """Train ``model`` in place for ``steps`` batches: Adam, next-character cross-entropy over all
    positions, cosine learning-rate decay, gradient-norm clipping at ``clip``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    model.train()
    batches = _batches(dataset, batch_size)
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stdout, leave=True, dynamic_ncols=True)
    running = None
    for step in bar:
        x, y = next(batches)
        loss = next_char_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.3f}")
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """``exp`` of the mean next-character cross-entropy of ``model`` (in eval mode) over ``dataset``."""
    model.eval()
    total, count = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        total += next_char_loss(model(x), y, reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def max_differences(reference: nn.Module, model: nn.Module, dataset: TensorDataset,
                    batch_size: int = 256) -> tuple[float, float]:
    """``max |reference - model|`` over the logits on ``dataset``, absolute and relative to the
    largest reference logit."""
    reference.eval()
    model.eval()
    diff, scale = 0.0, 0.0
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        ref = reference(x)
        diff = max(diff, (ref - model(x)).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return diff, diff / max(scale, 1e-12)


@torch.no_grad()
def sample(model: nn.Module, corpus: data.CharCorpus, prompt: str, length: int = 200,
           temperature: float = 0.7, context: int = 100, seed: int = 0) -> str:
    """``prompt`` continued by ``length`` characters drawn from ``model`` (re-reading at most the
    last ``context`` characters at each step, so it works on any traced model)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = corpus.encode(prompt).tolist()
    for _ in range(length):
        logits = model(torch.tensor([ids[-context:]]))[0, -1]
        ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)))
    return corpus.decode(ids)


# --------------------------------------------------------------------------- pruning


def hidden_unit_scores(group: fxprune.ChannelGroup, lstm: nn.LSTM, prefix: str, layer: int) -> torch.Tensor:
    """Score each unit of ``group`` (the hidden units of LSTM layer ``layer``) by the L2 norm of its
    gate weights: rows h, H+h, 2H+h, 3H+h (the i, f, g, o gates) of ``weight_ih_l{layer}`` and
    ``weight_hh_l{layer}``.

    Rows are mapped to the group's units through the group's members, so the scores follow
    whatever unit order the analysis chose.
    """
    weights = {f"{prefix}.{w}_l{layer}": getattr(lstm, f"{w}_l{layer}").detach() for w in ("weight_ih", "weight_hh")}
    squares = torch.zeros(group.size)
    covered = torch.zeros(group.size, dtype=torch.bool)
    for m in group.members:
        if m.kind == "param" and m.dim == 0 and m.name in weights:
            rows = weights[m.name][m.index]
            squares.index_add_(0, m.unit, rows.pow(2).sum(dim=1))
            covered[m.unit] = True
    if not covered.all():
        raise ValueError(f"group {group.name!r} lists no gate rows of {sorted(weights)} for some units")
    return squares.sqrt()


def lstm_masks(analysis: fxprune.Analysis, model: nn.Module, keep: float) -> Masks:
    """For every layer of every ``nn.LSTM`` in ``model``, keep the ``keep`` fraction (at least one) of
    its hidden units with the largest :func:`hidden_unit_scores`; the group of layer ``l`` of the
    LSTM at ``name`` is ``analysis.group(f"{name}.hidden_l{l}")``."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    masks = {}
    for name, lstm in model.named_modules():
        if not isinstance(lstm, nn.LSTM):
            continue
        for layer in range(lstm.num_layers):
            try:
                group = analysis.group(f"{name}.hidden_l{layer}")
            except KeyError:
                raise ValueError(f"the analysis has no group {name}.hidden_l{layer}: this fxprune has no "
                                 f"channel rule for nn.LSTM") from None
            if not group.prunable:
                raise ValueError(f"group {group.name!r} is not prunable: {group.reason}")
            n = max(1, round(keep * group.size))
            mask = torch.zeros(group.size, dtype=torch.bool)
            mask[hidden_unit_scores(group, lstm, name, layer).topk(n).indices] = True
            masks[group.name] = mask
    if not masks:
        raise ValueError("the model has no nn.LSTM")
    return masks


def single_shot(model: nn.Module, corpus: data.CharCorpus, batch_size: int, keep: float) -> tuple[SingleShot, Masks]:
    """SingleShot for ``model`` (untrained) and its masks, from one batch of training sequences: the
    units of every prunable group (the embedding dims and each LSTM layer's hidden units) with the
    lowest loss sensitivity per FLOP go until the model keeps the fraction ``keep`` of its FLOPs."""
    ss = SingleShot(model, corpus.val.tensors[0][:1])
    return ss, ss.masks(next(_batches(corpus.train, batch_size)), next_char_loss, target=keep, metric="flops")


# --------------------------------------------------------------------------- measurement


def lstm_hidden_sizes(model: nn.Module) -> list[int]:
    """``hidden_size`` of every ``nn.LSTM`` in ``model``."""
    return [m.hidden_size for m in model.modules() if isinstance(m, nn.LSTM)]


# --------------------------------------------------------------------------- main


@dataclass
class Result:
    """What :func:`run` produced."""

    model: CharLSTM
    compact: nn.Module
    analysis: fxprune.Analysis
    masks: Masks
    max_abs_diff: float  # max |apply_masks - compact| over the validation logits
    error: float  # the same, relative to the largest |apply_masks| logit
    cost_before: fxprune.Cost
    cost_after: fxprune.Cost
    perplexity: dict[str, float]  # "original", "compact" and (with fine-tuning) "fine-tuned"
    rows: list[list[str]]
    headers: list[str]


def run(corpus: data.CharCorpus, hidden: int = 256, embed: int = 64, layers: int = 2, dropout: float = 0.0,
        steps: int = 500, batch_size: int = 32, lr: float = 5e-3, keep: float = 0.5, finetune: int = 100,
        seed: int = 0, timing_repeats: int = 20, method: str = "magnitude",
        log: Callable[[str], None] = print) -> Result:
    """Train, prune, compact, check exactness, optionally fine-tune the compact model, and compare
    before/after. ``method="magnitude"`` prunes the trained model's LSTM hidden units by
    :func:`lstm_masks` (``keep``: the fraction of each layer's units); ``"single-shot"`` chooses units
    in the untrained model by :func:`single_shot` (``keep``: the fraction of FLOPs) and trains the
    compact model, re-initialised, for ``steps`` (``finetune`` is then not used)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    seed_everything(seed)
    model = CharLSTM(len(corpus.vocab), embed, hidden, layers, dropout)
    initial = copy.deepcopy(model) if method == "single-shot" else None
    val_x = corpus.val.tensors[0]
    x_example = val_x[:1]
    log(f"corpus: {len(corpus.train)} train / {len(corpus.val)} validation sequences of "
        f"{val_x.shape[1]} characters, vocabulary of {len(corpus.vocab)}")
    train(model, corpus.train, steps, lr, batch_size)

    if method == "magnitude":
        analysis = fxprune.analyze(model, x_example)
        masks = lstm_masks(analysis, model, keep)
        reference = fxprune.apply_masks(model, masks, x_example, analysis=analysis).eval()
        small = fxprune.compact(model, masks, x_example, analysis=analysis).eval()
    else:
        ss, masks = single_shot(initial, corpus, batch_size, keep)
        analysis = ss.analysis
        reference = fxprune.apply_masks(initial, masks, x_example, analysis=analysis).eval()
        small = ss.compact(masks).eval()
    log("\nchannel groups:\n" + str(analysis) + "\n")

    max_abs_diff, error = max_differences(reference, small, corpus.val)
    log(f"exactness: max |apply_masks - compact| = {max_abs_diff:.2e} ({error:.2e} of the largest logit) "
        f"on {len(corpus.val)} validation sequences (tolerance {TOLERANCE:.0e} relative)"
        + (", at initialisation" if method == "single-shot" else ""))
    if method == "single-shot":
        small = train(ss.compact(masks, reinit=True), corpus.train, steps, lr, batch_size,
                      desc="train compact from scratch")
        finetune = 0  # it trained as long as the original: nothing to fine-tune

    ppl = {"original": perplexity(model, corpus.val), "compact": perplexity(small, corpus.val)}
    cost_before, cost_after = fxprune.cost(model, x_example), fxprune.cost(small, x_example)
    x_batch = val_x[:64]
    lat1 = latencies([model, small], x_example, timing_repeats)
    lat_batch = latencies([model, small], x_batch, max(3, timing_repeats // 4))
    if finetune > 0:
        train(small, corpus.train, finetune, lr / 3, batch_size, desc="fine-tune compact")
        ppl["fine-tuned"] = perplexity(small, corpus.val)

    seq = f"{val_x.shape[1]} characters"
    rows = [
        ["validation perplexity", f"{ppl['original']:.3f}", f"{ppl['compact']:.3f}", ""],
        ["parameters", f"{cost_before.params:,}", f"{cost_after.params:,}", ratio(cost_before.params, cost_after.params)],
        [f"FLOPs (1 x {seq})", f"{cost_before.flops:,}", f"{cost_after.flops:,}", ratio(cost_before.flops, cost_after.flops)],
        [f"CPU latency, 1 x {seq}", ms(lat1[0]), ms(lat1[1]), ratio(*lat1)],
        [f"CPU latency, {len(x_batch)} x {seq}", ms(lat_batch[0]), ms(lat_batch[1]), ratio(*lat_batch)],
    ]
    headers = ["", "original", "compact", "ratio"]
    if finetune > 0:  # fine-tuning changes the weights, not the architecture: only perplexity moves
        headers.insert(3, f"compact, fine-tuned ({finetune} steps)")
        for row in rows:
            row.insert(3, f"{ppl['fine-tuned']:.3f}" if row is rows[0] else row[2])
    return Result(model, small, analysis, masks, max_abs_diff, error, cost_before, cost_after, ppl, rows, headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", metavar="PATH", help="a UTF-8 text file to learn (default: the pydoc topics)")
    parser.add_argument("--max-chars", type=int, help="use only the first MAX_CHARS characters of the text")
    parser.add_argument("--seq-len", type=int, default=100, help="characters per training sequence (default 100)")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden units per layer (default 256)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout between the LSTM layers (default 0)")
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per training step (default 32)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3; fine-tuning uses a third)")
    parser.add_argument("--method", choices=METHODS, default="magnitude",
                        help="magnitude: prune the trained model; single-shot: choose units before training")
    pruning_arguments(parser, "magnitude: fraction of each LSTM layer's hidden units to keep; "
                              "single-shot: fraction of the FLOPs to keep")
    parser.add_argument("--finetune", type=int, default=100,
                        help="steps to fine-tune the compact model (0: none; magnitude only)")
    parser.add_argument("--sample", type=int, default=200, help="characters of generated text to show (0: none)")
    args = parse(parser, argv)

    start = time.perf_counter()
    corpus = data.char_corpus(path=args.text, seq_len=args.seq_len, max_chars=args.max_chars)
    result = run(corpus, hidden=args.hidden, dropout=args.dropout, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, keep=args.keep, finetune=args.finetune, seed=args.seed, method=args.method)
    kept = {name: f"{int(m.sum())}/{len(m)}" for name, m in result.masks.items()}
    how = ("LSTM hidden units by gate-weight magnitude" if args.method == "magnitude"
           else f"units by SingleShot before training, then trained the compact model for {args.steps} steps")
    print(f"\npruned {how}, kept {kept} (--keep {args.keep}); {torch.get_num_threads()} CPU threads\n")
    print(table(result.rows, result.headers))
    if args.sample > 0:
        prompt = "The " if set("The ") <= set(corpus.vocab) else corpus.decode(corpus.val.tensors[0][0, :1])
        pruned = "compact, fine-tuned" if "fine-tuned" in result.perplexity else "compact"
        for name, model in [("original", result.model), (pruned, result.compact)]:
            print(f"\nsample from the {name} model:\n"
                  + sample(model, corpus, prompt, args.sample, context=args.seq_len, seed=args.seed))
    return finish(start, result.error)


if __name__ == "__main__":
    sys.exit(main())
