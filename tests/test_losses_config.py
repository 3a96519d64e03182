"""IMA loss, the Dice-threshold predicate and the validated configs."""
import pytest
import torch

from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.losses import DiceThresholdCorrect, ima_loss


def test_ima_loss_hand_computed():
    clean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    adversarial = torch.tensor([5.0, 7.0])
    assert ima_loss(clean, adversarial, 0.5).item() == pytest.approx((0.5 * 10 + 0.5 * 12) / 4)
    assert ima_loss(clean, adversarial, 0.2).item() == pytest.approx((0.8 * 10 + 0.2 * 12) / 4)
    assert ima_loss(clean, torch.zeros(0), 0.5).item() == pytest.approx(0.5 * 10 / 4)
    assert ima_loss(clean, adversarial, 0.5, batch_size=8).item() == pytest.approx(11 / 8)


def test_ima_loss_gradient_flows_to_both_terms():
    clean = torch.tensor([1.0, 2.0], requires_grad=True)
    adversarial = torch.tensor([3.0], requires_grad=True)
    ima_loss(clean, adversarial, 0.25).backward()
    assert clean.grad.tolist() == pytest.approx([0.375, 0.375])
    assert adversarial.grad.tolist() == pytest.approx([0.125])


def test_ima_loss_bad_input():
    with pytest.raises(ValueError, match="beta must be in"):
        ima_loss(torch.ones(2), torch.ones(1), 1.5)
    with pytest.raises(ValueError, match="more samples than the batch"):
        ima_loss(torch.ones(2), torch.ones(3), 0.5)


def test_dice_threshold_predicate_on_logits_and_deep_supervision_lists():
    target = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    target[:, 0, :2, :2] = 1                    # 4 foreground pixels per slice
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 1                          # Dice 1
    pred[1, :2, :1] = 1                          # Dice 2*2/(2*2+0+2) = 2/3
    pred[2, :1, :1] = 1                          # Dice 2*1/(2+3) = 0.4
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    predicate = DiceThresholdCorrect(0.6)
    assert predicate.dice(logits, target).tolist() == pytest.approx([1, 2 / 3, 0.4])
    assert predicate(logits, target).tolist() == [True, True, False]
    low_res = [logits, logits[:, :, ::2, ::2]]
    assert predicate(low_res, [target, target[:, :, ::2, ::2]]).tolist() == [True, True, False]
    assert DiceThresholdCorrect(0.7)(logits, target).tolist() == [True, False, False]


def test_configs_validate_and_round_trip():
    cfg = IMAConfig(eps_max=25.0)
    assert cfg.resolved_delta(50) == pytest.approx(0.5)
    assert IMAConfig.from_dict(cfg.to_dict()) == cfg
    store = IMAConfig(eps_max=2.0, margin_update="replace", on_clean_wrong="reset",
                      clip_min="delta").make_margin_store(10)
    assert (store.delta, store.shrink, store.on_clean_wrong, store.clip_min) == (0.2, "replace", "reset", "delta")
    assert AttackConfig.from_dict({"norm": "linf", "steps": 7}).steps == 7


@pytest.mark.parametrize("values, match", [
    (dict(eps_max=0), "eps_max must be a finite number > 0"),
    (dict(eps_max=1, delta=2), "delta .* must not exceed eps_max"),
    (dict(eps_max=1, beta=1.5), "beta must be in"),
    (dict(eps_max=1, margin_update="min"), "margin_update must be one of"),
    (dict(eps_max=1, binary_steps=-1), "binary_steps must be an integer"),
    (dict(eps_max=1, epsmax=3), r"unknown IMAConfig option\(s\) \['epsmax'\]"),
])
def test_config_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        IMAConfig.from_dict(values)
