"""Classification datasets, read from their standard on-disk formats (nothing is downloaded).

Every loader returns a :class:`DatasetSplits` of in-memory tensors: images ``(N, C, H, W)``
uint8 (scaled to ``[0, 1]`` float when batched) or moons points ``(N, 2)`` float32, labels
``(N,)`` int64. A missing or malformed folder is a :class:`UserInputError` naming the expected
layout.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from nnunet_ima.errors import UserInputError

DATASETS = ("moons", "digits", "fashion-mnist", "svhn", "cifar10", "covid-ct")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
MOONS_NOISE = 0.1
"""Gaussian noise (standard deviation) of scikit-learn's ``make_moons``: at 0.1 the two half-circles
are separated by a gap about 0.3 wide, the scale of the paper's eps_max; at 0.2 they overlap."""


@dataclass
class DatasetSplits:
    """Train / validation / test tensors of one dataset.

    ``x_*``: ``(N, C, H, W)`` uint8 images or ``(N, D)`` float32 points; ``y_*``: ``(N,)`` int64.
    ``clamp``: the valid input range for attacks (``(0, 1)`` for images, ``None`` for points).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    clamp: Optional[Tuple[float, float]]

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Model input from stored samples: uint8 images -> ``[0, 1]`` float32; points unchanged."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _hold_out(x: np.ndarray, y: np.ndarray, n_val: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _splits(name, x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes, clamp) -> DatasetSplits:
    t = lambda a, dtype=None: torch.from_numpy(np.ascontiguousarray(a)) if dtype is None \
        else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return DatasetSplits(name, t(x_tr), t(y_tr, torch.int64), t(x_val), t(y_val, torch.int64),
                         t(x_te), t(y_te, torch.int64), num_classes, clamp)


def load_moons(seed: int, noise: float = MOONS_NOISE, sizes=(20000, 2000, 2000)) -> DatasetSplits:
    """scikit-learn's two moons: 20000 / 2000 / 2000 points, ``noise`` Gaussian jitter."""
    from sklearn.datasets import make_moons
    x, y = make_moons(n_samples=sum(sizes), noise=noise, random_state=seed)
    x = x.astype(np.float32)
    a, b = sizes[0], sizes[0] + sizes[1]
    return _splits("moons", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], 2, None)


def load_digits(seed: int) -> DatasetSplits:
    """scikit-learn's real 8x8 handwritten digits (1797 images), 70 / 10 / 20 % split."""
    from sklearn.datasets import load_digits as sk_digits
    digits = sk_digits()
    x = np.round(digits.images / 16.0 * 255).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = len(x) // 5, len(x) // 10
    te, va, tr = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return _splits("digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10, (0.0, 1.0))


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise UserInputError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise UserInputError(f"{path}: IDX type {dtype_code:#x} is not unsigned byte")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserInputError(f"{path}: expected {int(np.prod(dims))} values, found {body.size} "
                             f"(truncated file?)")
    return body.reshape(dims)


def _find(root: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(stem)


def load_fashion_mnist(root: Optional[str], seed: int, n_val: int = 5000) -> DatasetSplits:
    """The standard IDX files (optionally gzipped); 5000 training images held out for validation."""
    root = root or FASHION_MNIST_DEFAULT_ROOT
    layout = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte (optionally .gz); `apt-get install dataset-fashion-mnist` "
              f"puts them in {FASHION_MNIST_DEFAULT_ROOT}")
    try:
        files = {k: _find(root, k) for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    except FileNotFoundError as e:
        raise UserInputError(f"fashion-mnist: {e} not found in {root}; expected {layout}") from None
    x_tr, y_tr = _read_idx(files["train-images-idx3-ubyte"]), _read_idx(files["train-labels-idx1-ubyte"])
    x_te, y_te = _read_idx(files["t10k-images-idx3-ubyte"]), _read_idx(files["t10k-labels-idx1-ubyte"])
    if x_tr.ndim != 3 or len(x_tr) != len(y_tr) or x_te.ndim != 3 or len(x_te) != len(y_te):
        raise UserInputError(f"fashion-mnist files in {root} do not match ({x_tr.shape}, "
                             f"{y_tr.shape}, {x_te.shape}, {y_te.shape}); expected {layout}")
    x_tr, y_tr, x_val, y_val = _hold_out(x_tr[:, None], y_tr, min(n_val, len(x_tr) // 10), seed)
    return _splits("fashion-mnist", x_tr, y_tr, x_val, y_val, x_te[:, None], y_te, 10, (0.0, 1.0))


def load_svhn(root: str, seed: int, n_val: int = 5000) -> DatasetSplits:
    """torchvision's SVHN files ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 means 0)."""
    from scipy.io import loadmat
    arrays = {}
    for split in ("train", "test"):
        path = os.path.join(root or "", f"{split}_32x32.mat")
        if not os.path.isfile(path):
            raise UserInputError(f"svhn: {path} not found; expected train_32x32.mat and "
                                 f"test_32x32.mat (torchvision's SVHN format) in --data-root")
        mat = loadmat(path)
        if "X" not in mat or "y" not in mat:
            raise UserInputError(f"svhn: {path} has no 'X'/'y' arrays (not torchvision's format)")
        x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)
        y = mat["y"].astype(np.int64).reshape(-1) % 10
        arrays[split] = (x, y)
    x_tr, y_tr, x_val, y_val = _hold_out(*arrays["train"], min(n_val, len(arrays["train"][0]) // 10), seed)
    return _splits("svhn", x_tr, y_tr, x_val, y_val, *arrays["test"], 10, (0.0, 1.0))


def load_cifar10(root: str, seed: int, n_val: int = 5000) -> DatasetSplits:
    """torchvision's ``cifar-10-batches-py`` pickles (``data_batch_1..5``, ``test_batch``)."""
    folder = os.path.join(root or "", "cifar-10-batches-py")
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root or "", "data_batch_1")):
        folder = root
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserInputError(f"cifar10: {missing} not found in {folder}; expected torchvision's "
                             f"cifar-10-batches-py folder (data_batch_1..5, test_batch)")

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        try:
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise UserInputError(f"cifar10: {name} is malformed ({e})") from None
        return x, y
    parts = [read(n) for n in names[:5]]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = read("test_batch")
    x_tr, y_tr, x_val, y_val = _hold_out(x_tr, y_tr, min(n_val, len(x_tr) // 10), seed)
    return _splits("cifar10", x_tr, y_tr, x_val, y_val, x_te, y_te, 10, (0.0, 1.0))


COVID_CLASSES = ("non-COVID", "COVID")  # label 0, label 1


def covid_split(files: Dict[str, list], seed: int, n_test: int = 200, n_val: int = 30) -> dict:
    """Per class: ``n_test`` test, ``n_val`` validation, the rest training (seeded)."""
    split = {"train": [], "val": [], "test": [], "seed": seed}
    rng = np.random.default_rng(seed)
    for cls in COVID_CLASSES:
        names = sorted(files[cls])
        if len(names) <= n_test + n_val:
            raise UserInputError(f"covid-ct: {cls}/ has {len(names)} images, needs more than "
                                 f"{n_test + n_val} for the {n_test} test / {n_val} val split")
        order = rng.permutation(len(names))
        chosen = [f"{cls}/{names[i]}" for i in order]
        split["test"] += chosen[:n_test]
        split["val"] += chosen[n_test:n_test + n_val]
        split["train"] += chosen[n_test + n_val:]
    return split


def load_covid_ct(root: str, seed: int, split_path: Optional[str], size: int = 224,
                  n_test: int = 200, n_val: int = 30) -> DatasetSplits:
    """The SARS-CoV-2 CT-scan set: ``COVID/`` and ``non-COVID/`` PNG folders, 224x224 grey.

    The split is saved to ``split_path`` (JSON) and reused when it exists.
    """
    from PIL import Image
    files = {}
    for cls in COVID_CLASSES:
        folder = os.path.join(root or "", cls)
        if not os.path.isdir(folder):
            raise UserInputError(f"covid-ct: {folder} not found; expected --data-root with the "
                                 f"folders COVID/ and non-COVID/ of PNG images")
        files[cls] = [f for f in os.listdir(folder) if f.lower().endswith(".png")]
        if not files[cls]:
            raise UserInputError(f"covid-ct: no PNG images in {folder}")
    if split_path and os.path.isfile(split_path):
        with open(split_path) as f:
            split = json.load(f)
    else:
        split = covid_split(files, seed, n_test, n_val)
        if split_path:
            tmp = split_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(split, f, indent=1)
            os.replace(tmp, split_path)

    def read(names):
        x = np.empty((len(names), 1, size, size), dtype=np.uint8)
        y = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            cls = name.split("/", 1)[0]
            with Image.open(os.path.join(root, name)) as image:
                x[i, 0] = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))
            y[i] = COVID_CLASSES.index(cls)
        return x, y
    return _splits("covid-ct", *read(split["train"]), *read(split["val"]), *read(split["test"]), 2,
                   (0.0, 1.0))


def load_dataset(name: str, data_root: Optional[str], seed: int,
                 split_path: Optional[str] = None, moons_noise: float = MOONS_NOISE) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`)."""
    loaders: Dict[str, Callable[[], DatasetSplits]] = {
        "moons": lambda: load_moons(seed, moons_noise),
        "digits": lambda: load_digits(seed),
        "fashion-mnist": lambda: load_fashion_mnist(data_root, seed),
        "svhn": lambda: load_svhn(data_root, seed),
        "cifar10": lambda: load_cifar10(data_root, seed),
        "covid-ct": lambda: load_covid_ct(data_root, seed, split_path),
    }
    if name not in loaders:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name in ("svhn", "cifar10", "covid-ct") and not data_root:
        raise UserInputError(f"{name} needs --data-root (the folder holding the dataset files)")
    if data_root and not os.path.isdir(data_root):
        raise UserInputError(f"--data-root {data_root} is not a folder")
    return loaders[name]()
