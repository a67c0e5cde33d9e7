"""The character-level LSTM example at tiny settings: exact compaction of pruned hidden units."""
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

import fxprune
from fxprune import data

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))  # as when run as a script: the examples import examples/common.py
_spec = importlib.util.spec_from_file_location("fxprune_char_lstm", _EXAMPLES / "char_lstm.py")
char_lstm = sys.modules["fxprune_char_lstm"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_lstm)


def test_run_is_exact_and_smaller():
    corpus = data.char_corpus(seq_len=50, max_chars=20_000)
    r = char_lstm.run(corpus, hidden=32, embed=16, steps=300, batch_size=16, lr=1e-2, keep=0.5, finetune=20,
                      timing_repeats=1, log=lambda s: None)
    assert r.max_abs_diff < 1e-4 and r.error < char_lstm.TOLERANCE
    assert set(r.masks) == {"lstm.hidden_l0", "lstm.hidden_l1"}
    assert char_lstm.lstm_hidden_sizes(r.model) == [32]
    assert char_lstm.lstm_hidden_sizes(r.compact) == [16]
    before, after = r.cost_before, r.cost_after
    assert after.params < before.params / 2 and after.flops < before.flops / 2
    assert sum(p.numel() for p in r.compact.parameters()) == after.params
    assert all(math.isfinite(p) for p in r.perplexity.values())
    vocab = len(corpus.vocab)
    assert r.perplexity["original"] < vocab / 2 and r.perplexity["fine-tuned"] < vocab / 2  # uniform: vocab
    assert r.headers[0] == "" and len(r.headers) == 5 and len(r.rows) == 5
    assert r.rows[0][0] == "validation perplexity" and r.rows[1][0] == "parameters"


def test_single_shot_chooses_units_before_training():
    corpus = data.char_corpus(seq_len=50, max_chars=20_000)
    r = char_lstm.run(corpus, hidden=32, embed=16, steps=150, batch_size=16, lr=1e-2, keep=0.5, finetune=20,
                      timing_repeats=1, method="single-shot", log=lambda s: None)
    assert r.error < char_lstm.TOLERANCE  # compact = apply_masks, checked on the untrained model
    assert set(r.masks) <= {"embed", "lstm.hidden_l0", "lstm.hidden_l1"}
    assert any(not m.all() for m in r.masks.values())
    before, after = r.cost_before, r.cost_after
    assert after.flops <= 0.5 * before.flops
    assert sum(p.numel() for p in r.compact.parameters()) == after.params
    assert set(r.perplexity) == {"original", "compact"}  # trained from scratch, not fine-tuned
    assert r.perplexity["compact"] < len(corpus.vocab) / 2  # it learned: uniform is the vocabulary size
    assert len(r.headers) == 4 and len(r.rows) == 5


def _gate_norms(lstm: nn.LSTM, layer: int) -> torch.Tensor:
    h = lstm.hidden_size
    w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
    return torch.cat([w_ih.view(4, h, -1), w_hh.view(4, h, -1)], dim=2).detach().pow(2).sum(dim=(0, 2)).sqrt()


def test_lstm_masks_follow_gate_weight_norms():
    torch.manual_seed(0)
    model = char_lstm.CharLSTM(vocab=12, embed=4, hidden=8).eval()
    analysis = fxprune.analyze(model, torch.randint(0, 12, (1, 5)))
    for layer in range(2):
        group = analysis.group(f"lstm.hidden_l{layer}")
        scores = char_lstm.hidden_unit_scores(group, model.lstm, "lstm", layer)
        torch.testing.assert_close(scores, _gate_norms(model.lstm, layer))

    masks = char_lstm.lstm_masks(analysis, model, keep=0.25)
    assert set(masks) == {"lstm.hidden_l0", "lstm.hidden_l1"}
    for layer in range(2):
        mask = masks[f"lstm.hidden_l{layer}"]
        assert mask.sum() == 2 and mask[_gate_norms(model.lstm, layer).topk(2).indices].all()
    assert all(int(m.sum()) == 1 for m in char_lstm.lstm_masks(analysis, model, keep=0.01).values())
