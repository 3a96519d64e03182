"""The baselines' adversarial steps (N-FGSM, TRADES) on models whose answers are known by hand,
the one per-sample KL that TRADES for segmentation and for classification share, and what the
N-FGSM and TRADES trainers' code reads of the settings."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.adversarial_step import NFGSMStep, TRADESStep, kl_to_reference
from nnunet_ima.config import AttackConfig
from nnunet_ima.losses import full_resolution
from nnunet_ima.norms import per_sample_norm, random_in_ball, steepest_ascent_direction
from nnunet_ima.nnunet.settings import ADV, trainer_family
from nnunet_ima.trainers.nnUNetTrainerNFGSM import nnUNetTrainerNFGSM
from nnunet_ima.trainers.nnUNetTrainerTRADES import nnUNetTrainerTRADES
from test_settings_strict import _code_reads, _reads

pytestmark = pytest.mark.usefixtures("one_thread")


class _Linear(nn.Module):
    """``f(x) = <w, x>``: the gradient of its output is ``w`` everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def _output(output, y):
    return output


# --------------------------------------------------------------------------------- N-FGSM
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_nfgsm_point_is_x_plus_noise_plus_eps_times_the_direction_not_projected(norm):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 3, 3, dtype=torch.float64)
    w = torch.randn(1, 3, 3, dtype=torch.float64)
    eps = 0.5
    batch = NFGSMStep(eps, norm, weight=0.5, loss=_output)(
        _Linear(w), x, torch.zeros(64), generator=torch.Generator().manual_seed(3))

    noise = random_in_ball(x, torch.full((64,), 2 * eps, dtype=x.dtype), norm,
                           torch.Generator().manual_seed(3))
    direction = steepest_ascent_direction(w.expand_as(x), norm)  # the gradient is w
    torch.testing.assert_close(batch.x, x + noise + eps * direction)
    assert batch.weight == 0.5 and batch.target.shape == (64,)
    distance = per_sample_norm(batch.x - x, norm)
    assert (distance > eps * 1.01).any()  # outside the eps ball: not projected back
    assert (distance <= 3 * eps + 1e-9).all()  # noise 2 eps + step eps


def test_nfgsm_without_noise_is_fgsm():
    x = torch.zeros(2, 4, dtype=torch.float64)
    w = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64)
    batch = NFGSMStep(torch.tensor([1.0, 2.0]), "l2", noise_factor=0.0, loss=_output)(
        _Linear(w), x, torch.zeros(2))
    expected = torch.tensor([[0.6, -0.8, 0, 0], [1.2, -1.6, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(batch.x, expected)


def test_nfgsm_refuses_a_negative_noise_factor():
    with pytest.raises(ValueError, match="noise_factor must be >= 0"):
        NFGSMStep(1.0, "l2", noise_factor=-1.0)


# ---------------------------------------------------------------------------------- TRADES
def test_kl_of_identical_outputs_is_zero_and_per_pixel_averaged():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6)
    assert torch.allclose(kl_to_reference(logits, F.softmax(logits, dim=1)), torch.zeros(3),
                          atol=1e-6)
    other = torch.randn(3, 4, 5, 6)
    p = F.softmax(other, dim=1)
    per_pixel = F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(dim=1)  # (3,5,6)
    torch.testing.assert_close(kl_to_reference(logits, p), per_pixel.mean(dim=(1, 2)))


def test_kl_of_a_classifier_is_the_formula_classification_trades_used():
    """Bit for bit: the classification TRADES attacks with this function."""
    torch.manual_seed(0)
    logits, p = torch.randn(8, 3), F.softmax(torch.randn(8, 3), dim=1)
    before = (p * (p.clamp_min(1e-12).log() - F.log_softmax(logits, dim=1))).sum(dim=1)
    assert torch.equal(kl_to_reference(logits, p), before)


class _OnePixel(nn.Module):
    """Two classes on a one-pixel image: logits ``(a x, -a x)`` (deep supervision as a list)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x):
        z = self.a * x
        return [torch.cat([z, -z], dim=1), torch.cat([z, -z], dim=1)[..., :1, :1]]


def test_trades_attack_goes_to_the_edge_of_the_ball_and_raises_the_kl():
    """On one pixel the KL to the clean softmax grows with the distance on either side, so PGD
    runs from its start to ``x +- eps`` on the side where it started."""
    model = _OnePixel(1.0)
    x = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    y = torch.zeros(4, 1, 1, 1, dtype=torch.long)
    clean = model(x)
    eps = 0.5
    attack = AttackConfig(norm="l2", steps=5, alpha=2.0)
    batch = TRADESStep(eps, attack, beta=6.0)(model, x, y, clean,
                                              generator=torch.Generator().manual_seed(1))
    start = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float32).to(x)
    torch.testing.assert_close(batch.x, x + eps * start.sign())
    p_clean = F.softmax(full_resolution(clean), dim=1)
    kl_adv = kl_to_reference(full_resolution(model(batch.x)), p_clean)
    kl_start = kl_to_reference(full_resolution(model(x + start)), p_clean)
    assert (kl_adv > 100 * kl_start).all() and (kl_start > 0).all()
    assert batch.weight == 6.0 and batch.target is y


def test_trades_refuses_a_negative_beta():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        TRADESStep(1.0, AttackConfig(), beta=-1.0)


# ----------------------------------------------------------- the trainers' settings reads
def test_the_baseline_trainers_read_only_keys_of_their_family(monkeypatch, tmp_path):
    """Both are of the Adv family; the PGD keys N-FGSM has no use for are not read (a file that
    sets them is accepted, as for Adv, and they do not act), TRADES starts as its code does."""
    small = {"num_epochs": 2, "pgd_steps": 2}
    adv = _reads(ADV) - {"recipe"}
    for trainer, unread in [(nnUNetTrainerNFGSM, {"pgd_steps", "pgd_alpha", "random_start"}),
                            (nnUNetTrainerTRADES, {"random_start"})]:
        assert trainer_family(trainer) == ADV
        read = _code_reads(monkeypatch, tmp_path / trainer.__name__, trainer, small)
        assert read == adv - unread, trainer.__name__
