"""Classification datasets, read from their standard on-disk formats (nothing is downloaded).

Every loader returns a :class:`DatasetSplits` of in-memory tensors: images ``(N, C, H, W)``
uint8 (scaled to ``[0, 1]`` float by :func:`as_float` when batched) or moons points ``(N, 2)``
float32, labels ``(N,)`` int64. A training sample is identified by its row index in
``x_train``: that integer is the key of IMA's margin store.

Splits are drawn with a *data seed* that is independent of the training seed, so that runs with
different training seeds are evaluated on the same test samples. A missing or malformed folder
is a :class:`UserInputError` naming the expected layout.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json

DATASETS = ("moons", "digits", "fashion-mnist", "svhn", "cifar10", "covid-ct")
NEEDS_DATA_ROOT = ("svhn", "cifar10", "covid-ct")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MOONS_SIZES = (20000, 2000, 2000)
MOONS_NOISE = 0.1
"""Standard deviation of the Gaussian jitter of scikit-learn's ``make_moons`` (``--moons-noise``).
At 0.1 the two half-moons are nearly separable (an RBF SVM misclassifies about 0.2 % of the test
points; at 0.2 about 3 %), so robust accuracy is limited by the model, not by label noise, while
many points still lie within the paper's ``eps_max`` = 0.3 of the boundary."""
VALIDATION_SIZE = 5000
"""Training images held out for validation where the dataset has no validation split."""
COVID_CLASSES = ("non-COVID", "COVID")  # label 0, label 1
COVID_LAYOUT = ("--data-root with the folders COVID/ and non-COVID/ of PNG images (the "
                "SARS-CoV-2 CT-scan set)")


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


def _tensor(a: np.ndarray, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # np.array(copy) rather than from_numpy on a read-only buffer (IDX files are read as bytes).
    t = torch.from_numpy(np.array(a, copy=True, order="C"))
    return t if dtype is None else t.to(dtype)


def _splits(name, x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes, clamp) -> DatasetSplits:
    return DatasetSplits(name, _tensor(x_tr), _tensor(y_tr, torch.int64), _tensor(x_val),
                         _tensor(y_val, torch.int64), _tensor(x_te), _tensor(y_te, torch.int64),
                         num_classes, clamp)


def hold_out(x: np.ndarray, y: np.ndarray, n_val: int, seed: int):
    """A seeded random ``n_val`` of ``(x, y)`` for validation; returns ``x_tr, y_tr, x_val, y_val``."""
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[train], y[train], x[val], y[val]


def _validation_size(n_train: int) -> int:
    # Small (test-sized) copies of a dataset keep 90 % of their images for training.
    return min(VALIDATION_SIZE, n_train // 10)


# ----------------------------------------------------------------------------- scikit-learn
def load_moons(seed: int = 0, noise: float = MOONS_NOISE, sizes=MOONS_SIZES) -> DatasetSplits:
    """scikit-learn's two moons: ``sizes`` = train / val / test points (20000 / 2000 / 2000)."""
    from sklearn.datasets import make_moons
    if not noise >= 0:
        raise UserInputError(f"--moons-noise must be >= 0, got {noise}")
    x, y = make_moons(n_samples=sum(sizes), noise=noise, random_state=seed)
    x = x.astype(np.float32)
    a, b = sizes[0], sizes[0] + sizes[1]
    return _splits("moons", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], 2, None)


def load_digits(seed: int = 0) -> DatasetSplits:
    """scikit-learn's real 8x8 handwritten digits (1797 images), 70 / 10 / 20 % split."""
    from sklearn.datasets import load_digits as sk_digits
    digits = sk_digits()
    # The pixels are counts 0..16; stored as uint8 0..255 like every other image dataset.
    x = np.round(digits.images / 16.0 * 255).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = len(x) // 5, len(x) // 10
    te, va, tr = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return _splits("digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10, (0.0, 1.0))


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as an array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserInputError(f"{path} cannot be read ({e}); replace it with the original file") \
            from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserInputError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise UserInputError(f"{path}: IDX type {dtype_code:#x} is not unsigned byte (0x08)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserInputError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise UserInputError(f"{path}: the header declares {int(np.prod(dims))} values but the "
                             f"file holds {body.size} (truncated file?)")
    return body.reshape(dims)


def _find(root: str, stem: str) -> Optional[str]:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_fashion_mnist(root: Optional[str], seed: int = 0) -> DatasetSplits:
    """The four standard IDX files (optionally ``.gz``); 5000 training images held out for
    validation."""
    root = root or FASHION_MNIST_DEFAULT_ROOT
    layout = (", ".join(FASHION_MNIST_FILES) + " (optionally .gz); `apt-get install "
              f"dataset-fashion-mnist` puts them in {FASHION_MNIST_DEFAULT_ROOT}")
    files = {stem: _find(root, stem) for stem in FASHION_MNIST_FILES}
    missing = [stem for stem, path in files.items() if path is None]
    if missing:
        raise UserInputError(f"fashion-mnist: {', '.join(missing)} not found in {root}; expected "
                             f"{layout}")
    arrays = {stem: read_idx(path) for stem, path in files.items()}
    x_tr, y_tr, x_te, y_te = (arrays[s] for s in FASHION_MNIST_FILES)
    if (x_tr.ndim != 3 or y_tr.ndim != 1 or len(x_tr) != len(y_tr) or x_te.ndim != 3
            or y_te.ndim != 1 or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]):
        raise UserInputError(f"fashion-mnist files in {root} do not fit together (images "
                             f"{x_tr.shape} / {x_te.shape}, labels {y_tr.shape} / {y_te.shape}); "
                             f"expected {layout}")
    if max(y_tr.max(initial=0), y_te.max(initial=0)) > 9:
        raise UserInputError(f"fashion-mnist labels in {root} exceed 9: not Fashion-MNIST label files")
    x_tr, y_tr, x_val, y_val = hold_out(x_tr[:, None], y_tr, _validation_size(len(x_tr)), seed)
    return _splits("fashion-mnist", x_tr, y_tr, x_val, y_val, x_te[:, None], y_te, 10, (0.0, 1.0))


# ----------------------------------------------------------------------------- SVHN / CIFAR-10
def load_svhn(root: str, seed: int = 0) -> DatasetSplits:
    """torchvision's SVHN files ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 means 0).

    Read with scipy as torchvision does (``X`` is ``(32, 32, 3, N)``, ``y`` is ``(N, 1)``);
    torchvision's own class is not used because it insists on the files' MD5 sums.
    """
    from scipy.io import loadmat
    layout = "train_32x32.mat and test_32x32.mat (torchvision's SVHN format) in --data-root"
    arrays = {}
    for split in ("train", "test"):
        path = os.path.join(root, f"{split}_32x32.mat")
        if not os.path.isfile(path):
            raise UserInputError(f"svhn: {path} not found; expected {layout}")
        try:
            mat = loadmat(path)
        except (ValueError, OSError, TypeError) as e:
            raise UserInputError(f"svhn: {path} is not a readable .mat file ({e}); expected {layout}") \
                from None
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
                or y.size != x.shape[3]:
            raise UserInputError(f"svhn: {path} lacks an 'X' (32, 32, 3, N) array and a matching "
                                 f"'y' (N, 1) array; expected {layout}")
        arrays[split] = (np.transpose(x, (3, 2, 0, 1)).astype(np.uint8),
                         y.astype(np.int64).reshape(-1) % 10)
    x_tr, y_tr, x_val, y_val = hold_out(*arrays["train"], _validation_size(len(arrays["train"][0])),
                                        seed)
    return _splits("svhn", x_tr, y_tr, x_val, y_val, *arrays["test"], 10, (0.0, 1.0))


def load_cifar10(root: str, seed: int = 0) -> DatasetSplits:
    """torchvision's ``cifar-10-batches-py`` pickles (``data_batch_1..5``, ``test_batch``)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root, "data_batch_1")):
        folder = root
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    layout = ("torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch) in "
              "--data-root")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserInputError(f"cifar10: {', '.join(missing)} not found in {folder}; expected {layout}")

    def read(name):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
                AttributeError) as e:
            raise UserInputError(f"cifar10: {path} is not a CIFAR-10 batch pickle "
                                 f"({type(e).__name__}: {e}); expected {layout}") from None
        if len(x) != len(y):
            raise UserInputError(f"cifar10: {path} has {len(x)} images but {len(y)} labels")
        return x, y
    parts = [read(n) for n in names[:5]]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = read("test_batch")
    x_tr, y_tr, x_val, y_val = hold_out(x_tr, y_tr, _validation_size(len(x_tr)), seed)
    return _splits("cifar10", x_tr, y_tr, x_val, y_val, x_te, y_te, 10, (0.0, 1.0))


# ----------------------------------------------------------------------------- COVID-19 CT
def covid_split(files: Dict[str, List[str]], seed: int, n_test: int = 200, n_val: int = 30) -> dict:
    """Per class: ``n_test`` test, ``n_val`` validation, the rest training (seeded).

    ``files`` maps each class folder to its PNG names; the result lists ``"CLASS/name"`` paths.
    """
    split = {"seed": seed, "n_test_per_class": n_test, "n_val_per_class": n_val,
             "train": [], "val": [], "test": []}
    rng = np.random.default_rng(seed)
    for cls in COVID_CLASSES:
        names = sorted(files[cls])
        if len(names) <= n_test + n_val:
            raise UserInputError(f"covid-ct: {cls}/ has {len(names)} images, needs more than "
                                 f"{n_test + n_val} for the {n_test} test / {n_val} val split")
        chosen = [f"{cls}/{names[i]}" for i in rng.permutation(len(names))]
        split["test"] += chosen[:n_test]
        split["val"] += chosen[n_test:n_test + n_val]
        split["train"] += chosen[n_test + n_val:]
    return split


def _read_split(split_path: str, root: str) -> dict:
    try:
        with open(split_path) as f:
            split = json.load(f)
        names = split["train"] + split["val"] + split["test"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"covid-ct: {split_path} is not a split file ({e}); delete it to "
                             f"draw a new split") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise UserInputError(f"covid-ct: {len(missing)} images of the saved split {split_path} are "
                             f"not in {root} (e.g. {missing[0]}); point --data-root at the folder "
                             f"the split was made from, or delete the split file")
    return split


def load_covid_ct(root: str, seed: int = 0, split_path: Optional[str] = None, size: int = 224,
                  n_test: int = 200, n_val: int = 30) -> DatasetSplits:
    """The SARS-CoV-2 CT-scan set: ``COVID/`` and ``non-COVID/`` PNG folders, ``size`` x ``size`` grey.

    Images are converted to grey and resized bilinearly. The split (per class ``n_test`` test,
    ``n_val`` validation, the rest training) is saved to ``split_path`` (JSON) and reused when that
    file exists, so that every run of an experiment uses the same images.
    """
    from PIL import Image, UnidentifiedImageError
    files = {}
    for cls in COVID_CLASSES:
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            raise UserInputError(f"covid-ct: {folder} not found; expected {COVID_LAYOUT}")
        files[cls] = [f for f in os.listdir(folder) if f.lower().endswith(".png")]
        if not files[cls]:
            raise UserInputError(f"covid-ct: no PNG images in {folder}; expected {COVID_LAYOUT}")
    if split_path and os.path.isfile(split_path):
        split = _read_split(split_path, root)
    else:
        split = covid_split(files, seed, n_test, n_val)

    def read(names):
        x = np.empty((len(names), 1, size, size), dtype=np.uint8)
        y = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            path = os.path.join(root, name)
            try:
                with Image.open(path) as image:
                    x[i, 0] = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))
            except (UnidentifiedImageError, OSError) as e:
                raise UserInputError(f"covid-ct: {path} is not a readable image ({e}); remove or "
                                     f"replace it") from None
            y[i] = COVID_CLASSES.index(name.split("/", 1)[0])
        return x, y
    data = _splits("covid-ct", *read(split["train"]), *read(split["val"]), *read(split["test"]), 2,
                   (0.0, 1.0))
    # Written only once every image was read: a failed load leaves no split behind.
    if split_path and not os.path.isfile(split_path):
        write_json(split_path, split, sort_keys=False)
    return data


# ----------------------------------------------------------------------------- dispatch
def load_dataset(name: str, data_root: Optional[str], seed: int = 0,
                 split_path: Optional[str] = None, moons_noise: float = MOONS_NOISE) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`) with data seed ``seed``.

    ``split_path`` is where the COVID-19 CT split is saved / reused.
    """
    loaders: Dict[str, Callable[[], DatasetSplits]] = {
        "moons": lambda: load_moons(seed, moons_noise),
        "digits": lambda: load_digits(seed),
        "fashion-mnist": lambda: load_fashion_mnist(data_root, seed),
        "svhn": lambda: load_svhn(data_root, seed),
        "cifar10": lambda: load_cifar10(data_root, seed),
        "covid-ct": lambda: load_covid_ct(data_root, seed, split_path),
    }
    if name not in loaders:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in NEEDS_DATA_ROOT and not data_root:
        raise UserInputError(f"{name} needs --data-root (the folder holding the dataset files)")
    if data_root and not os.path.isdir(data_root):
        raise UserInputError(f"--data-root {data_root} is not a folder")
    return loaders[name]()
