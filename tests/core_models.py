"""Small networks with known behaviour for the core attack tests."""
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
