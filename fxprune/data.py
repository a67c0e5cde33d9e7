"""Small classification datasets as ``(train, test)`` TensorDatasets; nothing is downloaded.

Inputs are float32, labels int64. Splits are deterministic. Where ``normalize`` is
offered, each channel is standardized with the training split's mean and std.

For language models, :func:`char_corpus` turns any text (by default :func:`python_docs_text`,
the English documentation bundled with CPython) into next-character sequences.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["CharCorpus", "char_corpus", "cifar10", "digits", "image_folder", "mnist1d", "python_docs_text"]

Split = tuple[TensorDataset, TensorDataset]


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, train.dim())]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def _random_split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, normalize: bool
) -> Split:
    n_test = round(len(x) * test_fraction)
    if not 0 < n_test < len(x):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split of {len(x)} samples")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = x[train], x[test]
    if normalize:
        x_train, x_test = _standardize(x_train, x_test)
    return TensorDataset(x_train, y[train]), TensorDataset(x_test, y[test])


def digits(test_fraction: float = 0.2, seed: int = 0, normalize: bool = True, size: int = 8) -> Split:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as ``(N, 1, size, size)``
    (``size`` other than 8: resized bilinearly; 32 makes them CIFAR-sized)."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("digits() needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _random_split(x, y, test_fraction, seed, normalize)


def mnist1d(**overrides: Any) -> Split:
    """MNIST-1D generated offline as ``(N, 1, 40)`` signals, 10 classes.

    Uses ``mnist1d.data.make_dataset`` with its default arguments (4000 train and
    1000 test samples, seed 42), already standardized; keyword arguments override
    fields of ``mnist1d.data.get_dataset_args()``, e.g. ``num_samples=1000``.
    Python's and NumPy's global random states are left as they were.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("mnist1d() needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args()
    unknown = overrides.keys() - vars(args).keys()
    if unknown:
        raise TypeError(f"unknown mnist1d dataset arguments: {sorted(unknown)}")
    vars(args).update(overrides)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.int64)
        )

    return as_dataset(data["x"], data["y"]), as_dataset(data["x_test"], data["y_test"])


def image_folder(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    test_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
) -> Split:
    """Images stored one folder per class (``path/<class>/**/<image>``), loaded into memory.

    Labels index the sorted class folder names. Images are converted to the PIL
    ``mode`` (``"RGB"``, ``"L"``, ...) and resized to ``size`` = (height, width); with
    ``size=None`` all images must already share one size. Needs Pillow.
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image_folder() needs Pillow: pip install pillow") from e
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    extensions = set(Image.registered_extensions())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in extensions):
            with Image.open(file) as img:
                img = img.convert(mode)
                if size is not None:
                    img = img.resize((size[1], size[0]))
                array = np.asarray(img, dtype=np.float32) / 255.0
            images.append(torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise ValueError(f"no images found in class folders under {root}")
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) > 1:
        raise ValueError(f"images differ in shape {sorted(shapes)}; pass size=(height, width)")
    return _random_split(torch.stack(images), torch.tensor(labels), test_fraction, seed, normalize)


def _cifar_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8))
        ys.append(np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32).float() / 255.0
    return x, torch.from_numpy(np.concatenate(ys))


def cifar10(path: str | os.PathLike, normalize: bool = True) -> Split:
    """CIFAR-10 from its python-pickle files, as ``(N, 3, 32, 32)``: 50000 train, 10000 test.

    ``path`` is the folder holding ``data_batch_1`` ... ``data_batch_5`` and
    ``test_batch`` (or the folder containing ``cifar-10-batches-py``). The files are
    unpickled, so only use copies you trust.
    """
    folder = Path(path)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*train_names, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 files {missing} not found in {folder}")
    x_train, y_train = _cifar_batches(folder, train_names)
    x_test, y_test = _cifar_batches(folder, ["test_batch"])
    if normalize:
        x_train, x_test = _standardize(x_train, x_test)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def python_docs_text() -> str:
    """The English text bundled with CPython: the pydoc help topics (``pydoc_data.topics``).

    About 465,000 characters of Python's reference documentation, the topics joined in
    sorted-key order. Always available offline, with no extra package.
    """
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@dataclass
class CharCorpus:
    """Next-character sequences of a text, and the vocabulary that encodes them.

    ``train`` and ``val`` hold ``(inputs, targets)``, both int64 of shape ``(N, seq_len)``,
    where ``targets[n, t]`` is the character after ``inputs[n, t]``.
    """

    vocab: str  # the distinct characters of the text, sorted; character vocab[i] is encoded as i
    train: TensorDataset
    val: TensorDataset

    def encode(self, text: str) -> torch.Tensor:
        """The int64 indices of the characters of ``text`` (each must be in the vocabulary)."""
        index = {c: i for i, c in enumerate(self.vocab)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, indices: torch.Tensor | list[int]) -> str:
        """The text of a 1-D sequence of indices."""
        return "".join(self.vocab[i] for i in torch.as_tensor(indices).tolist())


def _windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    # consecutive windows of seq_len + 1 characters, overlapping by one: inputs and shifted targets
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} characters are too few for one sequence of length {seq_len}")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return TensorDataset(x, y)


def char_corpus(
    text: str | None = None,
    seq_len: int = 100,
    val_fraction: float = 0.1,
    path: str | os.PathLike | None = None,
    max_chars: int | None = None,
) -> CharCorpus:
    """A character-level language-modelling corpus of ``text``, the UTF-8 file at ``path``, or
    (given neither) :func:`python_docs_text`.

    The vocabulary is the sorted set of characters in the (possibly truncated) text. The
    text's first ``max_chars`` characters (all, if ``None``) are split in two contiguous
    parts, the last ``val_fraction`` for validation, so no validation character is ever
    seen in training; each part is cut into non-overlapping ``seq_len``-character input
    sequences, whose targets are the same sequences shifted by one character.
    """
    if text is not None and path is not None:
        raise TypeError("pass text or path, not both")
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    elif text is None:
        text = python_docs_text()
    if max_chars is not None:
        text = text[:max_chars]
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    vocab = "".join(sorted(set(text)))
    corpus = CharCorpus(vocab, TensorDataset(), TensorDataset())
    ids = corpus.encode(text)
    split = len(ids) - round(len(ids) * val_fraction)
    corpus.train, corpus.val = _windows(ids[:split], seq_len), _windows(ids[split:], seq_len)
    return corpus
