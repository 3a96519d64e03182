"""TVDI / ADI of hand-made predictions, tables and pre-flight checks (no nnU-Net run needed)."""

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.models import PaddedNetwork
from nnunet_ima.evaluation.preflight import preflight
from nnunet_ima.evaluation.report import markdown_table, summarise
from nnunet_ima.evaluation.robustness import NoiseResult


def _result(pred, label, num_classes=3):
    """NoiseResult from hand-made (N, H, W) prediction and label maps."""
    pred, label = np.asarray(pred), np.asarray(label)
    k = num_classes - 1
    tp, fp, fn = (np.zeros((len(pred), k), dtype=np.int64) for _ in range(3))
    for i in range(len(pred)):
        for c in range(1, num_classes):
            tp[i, c - 1] = np.sum((pred[i] == c) & (label[i] == c))
            fp[i, c - 1] = np.sum((pred[i] == c) & (label[i] != c))
            fn[i, c - 1] = np.sum((pred[i] != c) & (label[i] == c))
    return NoiseResult(["a"] * len(pred), list(range(len(pred))), tp, fp, fn, {})


def test_tvdi_and_adi_match_hand_computed_values():
    label = [[[1, 1, 0, 0]], [[2, 2, 2, 0]]]
    clean = [[[1, 1, 0, 0]], [[2, 2, 2, 0]]]          # perfect
    noisy = [[[1, 0, 0, 0]], [[2, 0, 0, 1]]]          # slice 0: class 1 half; slice 1: mess
    summary = summarise({0.0: _result(clean, label), 5.0: _result(noisy, label)}, ["organ", "lesion"])
    assert summary["noise"]["0"]["tvdi"] == 1.0 and summary["noise"]["0"]["adi"] == 1.0
    # Class 1: TP 1, FP 1 (slice 1 pixel 3), FN 1 -> 2/4. Class 2: TP 1, FN 2 -> 2/4.
    noisy_entry = summary["noise"]["5"]
    assert noisy_entry["per_class"]["organ"]["tvdi"] == pytest.approx(0.5)
    assert noisy_entry["per_class"]["lesion"]["tvdi"] == pytest.approx(0.5)
    assert noisy_entry["tvdi"] == pytest.approx(0.5)
    # Slice 0: class 1 Dice 2/3 (class 2 absent everywhere: not averaged) -> 2/3.
    # Slice 1: class 1 Dice 0 (FP only), class 2 Dice 2/4 -> 1/4. ADI = (2/3 + 1/4) / 2.
    assert noisy_entry["adi"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    # AUC: trapezoid of (1, 0.5) over [0, 5] divided by 5.
    assert summary["auc_tvdi"] == pytest.approx(0.75)
    assert noisy_entry["n_slices"] == 2


def test_markdown_table_is_percent_with_two_decimals():
    summary = {"models": {"IMA": {"noise": {"0": {"tvdi": 0.91234}, "5": {"tvdi": 0.5}},
                                  "auc_tvdi": 0.7}}}
    table = markdown_table(summary, "tvdi", [0.0, 5.0])
    assert "| IMA | 91.23 | 50.00 | 70.00 |" in table
    assert "| model | noise 0 | noise 5 | AUC |" in table


def test_padded_network_crops_back_and_attacks_only_pixels():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["shape"] = tuple(x.shape)
            return torch.cat([x, -x], dim=1)

    net = PaddedNetwork(Probe(), (8, 8))
    out = net(torch.ones(2, 1, 13, 20))
    assert seen["shape"] == (2, 1, 16, 24)
    assert out.shape == (2, 2, 13, 20)


class _Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(torch.cat([x, -x], 1), 1)


class _Dropout(nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], 1) * (torch.rand_like(x) + 0.5)


class _Flat(nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], 1).round() * 0 + torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)


@pytest.mark.parametrize("net, message", [
    (_Softmax(), "probabilities"), (_Dropout(), "differ"), (_Flat(), "gradient is zero")])
def test_preflight_refuses_models_that_cannot_be_attacked(net, message):
    x = torch.randn(2, 1, 8, 8)
    y = torch.zeros(2, 1, 8, 8, dtype=torch.long)

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target[:, 0], reduction="none").mean((1, 2))
    with pytest.raises(UserInputError, match=message):
        preflight("m", net, x, y, loss)
