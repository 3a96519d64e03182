"""Every classification loader on small data written in the real on-disk layout, scikit-learn's
real data, and a clear error for each kind of missing or malformed folder."""
import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch

from nnunet_ima.classification.datasets import (FASHION_MNIST_DEFAULT_ROOT, as_float, load_cifar10,
                                                load_covid_ct, load_dataset, load_digits,
                                                load_fashion_mnist, load_moons, load_svhn)
from nnunet_ima.errors import UserInputError


def _idx(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type 0x08 (ubyte), ndim, big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, compressed=False, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, a in arrays.items():
        data = _idx(a)
        if compressed:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_fashion_mnist_idx_files(tmp_path, compressed):
    arrays = _write_fashion(tmp_path, compressed)
    d = load_fashion_mnist(str(tmp_path), seed=0)
    assert d.x_train.shape == (54, 1, 28, 28) and d.x_val.shape == (6, 1, 28, 28)
    assert d.x_test.shape == (20, 1, 28, 28) and d.num_classes == 10 and d.clamp == (0.0, 1.0)
    np.testing.assert_array_equal(d.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    # Train + val together are exactly the training file, image with its own label.
    pairs = {(bytes(x.numpy().tobytes()), int(y)) for x, y in
             zip(torch.cat([d.x_train, d.x_val]), torch.cat([d.y_train, d.y_val]))}
    original = {(bytes(x.astype(np.uint8).tobytes()), int(y)) for x, y in
                zip(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])}
    assert pairs == original
    x = as_float(d.x_test)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert float(x[0, 0, 3, 5]) == pytest.approx(arrays["t10k-images-idx3-ubyte"][0, 3, 5] / 255.0)
    # The hold-out depends on the data seed only.
    assert torch.equal(load_fashion_mnist(str(tmp_path), seed=0).x_val, d.x_val)
    assert not torch.equal(load_fashion_mnist(str(tmp_path), seed=1).x_val, d.x_val)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(UserInputError, match="train-images-idx3-ubyte.*not found.*dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path), 0)
    _write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x08\x03 not an idx file")
    with pytest.raises(UserInputError, match="bad magic number"):
        load_fashion_mnist(str(tmp_path), 0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((20, 28, 28)))[:-10])
    with pytest.raises(UserInputError, match="truncated"):
        load_fashion_mnist(str(tmp_path), 0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((19, 28, 28))))
    with pytest.raises(UserInputError, match="do not fit together"):
        load_fashion_mnist(str(tmp_path), 0)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_ROOT),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files():
    d = load_fashion_mnist(None, 0)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (55000, 5000, 10000)
    assert torch.bincount(d.y_test).tolist() == [1000] * 10


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    stored = {}
    for split, n in (("train", 30), ("test", 10)):
        stored[split] = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": stored[split], "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})
    d = load_svhn(str(tmp_path), 0)
    assert d.x_test.shape == (10, 3, 32, 32) and len(d.x_train) + len(d.x_val) == 30
    # torchvision's layout: X[h, w, c, n] -> image n as (c, h, w); label 10 is the digit 0.
    assert torch.equal(d.x_test[4], torch.from_numpy(stored["test"][:, :, :, 4]).permute(2, 0, 1))
    assert d.y_test.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_svhn_errors(tmp_path):
    from scipy.io import savemat
    with pytest.raises(UserInputError, match="train_32x32.mat not found"):
        load_svhn(str(tmp_path), 0)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 40)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage" * 40)
    with pytest.raises(UserInputError, match="not a readable .mat file"):
        load_svhn(str(tmp_path), 0)
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"images": np.zeros((4, 4))})
    with pytest.raises(UserInputError, match="lacks an 'X'"):
        load_svhn(str(tmp_path), 0)


def _write_cifar(folder, n=10, seed=0):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                         b"labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    return batches


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = _write_cifar(folder)
    d = load_cifar10(str(tmp_path), 0)
    assert d.x_test.shape == (10, 3, 32, 32) and len(d.x_train) + len(d.x_val) == 50
    # Row layout of the pickles: 1024 red, then 1024 green, then 1024 blue values, row-major.
    assert d.x_test[3, 1, 2, 5] == batches["test_batch"][b"data"][3, 1024 + 2 * 32 + 5]
    assert d.y_test.tolist() == list(range(10))


def test_cifar10_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="data_batch_3 is not a CIFAR-10 batch pickle"):
        load_cifar10(str(tmp_path), 0)
    (folder / "test_batch").unlink()
    with pytest.raises(UserInputError, match="test_batch not found.*cifar-10-batches-py"):
        load_cifar10(str(tmp_path), 0)


def _write_covid(root, counts=(("COVID", 9), ("non-COVID", 8))):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, n in counts:
        (root / cls).mkdir()
        for i in range(n):
            # Sizes differ and one image is RGB: the loader converts to grey and resizes.
            a = rng.integers(0, 256, (40 + i, 50) if i else (40, 50, 3)).astype(np.uint8)
            Image.fromarray(a).save(root / cls / f"{i}.png")


def test_covid_folders_split_saved_and_reused(tmp_path):
    data_root, out = tmp_path / "data", tmp_path / "run"
    data_root.mkdir()
    _write_covid(data_root)
    split_path = str(out / "covid_split.json")
    d = load_covid_ct(str(data_root), 0, split_path, size=32, n_test=3, n_val=2)
    assert d.x_train.shape[1:] == (1, 32, 32) and d.x_train.dtype == torch.uint8
    assert len(d.x_test) == 6 and len(d.x_val) == 4 and len(d.x_train) == 17 - 10
    split = json.loads(open(split_path).read())
    for part, per_class in (("test", 3), ("val", 2)):
        assert sum(n.startswith("COVID/") for n in split[part]) == per_class
        assert sum(n.startswith("non-COVID/") for n in split[part]) == per_class
    assert len(set(split["train"] + split["val"] + split["test"])) == 17
    assert d.y_test.tolist() == [0, 0, 0, 1, 1, 1]  # non-COVID (label 0) first, then COVID
    # Reused: a different data seed gives the saved split, not a new one.
    again = load_covid_ct(str(data_root), 99, split_path, size=32, n_test=3, n_val=2)
    assert torch.equal(again.x_test, d.x_test)
    assert not torch.equal(load_covid_ct(str(data_root), 99, None, size=32, n_test=3, n_val=2).x_test,
                           d.x_test)


def test_covid_errors(tmp_path):
    with pytest.raises(UserInputError, match="COVID/ and non-COVID/"):
        load_covid_ct(str(tmp_path), 0, None)
    _write_covid(tmp_path)
    with pytest.raises(UserInputError, match="needs more than 230"):
        load_covid_ct(str(tmp_path), 0, None)
    (tmp_path / "COVID" / "3.png").write_bytes(b"not a png")
    split_path = tmp_path / "split.json"
    with pytest.raises(UserInputError, match="3.png is not a readable image"):
        load_covid_ct(str(tmp_path), 0, str(split_path), size=16, n_test=2, n_val=1)
    assert not split_path.exists()  # a failed load leaves no split behind
    (tmp_path / "COVID" / "3.png").unlink()
    load_covid_ct(str(tmp_path), 0, str(split_path), size=16, n_test=2, n_val=1)
    (tmp_path / "COVID" / "4.png").unlink()  # every image is in some part of the saved split
    with pytest.raises(UserInputError, match="not in .*delete the split file"):
        load_covid_ct(str(tmp_path), 0, str(split_path), size=16, n_test=2, n_val=1)


def test_real_scikit_learn_data():
    moons = load_moons(0)
    assert (len(moons.x_train), len(moons.x_val), len(moons.x_test)) == (20000, 2000, 2000)
    assert moons.clamp is None and moons.x_train.dtype == torch.float32
    assert 0.45 < moons.y_train.float().mean() < 0.55
    # Points on two unit half-circles: radius 1 around (0, 0) for class 0, around (1, 0.5) for 1.
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.5]])[moons.y_test]
    radius = (moons.x_test - centres).norm(dim=1)
    assert abs(float(radius.mean()) - 1.0) < 0.02
    assert torch.equal(load_moons(0).x_test, moons.x_test)
    digits = load_digits(0)
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_val) + len(digits.x_test) == 1797
    assert int(digits.x_train.max()) == 255 and digits.clamp == (0.0, 1.0)


def test_dataset_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown dataset"):
        load_dataset("mnist", None, 0)
    with pytest.raises(UserInputError, match="needs --data-root"):
        load_dataset("svhn", None, 0)
    with pytest.raises(UserInputError, match="is not a folder"):
        load_dataset("cifar10", str(tmp_path / "missing"), 0)
    with pytest.raises(UserInputError, match="moons-noise"):
        load_dataset("moons", None, 0, moons_noise=-0.1)
