"""Small networks with known behaviour for the core attack tests."""
import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A tiny conv net for ``(B, 1, 8, 8)`` inputs and 3 classes (with instance norm, as nnU-Net)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(0.1),
            nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.Dropout(0.2))
        self.head = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class LinearBinary(nn.Module):
    """Two logits ``[-f/2, f/2]`` with ``f = w.x + b``: class 1 iff ``f > 0``.

    The decision boundary is the hyperplane ``f = 0``; the L2 distance of ``x`` to it is
    ``|f(x)| / ||w||_2`` and the Linf distance ``|f(x)| / ||w||_1``.
    """

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b), dtype=w.dtype))

    def f(self, x):
        return x.flatten(1) @ self.w + self.b

    def forward(self, x):
        f = self.f(x)
        return torch.stack([-f / 2, f / 2], dim=1)


class TinySegmenter(nn.Module):
    """Two 3x3 convolutions: ``(B, 1, H, W)`` -> ``(B, 2, H, W)`` logits (background, object)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def tiny_segmentation_problem(network: nn.Module = None):
    """A :class:`TinySegmenter` fitted to 6 noisy 16 x 16 slices of a bright rectangle, as the
    evaluator's ``LoadedModel``, and those slices as ``SliceSample``s (clean TVDI > 0.9)."""
    from nnunet_ima.evaluation.models import LoadedModel, PaddedNetwork
    from nnunet_ima.evaluation.samples import SliceSample
    torch.manual_seed(0)
    network = TinySegmenter() if network is None else network
    images, labels = [], []
    for i in range(6):
        label = np.zeros((16, 16), dtype=np.int16)
        label[3 + i:9 + i, 4:11] = 1
        image = label * 2.0 - 1.0 + 0.3 * np.random.default_rng(i).standard_normal((16, 16))
        images.append(image[None].astype(np.float32))
        labels.append(label)
    x = torch.from_numpy(np.stack(images))
    y = torch.from_numpy(np.stack(labels)).long()
    optimiser = torch.optim.Adam(network.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(network(x), y).backward()
        optimiser.step()
    model = LoadedModel(name="tiny", folder="", network=PaddedNetwork(network.eval(), (1, 1)),
                        num_classes=2, configuration="2d", data_identifier="", dataset_name="",
                        ignore_label=None, plans={}, dataset_json={})
    samples = [SliceSample(f"case{i}", 0, images[i], labels[i]) for i in range(6)]
    return model, samples


class Recorder(nn.Module):
    """Passes inputs to ``net`` and keeps a copy of every input it was called with
    (``seen``, in call order): the iterates an attack evaluated."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)
