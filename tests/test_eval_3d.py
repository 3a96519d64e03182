"""The evaluator's sample and scoring side on 3D configurations: whole cases as samples, attacks,
losses and counts on ``(B, C, D, H, W)`` volumes, nnU-Net's per-case Dice, the masking checks,
the ensemble and the figures, on hand-built tiny 3D networks (no nnU-Net training)."""
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.metrics import confusion_counts, slice_dice_from_counts, tvdi
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.norms import per_sample_norm, project, random_in_ball

from nnunet_ima.evaluation.attacks import ATTACKS, run_attack, segpgd_loss
from nnunet_ima.evaluation.ensemble import iter_ensemble
from nnunet_ima.evaluation.masking import (MaskingSettings, _window_side, random_search,
                                           run_masking_checks, unbounded_budget, window_sides)
from nnunet_ima.evaluation.memory import measure_peak
from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.plots import plot_examples
from nnunet_ima.evaluation.preflight import preflight_models
from nnunet_ima.evaluation.provenance import slices_digest
from nnunet_ima.evaluation.report import (load_part, markdown_table, nnunet_case_summary,
                                          per_slice_rows, save_part, summarise)
from nnunet_ima.evaluation.robustness import (AttackSettings, NoiseResult, attack_loss,
                                              batch_size_for, evaluate_levels, example_plane,
                                              scored_counts)
from nnunet_ima.evaluation.samples import (WHOLE_CASE, SliceSample, configuration_dims,
                                           limit_slices, load_preprocessed_slices, samples_of)
from nnunet_ima.evaluation.segmentation_losses import SEA_LOSSES, class_balance_weights
from nnunet_ima.evaluation.selection import check_same_dims, sample_dims, samples_by_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SHAPE = (6, 10, 10)  # (D, H, W) of the tiny volumes
CLASSES = {"background": 0, "organ": 1, "lesion": 2}


class Tiny3d(nn.Module):
    """Two 3x3x3 convolutions: ``(B, 1, D, H, W) -> (B, 3, D, H, W)`` logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(),
                                 nn.Conv3d(6, 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _volume(i: int):
    """Case ``i``: an organ box (1) holding a lesion box (2) that moves with ``i``, in noise."""
    label = np.zeros(SHAPE, np.int16)
    label[1:5, 2 + i % 3:8, 2:8] = 1
    label[2:4, 4:6, 3 + i % 2:5 + i % 2] = 2
    image = label * 1.5 - 1.0 + 0.3 * np.random.default_rng(i).standard_normal(SHAPE)
    return image[None].astype(np.float32), label


def tiny_3d_problem(cases: int = 4, ignore_label=None):
    """A fitted :class:`Tiny3d` as the evaluator's model of a 3D configuration (its plans say
    so; ``spatial_dims`` is left at its default) and ``cases`` whole-case samples."""
    network = Tiny3d()
    volumes = [_volume(i) for i in range(cases)]
    x = torch.from_numpy(np.stack([v[0] for v in volumes]))
    y = torch.from_numpy(np.stack([v[1] for v in volumes])).long()
    optimiser = torch.optim.Adam(network.parameters(), lr=0.03)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(network(x), y).backward()
        optimiser.step()
    model = LoadedModel(name="tiny3d", folder="", network=network.eval(), num_classes=3,
                        configuration="3d_fullres", data_identifier="", dataset_name="",
                        ignore_label=ignore_label,
                        plans={"configurations": {"3d_fullres": {"patch_size": list(SHAPE)}}},
                        dataset_json={"labels": CLASSES})
    samples = [SliceSample(f"case_{i:03d}", WHOLE_CASE, image, label)
               for i, (image, label) in enumerate(volumes)]
    return model, samples


@pytest.fixture(scope="module")
def problem():
    return tiny_3d_problem()


# --------------------------------------------------------------------------------- samples

def _write_preprocessed(folder, case, data, seg):
    """A preprocessed case as nnU-Net's numpy dataset stores it (``.npz`` + ``.pkl``)."""
    np.savez_compressed(folder / f"{case}.npz", data=data, seg=seg)
    with open(folder / f"{case}.pkl", "wb") as f:
        pickle.dump({"spacing": [1, 1, 1]}, f)


@pytest.fixture
def preprocessed(tmp_path):
    """Three preprocessed cases of ``(1, 4, 6, 6)``: with foreground and nnU-Net's -1 outside
    the nonzero region, without foreground, and with foreground in one slice only."""
    dataset = tmp_path / "Dataset001_X"
    folder = dataset / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    segs = {"a": np.zeros((1, 4, 6, 6), np.int8), "empty": np.zeros((1, 4, 6, 6), np.int8),
            "b": np.zeros((1, 4, 6, 6), np.int8)}
    segs["a"][0, 1:3, 2:4, 2:4] = 1
    segs["a"][0, :, 0, :] = -1
    segs["empty"][0, 0, 0, :] = -1
    segs["b"][0, 3, 1, 1] = 2
    data = {c: rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for c in segs}
    for case in segs:
        _write_preprocessed(folder, case, data[case], segs[case])
    return dataset, data, segs


def test_a_3d_configuration_scores_one_sample_per_case(preprocessed):
    dataset, data, segs = preprocessed
    samples = load_preprocessed_slices(str(dataset), "nnUNetPlans_3d_fullres",
                                       ["a", "empty", "b"], include_empty=False, spatial_dims=3)
    assert [(s.case, s.index) for s in samples] == [("a", WHOLE_CASE), ("b", WHOLE_CASE)]
    assert WHOLE_CASE == -1 and all(s.is_volume for s in samples)
    a = samples[0]
    assert a.image.shape == (1, 4, 6, 6) and a.image.dtype == np.float32
    assert a.label.shape == (4, 6, 6) and a.label.dtype == np.int16
    np.testing.assert_array_equal(a.image, data["a"])
    expected = segs["a"][0].astype(np.int16)
    expected[expected == -1] = 0  # outside the nonzero region is background
    np.testing.assert_array_equal(a.label, expected)
    everything = load_preprocessed_slices(str(dataset), "nnUNetPlans_3d_fullres",
                                          ["a", "empty", "b"], include_empty=True,
                                          spatial_dims=3)
    assert [s.case for s in everything] == ["a", "empty", "b"]
    assert everything[1].label.min() == 0
    # --max-slices counts cases in 3D; the 2D configuration still takes slices
    assert [s.case for s in limit_slices(everything, 2, seed=0)] in (["a", "empty"], ["a", "b"],
                                                                   ["empty", "b"])
    slices = load_preprocessed_slices(str(dataset), "nnUNetPlans_3d_fullres", ["a", "b"], False)
    assert [(s.case, s.index) for s in slices] == [("a", 1), ("a", 2), ("b", 3)]


def test_a_case_with_only_the_ignore_label_has_no_foreground():
    seg = np.zeros((1, 2, 3, 3), np.int16)
    seg[0, 0, 0, 0] = 3
    data = np.zeros((1, 2, 3, 3), np.float32)
    assert samples_of("c", data, seg, False, 3, spatial_dims=3) == []
    assert len(samples_of("c", data, seg, False, None, spatial_dims=3)) == 1
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        samples_of("c", data, seg, False, None, spatial_dims=4)


def test_the_configuration_decides_between_slices_and_cases(problem, preprocessed):
    model, _ = problem
    plans = {"configurations": {"3d_fullres": {"patch_size": [4, 6, 6]},
                                "3d_custom": {"inherits_from": "3d_fullres"},
                                "2d": {"patch_size": [6, 6]}}}
    assert configuration_dims(plans, "3d_custom") == 3 and configuration_dims(plans, "2d") == 2
    with pytest.raises(UserInputError, match="has no patch size"):
        configuration_dims({"configurations": {"x": {}}}, "x")
    assert sample_dims(model) == 3
    flat = LoadedModel(name="flat", folder="", network=None, num_classes=3, configuration="2d",
                       data_identifier="", dataset_name="", ignore_label=None, plans=plans,
                       dataset_json={})
    assert sample_dims(flat) == 2
    with pytest.raises(UserInputError, match=r"2D models \(flat\) are scored per slice and 3D "
                                             r"models \(tiny3d\) per case"):
        check_same_dims([flat, model])
    # The evaluator's loader routes a 3D model to whole cases.
    dataset, _, _ = preprocessed
    volumetric = LoadedModel(name="v", folder="", network=None, num_classes=3,
                             configuration="3d_fullres", data_identifier="nnUNetPlans_3d_fullres",
                             dataset_name=dataset.name, ignore_label=None, plans=plans,
                             dataset_json={})
    options = SimpleNamespace(images=None, labels=None, include_empty=False, max_slices=None,
                              nnunet_preprocessed=str(dataset.parent),
                              attack=AttackSettings(seed=0))
    samples = samples_by_model([volumetric], {"v": ["a", "empty", "b"]}, options)["v"]
    assert [(s.case, s.index) for s in samples] == [("a", WHOLE_CASE), ("b", WHOLE_CASE)]
    with pytest.raises(UserInputError, match="no test cases: the cases have no foreground"):
        samples_by_model([volumetric], {"v": ["empty"]}, options)


def test_the_digest_of_the_samples_covers_every_voxel(problem):
    _, samples = problem
    changed = [SliceSample(s.case, s.index, s.image.copy(), s.label) for s in samples]
    changed[-1].image[0, -1, -1, -1] += 1e-3
    assert slices_digest(changed) != slices_digest(samples)


# ------------------------------------------------------------- norms, losses and counts in 5-D

def _logits_and_labels(batch=2, classes=3, shape=(3, 5, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, classes, *shape), generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch, 1, *shape), generator=generator)
    return logits, labels


def test_norms_take_each_volume_whole():
    like = torch.zeros(3, 2, 4, 5, 6)
    eps = torch.tensor([0.5, 2.0, 7.0])
    generator = torch.Generator().manual_seed(0)
    start = random_in_ball(like, eps, "l2", generator)
    norms = per_sample_norm(start, "l2")
    assert (norms <= eps + 1e-6).all() and (norms > 0).all()
    # every voxel of every channel moves: the ball is the volume's, not a slice's
    assert (start != 0).float().mean() == 1
    linf = random_in_ball(like, eps, "linf", generator)
    assert (linf.flatten(1).abs().amax(1) <= eps).all()
    delta = torch.ones(3, 2, 4, 5, 6)
    projected = project(delta, eps, "l2")
    assert torch.allclose(per_sample_norm(projected, "l2"), eps)
    assert torch.allclose(project(delta, eps, "linf").flatten(1).amax(1),
                          torch.minimum(eps, torch.ones(3)))


def test_dice_ce_per_volume_equals_nnunets_loss_on_that_volume():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, labels = _logits_and_labels()
    nnunet = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                            {}, weight_ce=1, weight_dice=1, ignore_label=None,
                            dice_class=MemoryEfficientSoftDiceLoss)
    ours = PerSampleDiceCE()(logits, labels)
    assert ours.shape == (2,)
    for b in range(2):
        # nnU-Net's soft Dice builds its one-hot in float32: equal to float32 rounding
        assert ours[b].item() == pytest.approx(nnunet(logits[b:b + 1], labels[b:b + 1]).item(),
                                               abs=1e-6)


def test_every_attack_loss_is_a_mean_over_the_whole_volume():
    logits, labels = _logits_and_labels()
    ce = attack_loss("ce", None)(logits, labels)
    for b in range(2):
        assert ce[b].item() == pytest.approx(
            F.cross_entropy(logits[b:b + 1], labels[b:b + 1, 0]).item(), rel=1e-12)
    # With an ignore label the mean is over the scored voxels of the volume only.
    masked = labels.clone()
    masked[0, 0, 0] = 3
    scored = masked[:, 0] != 3
    pixel = F.cross_entropy(logits, torch.where(scored, masked[:, 0], 0), reduction="none")
    expected = (pixel * scored).flatten(1).sum(1) / scored.flatten(1).sum(1)
    assert torch.allclose(attack_loss("ce", 3)(logits, masked), expected)
    # Every loss: a volume's value does not depend on the other volume of the batch.
    for name in ("dc_ce", "ce", *SEA_LOSSES):
        loss = attack_loss(name, None)
        together = loss(logits, labels)
        alone = torch.cat([loss(logits[b:b + 1], labels[b:b + 1]) for b in range(2)])
        assert torch.allclose(together, alone), name
    assert torch.allclose(segpgd_loss(logits, labels, 0.25),
                          torch.cat([segpgd_loss(logits[b:b + 1], labels[b:b + 1], 0.25)
                                     for b in range(2)]))


def test_mask_ce_and_class_balance_by_hand_on_a_volume():
    logits, labels = _logits_and_labels(batch=1)
    y = labels[:, 0]
    correct = logits.argmax(1) == y
    pixel = F.cross_entropy(logits, y, reduction="none")
    assert SEA_LOSSES["mask_ce"](logits, labels).item() == pytest.approx(
        (pixel * correct).sum().item() / y.numel())
    weights = class_balance_weights(y, torch.ones_like(y, dtype=torch.bool), 3)
    counts = torch.bincount(y.flatten(), minlength=3).double()
    expected = 1 - counts[y] / y.numel()
    assert torch.allclose(weights, expected)


def test_counts_on_volumes_equal_nnunets_own():
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    generator = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 3, (2, 4, 5, 6), generator=generator)
    target = torch.randint(0, 4, (2, 4, 5, 6), generator=generator)  # 3: the ignore label
    tp, fp, fn = scored_counts(pred, target, 3, ignore_label=3)
    for b in range(2):
        ref, prediction = target[b].numpy(), pred[b].numpy()
        for k in (1, 2):
            counts = compute_tp_fp_fn_tn(ref == k, prediction == k, ignore_mask=ref == 3)[:3]
            assert (tp[b, k - 1], fp[b, k - 1], fn[b, k - 1]) == tuple(int(c) for c in counts)
    # without the ignore label: the plain counts of the volume
    clean = torch.where(target == 3, 0, target)
    tp, fp, fn = confusion_counts(pred, clean, 3)
    assert int(tp[0, 0]) == int(((pred[0] == 1) & (clean[0] == 1)).sum())
    assert slice_dice_from_counts(tp, fp, fn).shape == (2,)


# ---------------------------------------------------------------------- attacks on volumes

@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_every_attack_stays_in_each_volumes_ball_and_treats_volumes_apart(problem, attack, norm):
    model, samples = problem
    x = torch.from_numpy(np.stack([s.image for s in samples[:2]]))
    y = torch.from_numpy(np.stack([s.label for s in samples[:2]])[:, None].astype(np.int64))
    eps = torch.tensor([3.0, 6.0]) if norm == "l2" else torch.tensor([0.1, 0.3])
    loss = attack_loss("mask_ce" if attack == "apgd_sea" else "dc_ce", None)
    score = lambda logits, target: slice_dice_from_counts(  # noqa: E731
        *scored_counts(logits.argmax(1), target[:, 0], 3, None))

    def run(xs, ys, e):
        start = random_in_ball(xs, e, norm, torch.Generator().manual_seed(0))
        return run_attack(attack, model.network, xs, ys, e, start, norm=norm, steps=4, alpha=5.0,
                          loss=loss, score=score)
    adv = run(x, y, eps)
    assert adv.shape == x.shape
    assert (per_sample_norm(adv - x, norm) <= eps * (1 + 1e-5)).all()
    if attack in ("pgd", "apgd"):  # one volume alone from the same start: the same iterate
        start = random_in_ball(x, eps, norm, torch.Generator().manual_seed(0))
        alone = run_attack(attack, model.network, x[1:], y[1:], eps[1:], start[1:], norm=norm,
                           steps=4, alpha=5.0, loss=loss)
        assert torch.allclose(adv[1:], alone, atol=1e-5)
        with torch.no_grad():
            assert (loss(model.network(adv), y) > loss(model.network(x), y)).all()


def test_volumes_are_attacked_one_at_a_time_and_counted_per_case(problem):
    model, samples = problem
    calls = []
    network = model.network

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = network

        def forward(self, x):
            calls.append(x.shape[0])
            return self.inner(x)
    recording = LoadedModel(**{**model.__dict__, "network": Recording()})
    settings = AttackSettings(steps=3, batch_size=16, seed=0)
    assert batch_size_for(samples, 16) == 1
    results = evaluate_levels(recording, samples, [0.0, 4.0], settings, CPU)
    assert set(calls) == {1}
    clean = results[0.0]
    assert clean.cases == [s.case for s in samples] and clean.slices == [WHOLE_CASE] * 4
    with torch.no_grad():
        pred = network(torch.from_numpy(np.stack([s.image for s in samples]))).argmax(1)
    expected = confusion_counts(pred, torch.from_numpy(np.stack([s.label for s in samples])), 3)
    for got, want in zip((clean.tp, clean.fp, clean.fn), expected):
        np.testing.assert_array_equal(got, want.numpy())
    assert tvdi(clean.tp, clean.fp, clean.fn)[0] > 0.8
    attacked = results[4.0]
    assert tvdi(attacked.tp, attacked.fp, attacked.fn)[0] < tvdi(clean.tp, clean.fp, clean.fn)[0]
    # The same run again: the same counts (seeded per (noise, volume)).
    again = evaluate_levels(model, samples, [4.0], settings, CPU)[4.0]
    np.testing.assert_array_equal(again.tp, attacked.tp)


def test_the_example_is_the_slice_with_the_most_foreground(problem):
    model, samples = problem
    label = np.zeros((4, 3, 3), np.int16)
    label[1, 0, 0] = 1
    label[2, :2, :2] = 2
    label[3, :, :] = 3  # the ignore label counts as no foreground
    assert example_plane(label) == 3 and example_plane(label, ignore_label=3) == 2
    result = evaluate_levels(model, samples, [0.0, 2.0], AttackSettings(steps=2, seed=0), CPU)
    show = int(np.argmax([(s.label > 0).sum() for s in samples]))
    plane = example_plane(samples[show].label)
    for noise, r in result.items():
        example = r.example
        assert int(example["plane"]) == plane and str(example["case"]) == samples[show].case
        assert example["image"].shape == (1, *SHAPE[1:]) and example["label"].shape == SHAPE[1:]
        np.testing.assert_array_equal(example["label"], samples[show].label[plane])
        np.testing.assert_array_equal(example["image"], samples[show].image[:, plane])
        assert example["prediction"].shape == example["clean_prediction"].shape == SHAPE[1:]
    with torch.no_grad():
        clean = model.network(torch.from_numpy(samples[show].image[None])).argmax(1)[0]
    np.testing.assert_array_equal(result[2.0].example["clean_prediction"], clean[plane].numpy())


def test_preflight_checks_a_3d_model_on_one_volume(problem):
    model, samples = problem
    preflight_models([model], {model.name: samples}, AttackSettings(), CPU)

    class Probabilities(nn.Module):
        def forward(self, x):
            return model.network(x).softmax(1)
    bad = LoadedModel(**{**model.__dict__, "network": Probabilities()})
    with pytest.raises(UserInputError, match="probabilities"):
        preflight_models([bad], {bad.name: samples}, AttackSettings(), CPU)


# ------------------------------------------------------------------ nnU-Net's per-case Dice

def _result(tp, fp, fn, cases=("c0", "c1"), slices=(WHOLE_CASE, WHOLE_CASE)):
    return NoiseResult(list(cases), list(slices), np.array(tp), np.array(fp), np.array(fn), {})


def test_per_case_dice_follows_nnunets_summary_by_hand():
    # case c0: organ TP 3 FP 1 FN 1 (Dice 6/8), no lesion anywhere (NaN)
    # case c1: no organ anywhere (NaN), lesion only predicted (Dice 0)
    result = _result([[3, 0], [0, 0]], [[1, 0], [0, 2]], [[1, 0], [0, 0]])
    summary = nnunet_case_summary(result, ["organ", "lesion"])
    cases = summary["metric_per_case"]
    assert [c["case"] for c in cases] == ["c0", "c1"]
    assert cases[0]["metrics"]["organ"] == {"Dice": 0.75, "IoU": 0.6, "FP": 1, "TP": 3, "FN": 1,
                                            "n_pred": 4, "n_ref": 4}
    assert cases[0]["metrics"]["lesion"]["Dice"] is None  # nnU-Net's NaN
    assert cases[1]["metrics"]["organ"]["Dice"] is None
    assert cases[1]["metrics"]["lesion"]["Dice"] == 0.0
    # class means leave NaN cases out; the foreground mean averages the class means
    assert summary["mean"]["organ"]["Dice"] == 0.75 and summary["mean"]["lesion"]["Dice"] == 0.0
    assert summary["mean"]["organ"]["TP"] == 1.5
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.375)
    # a class absent everywhere has a NaN (null) mean and so does the foreground mean
    none = nnunet_case_summary(_result([[1, 0]], [[0, 0]], [[0, 0]], ["c0"], [WHOLE_CASE]),
                               ["organ", "lesion"])
    assert none["mean"]["lesion"]["Dice"] is None and none["foreground_mean"]["Dice"] is None
    json.dumps(summary, allow_nan=False)  # strict JSON


def test_summary_and_table_of_whole_cases_and_unchanged_slices():
    volume = {0.0: _result([[3, 0], [0, 0]], [[1, 0], [0, 2]], [[1, 0], [0, 0]]),
              2.0: _result([[1, 0], [0, 0]], [[3, 0], [0, 2]], [[3, 0], [0, 0]])}
    entry = summarise(volume, ["organ", "lesion"])
    level = entry["noise"]["2"]
    assert level["n_cases"] == 2 and level["n_slices"] == 2
    assert level["nnunet_per_case"]["metric_per_case"][0]["metrics"]["organ"]["Dice"] == 0.25
    # TVDI pools the cases' counts; ADI averages the cases' Dice (1 for a case without classes)
    assert level["tvdi"] == pytest.approx(((2 / 8) + 0.0) / 2)
    assert level["adi"] == pytest.approx((0.25 + 0.0) / 2)
    rows = per_slice_rows("m", volume, ["organ", "lesion"])
    assert rows[0]["slice"] == "volume" and rows[0]["case"] == "c0"
    assert rows[0]["nnunet_dice_organ"] == "0.750000" and rows[0]["nnunet_dice_lesion"] == "nan"
    assert rows[0]["dice_lesion"] == "1.000000"  # the evaluator's convention beside nnU-Net's
    summary = {"config": None, "models": {"m": entry}}
    assert "Each sample is a whole case" in markdown_table(summary, "tvdi", [0.0, 2.0])
    # Slices: the entry and rows are what they were.
    flat = {0.0: _result([[3, 0]], [[1, 0]], [[1, 0]], ["c0"], [4])}
    flat_entry = summarise(flat, ["organ", "lesion"])
    assert set(flat_entry["noise"]["0"]) == {"tvdi", "adi", "n_slices", "per_class"}
    assert set(per_slice_rows("m", flat, ["organ", "lesion"])[0]) == {
        "model", "noise", "case", "slice", "slice_dice", "dice_organ", "dice_lesion"}
    assert "whole case" not in markdown_table({"config": None, "models": {"m": flat_entry}},
                                              "tvdi", [0.0])


# ------------------------------------------------------------------ masking checks in 3D

def test_the_search_window_is_a_box_of_the_volume_and_a_square_of_a_slice():
    for query in (1, 5, 40, 300):
        side = _window_side(query, 500, 17, 23)
        assert window_sides(query, 500, (17, 23)) == (side, side)
    box = window_sides(0, 500, (16, 320, 320))
    assert box == (11, 214, 214)  # 0.3 of the voxels: each side times 0.3 ** (1/3) = 0.669
    assert abs(np.prod(box) / (16 * 320 * 320) - 0.3) < 0.02
    assert window_sides(499, 500, (4, 8, 8)) == (1, 1, 1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_search_on_volumes_stays_on_the_budget_and_raises_the_loss(problem, norm):
    model, samples = problem
    x = torch.from_numpy(np.stack([s.image for s in samples[:2]]))
    y = torch.from_numpy(np.stack([s.label for s in samples[:2]])[:, None].astype(np.int64))
    eps = 4.0 if norm == "l2" else 0.3
    loss = attack_loss("dc_ce", None)
    adv = random_search(model.network, x, y, eps, norm, loss, 30,
                        torch.Generator().manual_seed(0))
    assert torch.allclose(per_sample_norm(adv - x, norm), torch.full((2,), eps), rtol=1e-5)
    with torch.no_grad():
        assert (loss(model.network(adv), y) > loss(model.network(x), y)).all()


def test_masking_checks_run_on_volumes(problem):
    model, samples = problem
    attack = AttackSettings(steps=100, seed=0)  # the unbounded check runs the run's steps
    headline = evaluate_levels(model, samples, [0.0, 1.0, 3.0], attack, CPU)
    report = run_masking_checks(model, samples, headline, attack,
                                MaskingSettings(slices=2, queries=20), CPU)
    assert report.black_box["slices"] == 2 and report.unbounded["slices"] == 2
    assert report.unbounded["eps"] == pytest.approx(10.0 * np.sqrt(np.prod(SHAPE)))
    assert unbounded_budget(samples, "linf") == 10.0
    assert report.unbounded["tvdi"] < 0.05  # the targeted unbounded attack empties the volumes
    assert not report.monotonicity["fired"]


# ------------------------------------------------------------------- ensemble, parts, figure

def test_the_ensemble_on_volumes_is_never_above_a_member(problem):
    model, samples = problem
    levels = dict(iter_ensemble(model, samples, [0.0, 3.0], AttackSettings(steps=3, seed=0),
                                ("pgd", "apgd-js"), CPU))
    level = levels[3.0]
    worst_tvdi = tvdi(level.worst_tvdi.tp, level.worst_tvdi.fp, level.worst_tvdi.fn)[0]
    for member in level.members.values():
        assert worst_tvdi <= tvdi(member.tp, member.fp, member.fn)[0] + 1e-12
        assert level.worst.slice_dice.mean() <= member.slice_dice.mean() + 1e-12
    assert level.worst.slices == [WHOLE_CASE] * len(samples)


def test_parts_and_examples_png_of_volumes(problem, tmp_path):
    model, samples = problem
    results = evaluate_levels(model, samples, [0.0, 2.0], AttackSettings(steps=2, seed=0), CPU)
    path = str(tmp_path / "parts" / "p.npz")
    save_part(path, results[2.0])
    loaded = load_part(path, [s.key for s in samples])
    assert int(loaded.example["plane"]) == int(results[2.0].example["plane"])
    assert str(loaded.example["case"]) == str(results[2.0].example["case"])
    np.testing.assert_array_equal(loaded.tp, results[2.0].tp)
    plot_examples({"tiny3d": results}, [0.0, 2.0], str(tmp_path / "examples.png"))
    assert (tmp_path / "examples.png").stat().st_size > 0


def test_peak_memory_of_a_block_on_the_cpu():
    peaks = {}
    with measure_peak(CPU, peaks, "m"):
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB
        del block
    entry = peaks["m"]
    assert entry["device"] == "cpu" and entry["measure"] == "peak resident set size of the process"
    assert entry["bytes"] >= 64 * 2 ** 20 and entry["gib"] == round(entry["bytes"] / 2 ** 30, 3)


def test_peak_memory_on_cuda_is_the_allocators_peak_since_the_attacks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2 ** 30)
    peaks = {}
    cuda = torch.device("cuda", 0)
    with measure_peak(cuda, peaks, "m"):
        calls.append("attacks")
    assert calls == [("sync", cuda), ("reset", cuda), "attacks", ("sync", cuda)]
    assert peaks["m"] == {"bytes": 3 * 2 ** 30, "gib": 3.0, "device": "cuda:0",
                          "measure": "torch.cuda.max_memory_allocated",
                          "since": "start of the attacks"}
