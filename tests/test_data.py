import pickle
import random

import numpy as np
import pytest
import torch

from fxprune import data


def _equal(a, b):
    return all(x.equal(y) for x, y in zip(a.tensors, b.tensors))


def test_digits_shapes_labels_and_determinism():
    train, test = data.digits()
    x, y = train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    again_train, again_test = data.digits()
    assert _equal(train, again_train) and _equal(test, again_test)
    assert not _equal(test, data.digits(seed=1)[1])
    raw_x = data.digits(normalize=False)[0].tensors[0]
    assert raw_x.min() >= 0 and raw_x.max() <= 1


def test_mnist1d_shapes_labels_and_determinism():
    np.random.seed(7)
    random.seed(7)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    train, test = data.mnist1d()
    assert train.tensors[0].shape == (4000, 1, 40) and test.tensors[0].shape == (1000, 1, 40)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert set(train.tensors[1].tolist()) == set(range(10))
    assert (np.random.get_state()[1] == np_before).all() and random.getstate() == py_before
    small_train, small_test = data.mnist1d(num_samples=500)
    assert len(small_train) == 400 and len(small_test) == 100
    assert _equal(small_train, data.mnist1d(num_samples=500)[0])


def test_mnist1d_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="bogus"):
        data.mnist1d(bogus=1)


def _write_cifar_batch(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), b"labels": list(labels)}, f)


def test_cifar10_reads_pickled_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4)
        _write_cifar_batch(folder / name, images, labels)
        batches[name] = images, labels
    train, test = data.cifar10(tmp_path, normalize=False)
    assert train.tensors[0].shape == (20, 3, 32, 32) and test.tensors[0].shape == (4, 3, 32, 32)
    images, labels = batches["data_batch_2"]
    assert torch.equal(train.tensors[0][4:8], torch.from_numpy(images).float() / 255)
    assert train.tensors[1][4:8].tolist() == labels.tolist()
    assert test.tensors[1].dtype == torch.int64
    train, test = data.cifar10(folder)
    assert train.tensors[0].mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert test.tensors[0].shape == (4, 3, 32, 32)


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.cifar10(tmp_path)


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("RGB", (6, 4), color=(label * 200, i * 10, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train, test = data.image_folder(tmp_path, test_fraction=0.2, normalize=False)
    assert len(train) == 8 and len(test) == 2
    x = torch.cat([train.tensors[0], test.tensors[0]])
    y = torch.cat([train.tensors[1], test.tensors[1]])
    assert x.shape == (10, 3, 4, 6)
    assert torch.allclose(x[:, 0, 0, 0], y.float() * 200 / 255)
    gray, _ = data.image_folder(tmp_path, size=(3, 3), mode="L")
    assert gray.tensors[0].shape == (8, 1, 3, 3)


def test_image_folder_needs_one_size(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match="size="):
        data.image_folder(tmp_path, test_fraction=0.5)


def test_python_docs_text():
    text = data.python_docs_text()
    assert isinstance(text, str) and len(text) > 100_000 and "the" in text


def test_char_corpus_windows_split_and_vocabulary(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(40))
    corpus = data.char_corpus(text, seq_len=16, val_fraction=0.25)
    assert corpus.vocab == "".join(sorted(set(text)))
    assert corpus.decode(corpus.encode(text)) == text
    x, y = corpus.train.tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 16
    split = len(text) - round(len(text) * 0.25)
    assert len(corpus.train) == (split - 1) // 16 and len(corpus.val) == (len(text) - split - 1) // 16
    assert corpus.decode(x.flatten()) == text[: x.numel()]  # consecutive, non-overlapping windows
    assert corpus.decode(y.flatten()) == text[1 : x.numel() + 1]  # targets: the next characters
    val_x, val_y = corpus.val.tensors
    assert corpus.decode(val_x.flatten()) == text[split : split + val_x.numel()]
    assert torch.equal(val_x[:, 1:], val_y[:, :-1])

    path = tmp_path / "text.txt"
    path.write_text(text + "ünïcode", encoding="utf-8")
    from_file = data.char_corpus(path=path, seq_len=16, max_chars=len(text))
    assert from_file.vocab == corpus.vocab
    assert torch.equal(from_file.train.tensors[0], data.char_corpus(text, seq_len=16).train.tensors[0])
    assert "ü" in data.char_corpus(path=str(path), seq_len=16).vocab


def test_char_corpus_errors(tmp_path):
    corpus = data.char_corpus("abc" * 8, seq_len=2, val_fraction=0.5)
    with pytest.raises(ValueError, match="'z'"):
        corpus.encode("abz")
    with pytest.raises(TypeError, match="not both"):
        data.char_corpus("abc", path=tmp_path / "x.txt")
    with pytest.raises(ValueError, match="too few"):
        data.char_corpus("abcabc", seq_len=10)
    default = data.char_corpus(seq_len=64, max_chars=5000)
    assert set(default.vocab) <= set(data.python_docs_text())
