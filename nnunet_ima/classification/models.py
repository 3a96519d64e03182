"""The classification networks of the IMA paper (METHOD section 7), all returning logits.

Inputs: moons points ``(B, 2)``; images ``(B, C, H, W)`` in ``[0, 1]``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

from nnunet_ima.errors import UserInputError


def moons_mlp(num_classes: int = 2) -> nn.Module:
    """Linear(2,32)-LReLU-Linear(32,64)-LN-LReLU-Linear(64,128)-LN-LReLU-Linear(128,2)."""
    return nn.Sequential(
        nn.Linear(2, 32), nn.LeakyReLU(0.2),
        nn.Linear(32, 64), nn.LayerNorm(64), nn.LeakyReLU(0.2),
        nn.Linear(64, 128), nn.LayerNorm(128), nn.LeakyReLU(0.2),
        nn.Linear(128, num_classes))


def fashion_cnn(num_classes: int = 10) -> nn.Module:
    """The paper's Fashion-MNIST CNN for ``(B, 1, 28, 28)``: four strided convs, IN, LReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 5, 2, 2), nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 5, 2, 2), nn.InstanceNorm2d(128, affine=True), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 256, 5, 2, 2), nn.InstanceNorm2d(256, affine=True), nn.LeakyReLU(0.2),
        nn.Conv2d(256, 512, 4, 1, 0), nn.Flatten(),
        nn.LayerNorm(512), nn.LeakyReLU(0.2), nn.Linear(512, num_classes))


def svhn_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A 7-conv IN / LReLU CNN for ``(B, 3, 32, 32)`` (the paper's SVHN network family)."""
    def block(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride, 1), nn.InstanceNorm2d(o, affine=True), nn.LeakyReLU(0.2)]
    layers = (block(in_channels, 32, 1) + block(32, 64, 2) + block(64, 64, 1) + block(64, 128, 2)
              + block(128, 128, 1) + block(128, 256, 2) + block(256, 256, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for scikit-learn's ``(B, 1, 8, 8)`` digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 3, 2, 1), nn.InstanceNorm2d(64, affine=True), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.LayerNorm(128), nn.LeakyReLU(0.2),
        nn.Linear(128, num_classes))


def resnet18_grey(num_classes: int = 2, norm: str = "group") -> nn.Module:
    """torchvision's ResNet-18 for ``(B, 1, H, W)`` with BatchNorm replaced by ``norm``.

    ``"group"``: GroupNorm with 32 groups (``--model resnet18``); ``"instance"``: affine
    InstanceNorm (``--model resnet18-in``). Batch statistics would make a sample's prediction
    depend on the rest of its batch, which the attacks must not exploit.
    """
    from torchvision.models import resnet18
    if norm == "group":
        norm_layer = lambda c: nn.GroupNorm(min(32, c), c)  # noqa: E731
    elif norm == "instance":
        norm_layer = lambda c: nn.InstanceNorm2d(c, affine=True)  # noqa: E731
    else:
        raise UserInputError(f"norm must be 'group' or 'instance', got {norm!r}")
    model = resnet18(num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


class _WideBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None if i == o and stride == 1 else nn.Conv2d(i, o, 1, stride, bias=False)

    def forward(self, x):
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + shortcut


def wide_resnet(depth: int = 28, widen: int = 4, num_classes: int = 10) -> nn.Module:
    """WRN-depth-widen for ``(B, 3, 32, 32)`` (Zagoruyko & Komodakis); WRN-28-4 by default."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
    for stage, stride in zip(range(1, 4), (1, 2, 2)):
        for b in range(n):
            layers.append(_WideBlock(widths[stage - 1] if b == 0 else widths[stage], widths[stage],
                                     stride if b == 0 else 1))
    layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(widths[3], num_classes)]
    return nn.Sequential(*layers)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": moons_mlp, "fashion-cnn": fashion_cnn, "svhn-cnn": svhn_cnn, "digits-cnn": digits_cnn,
    "resnet18": resnet18_grey,
    "resnet18-in": lambda num_classes=2: resnet18_grey(num_classes, norm="instance"),
    "wrn-28-4": wide_resnet,
}
DEFAULT_MODEL = {"moons": "mlp", "digits": "digits-cnn", "fashion-mnist": "fashion-cnn",
                 "svhn": "svhn-cnn", "cifar10": "wrn-28-4", "covid-ct": "resnet18"}


def build_model(name: str, num_classes: int, input_shape: Tuple[int, ...]) -> nn.Module:
    """The network ``name`` for ``num_classes`` outputs, in train mode.

    A dry forward pass on ``(2, *input_shape)`` zeros turns a model / dataset mismatch into a
    :class:`UserInputError` before any training.
    """
    if name not in MODELS:
        raise UserInputError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = MODELS[name](num_classes=num_classes)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    except RuntimeError as e:
        raise UserInputError(f"model {name!r} does not accept inputs of shape {input_shape}: {e}") \
            from None
    return model.train()
