"""nnunet-ima-eval's attacks: SegPGD's loss by hand, APGD's step-size rule on scripted losses,
every attack on a really trained nnU-Net model."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from nnunet_ima.attacks import pgd
from nnunet_ima.evaluation import ensemble
from nnunet_ima.evaluation.attacks import (apgd, apgd_checkpoints, run_attack, segpgd_lambda,
                                           segpgd_loss)
from nnunet_ima.evaluation.cli import main
from nnunet_ima.evaluation.models import load_model
from nnunet_ima.evaluation.report import attack_caption, markdown_table
from nnunet_ima.evaluation.robustness import (AttackSettings, _generator, attack_loss,
                                              evaluate_levels, evaluate_noise)
from nnunet_ima.evaluation.samples import (cases_from_source, limit_slices,
                                           load_preprocessed_slices)
from nnunet_ima.metrics import confusion_counts
from nnunet_ima.norms import per_sample_norm


# ----------------------------------------------------------------------------- SegPGD by hand

def test_segpgd_lambda_rises_linearly_from_zero_to_below_one_half():
    assert segpgd_lambda(1, 4) == 0.0
    assert segpgd_lambda(3, 4) == pytest.approx(2 / 8)
    assert segpgd_lambda(100, 100) == pytest.approx(99 / 200)
    with pytest.raises(ValueError):
        segpgd_lambda(0, 4)
    with pytest.raises(ValueError):
        segpgd_lambda(5, 4)


def test_segpgd_loss_weights_correct_and_wrong_pixels_and_skips_ignored_ones():
    ln3 = math.log(3.0)
    # Slice 0, two classes, five pixels: wrong (0.5 vs 0, label 1), correct (ln3 vs 0, label 0),
    # wrong (0 vs ln3, label 0), the ignore label 2, and nnU-Net's -1 outside the crop, which is
    # background (correct here: 5 vs -5).
    logits = torch.tensor([[[[0.5, ln3, 0.0, 5.0, 5.0]], [[0.0, 0.0, ln3, -5.0, -5.0]]],
                           [[[ln3] * 5], [[0.0] * 5]]], requires_grad=True)   # (2, 2, 1, 5)
    target = torch.tensor([[[[1, 0, 0, 2, -1]]], [[[0, 0, 0, 0, 0]]]])        # (2, 1, 1, 5)
    ce_wrong0 = math.log(1 + math.exp(0.5))    # -log softmax of the label-1 logit
    ce_correct = math.log(4 / 3)                # -log(3 / (3 + 1))
    ce_wrong2 = math.log(4.0)                   # -log(1 / (1 + 3))
    ce_outside = math.log(1 + math.exp(-10.0))  # -log softmax of the background logit
    lam = 0.25
    loss = segpgd_loss(logits, target, lam, ignore_label=2)
    expected0 = ((1 - lam) * (ce_correct + ce_outside)
                 + lam * (ce_wrong0 + ce_wrong2)) / 4                          # 4 scored pixels
    expected1 = (1 - lam) * ce_correct                                          # all correct
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-6)
    # At the first step (lambda 0) only correctly classified pixels pull the attack.
    (grad,) = torch.autograd.grad(segpgd_loss(logits, target, 0.0, ignore_label=2).sum(), logits)
    assert grad[0, :, 0, 1].abs().sum() > 0
    assert grad[0, :, 0, 4].abs().sum() > 0
    assert grad[0, :, 0, [0, 2, 3]].abs().sum() == 0


# ----------------------------------------------------------------------------- APGD's schedule

def test_apgd_checkpoints_follow_the_papers_recursion():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99; w = ceil(p * steps), repeats dropped.
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert apgd_checkpoints(4) == [1, 2, 3, 4]


def test_apgd_halves_each_slices_step_on_its_own_evidence():
    """Scripted losses (zero gradient, so the iterate stays put) make the two halving conditions
    visible, one slice each: always rising (never halved), flat (halved at all 8 checkpoints:
    condition 1) and rising but below the start (condition 2 at every other checkpoint)."""
    calls = []

    def scripted(output, y):
        n = len(calls)
        calls.append(n)
        values = torch.tensor([float(n), 5.0, 100.0 if n == 0 else n - 1.0])
        return values + 0 * output.sum(dim=1)

    x = torch.zeros(3, 2)
    eps = torch.tensor([1.0, 2.0, 4.0])
    run = apgd(torch.nn.Identity(), x, None, eps, None, norm="l2", steps=100, loss=scripted)
    assert len(calls) == 101  # the start and every iterate, once each
    # Rising loss halves at 22, 57, 80, 93 (restart below the best, then 75 % increases): 4 times.
    assert run.step_size.tolist() == [2.0, 4.0 / 2 ** 8, 8.0 / 2 ** 4]
    assert run.loss_start.tolist() == [0.0, 5.0, 100.0]
    assert run.loss_best.tolist() == [100.0, 5.0, 100.0]


def test_apgd_climbs_a_concave_loss_and_batches_do_not_couple_slices():
    def loss(output, c):
        return -((output[:, 0] - c) ** 2)

    x = torch.zeros(3, 1)
    c = torch.tensor([10.0, 0.5, -0.3])   # outside the ball, inside, inside
    eps = torch.ones(3)
    run = apgd(torch.nn.Identity(), x, c, eps, None, norm="linf", steps=100, loss=loss)
    assert run.x_best[:, 0].tolist() == pytest.approx([1.0, 0.5, -0.3], abs=1e-3)
    assert run.loss_best.tolist() == pytest.approx((-(run.x_best[:, 0] - c) ** 2).tolist())
    for i in range(3):
        alone = apgd(torch.nn.Identity(), x[i:i + 1], c[i:i + 1], eps[i:i + 1], None, norm="linf",
                     steps=100, loss=loss)
        assert torch.equal(alone.x_best, run.x_best[i:i + 1])
        assert torch.equal(alone.step_size, run.step_size[i:i + 1])


# ----------------------------------------------------------------------------- the trained model

@pytest.fixture(scope="module")
def model_and_slices(nnunet_workspace, trained_clean_model):
    ws = nnunet_workspace
    model = load_model(trained_clean_model, 0, "final", torch.device("cpu"), name="clean")
    folder = os.path.join(ws.preprocessed, ws.dataset_name)
    samples = load_preprocessed_slices(folder, model.data_identifier,
                                       cases_from_source(folder, ["test"], 0), False,
                                       model.ignore_label)
    return model, limit_slices(samples, 4, seed=0)


def _tensors(samples):
    x = torch.from_numpy(np.stack([s.image for s in samples]))
    y = torch.from_numpy(np.stack([s.label for s in samples])[:, None].astype(np.int64))
    return x, y


def test_pgd_gives_the_cores_bits_for_the_same_start(model_and_slices):
    """``--attack pgd`` repeats what the evaluator computed with ``nnunet_ima.attacks.pgd``."""
    model, samples = model_and_slices
    x, y = _tensors(samples)
    settings = AttackSettings(steps=4, batch_size=16)
    result = evaluate_noise(model, samples, 6.0, settings, torch.device("cpu"))
    x_adv = pgd(model.network, x, y, 6.0, norm="l2", steps=4, alpha=5.0,
                loss=attack_loss("dc_ce", None), generator=_generator(0, 6.0, 0))
    with torch.no_grad():
        pred = model.network(x_adv).argmax(dim=1)
    tp, fp, fn = confusion_counts(pred, y[:, 0], model.num_classes)
    np.testing.assert_array_equal(result.tp, tp.numpy())
    np.testing.assert_array_equal(result.fp, fp.numpy())
    np.testing.assert_array_equal(result.fn, fn.numpy())
    show = int(np.argmax([int((s.label > 0).sum()) for s in samples]))
    np.testing.assert_array_equal(result.example["adversarial"], x_adv[show].numpy())


def _assert_same_results(batched, alone):
    for field in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(getattr(batched, field), getattr(alone, field))
    assert batched.example.keys() == alone.example.keys()
    for key, value in alone.example.items():
        np.testing.assert_array_equal(batched.example[key], value)


@pytest.mark.parametrize("attack", ["pgd", "segpgd", "apgd"])
def test_every_attack_stays_in_the_ball_and_lowers_dice(model_and_slices, attack):
    model, samples = model_and_slices
    x, y = _tensors(samples)
    eps = torch.full((len(samples),), 8.0)
    for norm in ("l2", "linf"):
        start = torch.zeros_like(x)
        x_adv = run_attack(attack, model.network, x, y, eps, start, norm=norm, steps=8, alpha=5.0,
                           loss=attack_loss("dc_ce", None))
        assert (per_sample_norm(x_adv - x, norm) <= 8.0 * (1 + 1e-5)).all()
    settings = AttackSettings(attack=attack, steps=8)
    result = evaluate_levels(model, samples, [0.0, 8.0], settings, torch.device("cpu"))
    assert result[8.0].slice_dice.mean() < result[0.0].slice_dice.mean() - 0.05


def test_apgd_returns_its_highest_loss_iterate(model_and_slices):
    model, samples = model_and_slices
    x, y = _tensors(samples)
    loss = attack_loss("dc_ce", None)
    run = apgd(model.network, x, y, torch.full((len(samples),), 6.0), None, norm="l2", steps=8,
               loss=loss)
    with torch.no_grad():
        recomputed = loss(model.network(run.x_best), y)
        at_input = loss(model.network(x), y)
    assert recomputed.tolist() == pytest.approx(run.loss_best.tolist(), rel=1e-5)
    assert run.loss_start.tolist() == pytest.approx(at_input.tolist(), rel=1e-5)
    assert (run.loss_best >= run.loss_start).all()
    assert (run.loss_best > run.loss_start + 0.05).any()


# ----------------------------------------------------------------------------- the CLI

def test_table_caption_names_the_attack_and_only_the_options_it_uses():
    pgd_config = {"norm": "l2", "steps": 100, "alpha": 5.0, "random_start": True,
                  "attack_loss": "dc_ce"}   # written before --attack existed: PGD
    caption = "pgd (L2, 100 steps, alpha 5, random start, loss Dice + CE)"
    assert attack_caption(pgd_config) == caption
    assert attack_caption(dict(pgd_config, attack="pgd")) == caption
    assert attack_caption({"attack": "segpgd", "norm": "linf", "steps": 10, "alpha": 2.5,
                           "random_start": False, "attack_loss": None}) == \
        "segpgd (Linf, 10 steps, alpha 2.5, no random start, loss SegPGD's weighted CE)"
    apgd_config = {"attack": "apgd", "norm": "l2", "steps": 100, "alpha": None,
                   "random_start": True, "attack_loss": "ce"}
    assert attack_caption(apgd_config) == "apgd (L2, 100 steps, random start, loss CE)"
    summary = {"config": apgd_config, "models": {"m": {"noise": {"0": {"adi": 0.5}}}}}
    assert markdown_table(summary, "adi", [0.0]).splitlines()[0] == \
        "ADI (%) under apgd (L2, 100 steps, random start, loss CE)"


def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "-o", str(out), "--noise", "0", "4",
            "--max-slices", "3", "--steps", "2", *extra]


def test_cli_records_the_attack_and_refuses_another_in_the_same_folder(
        nnunet_workspace, trained_clean_model, tmp_path, capsys, monkeypatch):
    ws = nnunet_workspace
    configs = {}
    for attack in ("segpgd", "apgd"):
        assert main(_args(ws, tmp_path / attack, "--attack", attack)) == 0
        configs[attack] = json.loads((tmp_path / attack / "summary.json").read_text())["config"]
        assert configs[attack]["attack"] == attack
        caption = (tmp_path / attack / "tvdi.md").read_text().splitlines()[0]
        assert caption.startswith(f"TVDI (%) under {attack} (L2, 2 steps")
    # Options that do not apply to an attack are recorded as such.
    assert configs["segpgd"]["attack_loss"] is None and configs["segpgd"]["alpha"] == 5.0
    assert configs["apgd"]["alpha"] is None and configs["apgd"]["attack_loss"] == "dc_ce"
    capsys.readouterr()
    before = (tmp_path / "apgd" / "summary.json").read_text()
    assert main(_args(ws, tmp_path / "apgd", "--attack", "pgd")) == 2
    assert re.search(r"differences in: .*\battack\b", capsys.readouterr().err)
    assert (tmp_path / "apgd" / "summary.json").read_text() == before

    # A folder written before --attack existed (no "attack" key) ran PGD: it resumes as pgd.
    assert main(_args(ws, tmp_path / "old")) == 0
    config_path = tmp_path / "old" / "config.json"
    old = json.loads(config_path.read_text())
    assert old["attack"] == "pgd" and old["alpha"] == 5.0
    del old["attack"]
    config_path.write_text(json.dumps(old))

    def no_attack(*a, **k):
        raise AssertionError("a finished folder must resume without attacking")
    monkeypatch.setattr(ensemble, "iter_levels", no_attack)
    assert main(_args(ws, tmp_path / "old")) == 0
    assert main(_args(ws, tmp_path / "old", "--attack", "segpgd")) == 2
