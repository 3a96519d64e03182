"""Every classification loader on small data written in the real on-disk layout."""
import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch

from nnunet_ima.classification.datasets import (as_float, load_cifar10, load_covid_ct, load_dataset,
                                                load_digits, load_fashion_mnist, load_moons, load_svhn)
from nnunet_ima.errors import UserInputError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_fashion_mnist_idx_files(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (60, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(60) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(20) % 10}
    for name, a in arrays.items():
        data = _idx(a)
        if compressed:
            with gzip.open(tmp_path / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (tmp_path / name).write_bytes(data)
    d = load_fashion_mnist(str(tmp_path), seed=0)
    assert d.x_train.shape == (54, 1, 28, 28) and d.x_val.shape == (6, 1, 28, 28)
    assert d.x_test.shape == (20, 1, 28, 28) and d.num_classes == 10 and d.clamp == (0.0, 1.0)
    np.testing.assert_array_equal(d.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    # Train + val together are exactly the training file (a permutation of it).
    together = torch.cat([d.x_train, d.x_val]).reshape(60, -1).numpy()
    original = arrays["train-images-idx3-ubyte"].reshape(60, -1).astype(np.uint8)
    assert sorted(map(bytes, together)) == sorted(map(bytes, original))
    assert as_float(d.x_test).max() <= 1.0


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(UserInputError, match="train-images-idx3-ubyte not found"):
        load_fashion_mnist(str(tmp_path), 0)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x08\x03 not an idx file")
    with pytest.raises(UserInputError, match="bad magic number"):
        load_fashion_mnist(str(tmp_path), 0)


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                 "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})
    d = load_svhn(str(tmp_path), 0)
    assert d.x_test.shape == (10, 3, 32, 32) and d.x_train.shape[0] + d.x_val.shape[0] == 30
    assert set(d.y_test.tolist()) == set(range(10))  # label 10 is digit 0
    with pytest.raises(UserInputError, match="train_32x32.mat"):
        load_svhn(str(tmp_path / "nowhere"), 0)


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8),
                         b"labels": list(range(10))}, f)
    d = load_cifar10(str(tmp_path), 0)
    assert d.x_test.shape == (10, 3, 32, 32) and d.x_train.shape[0] + d.x_val.shape[0] == 50
    (folder / "test_batch").unlink()
    with pytest.raises(UserInputError, match="test_batch"):
        load_cifar10(str(tmp_path), 0)


def test_covid_folders_split_saved_and_reused(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, n in (("COVID", 9), ("non-COVID", 8)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40 + i, 50)).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    split_path = str(tmp_path / "covid_split.json")
    d = load_covid_ct(str(tmp_path), 0, split_path, size=32, n_test=3, n_val=2)
    assert d.x_train.shape[1:] == (1, 32, 32) and len(d.x_test) == 6 and len(d.x_val) == 4
    assert len(d.x_train) == 17 - 10
    split = json.loads(open(split_path).read())
    assert sum(name.startswith("COVID/") for name in split["test"]) == 3
    # Reused: a different seed gives the saved split, not a new one.
    again = load_covid_ct(str(tmp_path), 99, split_path, size=32, n_test=3, n_val=2)
    assert torch.equal(again.x_test, d.x_test)
    with pytest.raises(UserInputError, match="COVID/ and non-COVID/"):
        load_covid_ct(str(tmp_path / "COVID"), 0, None)


def test_real_scikit_learn_data():
    moons = load_moons(0)
    assert (len(moons.x_train), len(moons.x_val), len(moons.x_test)) == (20000, 2000, 2000)
    assert moons.clamp is None and moons.x_train.dtype == torch.float32
    digits = load_digits(0)
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_val) + len(digits.x_test) == 1797


def test_dataset_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown dataset"):
        load_dataset("mnist", None, 0)
    with pytest.raises(UserInputError, match="needs --data-root"):
        load_dataset("svhn", None, 0)
    with pytest.raises(UserInputError, match="is not a folder"):
        load_dataset("cifar10", str(tmp_path / "missing"), 0)
