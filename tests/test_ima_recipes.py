"""The two readings of IMA for segmentation (printed Algorithm 1, the authors' code): settings,
recipes, and what each does in a training step, against hand-computed answers."""
import json

import pytest
import torch
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.margins import MarginStore
from nnunet_ima.metrics import slice_dice_from_counts
from nnunet_ima.nnunet.data import SLICE_KEY
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.nnunet.settings import (CONFIG_ENV, RECIPES, TrainerSettings, resolve_settings,
                                       settings_from_dict, write_settings)
from nnunet_ima.nnunet.training_stats import EpochAccumulator
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
from nnunet_ima.trainers.variants.nnUNetTrainerIMA_authors import nnUNetTrainerIMA_authors
from nnunet_ima.trainers.variants.nnUNetTrainerIMA_eps15 import nnUNetTrainerIMA_eps15

# ----------------------------------------------------------------------------- settings


def test_every_recipe_sets_the_same_keys_and_validates():
    assert set(RECIPES["printed"]) == set(RECIPES["authors"])
    for name in RECIPES:
        s = settings_from_dict({"recipe": name})
        assert all(s.to_dict()[k] == v for k, v in RECIPES[name].items())


def test_defaults_equal_the_default_recipe():
    s = TrainerSettings()
    assert settings_from_dict({"recipe": s.recipe}) == s


def test_explicit_keys_override_the_recipe_and_both_are_recorded(tmp_path):
    s = settings_from_dict({"recipe": "authors", "adversarial_term": "crossed", "beta": 0.3})
    assert (s.recipe, s.adversarial_term, s.attack_slices, s.ima.beta) == \
        ("authors", "crossed", "all", 0.3)
    saved = json.loads(open(write_settings(s, str(tmp_path))).read())
    assert saved["recipe"] == "authors" and saved["adversarial_term"] == "crossed"
    # What was written loads back to the same settings (--c compares them).
    assert settings_from_dict(saved) == s


def test_a_recipe_in_the_file_replaces_the_class_default_recipe(tmp_path):
    path = tmp_path / "ima.json"
    path.write_text(json.dumps({"recipe": "printed"}))
    s = resolve_settings({"recipe": "authors", "eps_max": 15.0}, None, False,
                         {CONFIG_ENV: str(path)})
    assert s.recipe == "printed" and s.ima.eps_max == 15.0
    assert all(s.to_dict()[k] == v for k, v in RECIPES["printed"].items())


@pytest.mark.parametrize("values, message", [
    ({"recipe": "paper"}, "recipe must be one of ('printed', 'authors')"),
    ({"attack_slices": "some"}, "attack_slices must be one of"),
    ({"adversarial_term": "mean"}, "adversarial_term must be one of"),
    ({"adversarial_dice": "global"}, "adversarial_dice must be one of"),
    ({"dice_absent_class": 1}, "dice_absent_class must be one of"),
    ({"repeat_draws": "last"}, "repeat_draws must be one of"),
    ({"lr_schedule": "cosine"}, "lr_schedule must be one of"),
    ({"margin_growth_epochs": 0}, "growth_epochs must be an integer >= 1"),
    ({"start_point": "sphere"}, "start_point must be one of"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_dict(values, source="ima.json")


def test_margin_growth_epochs_sets_delta():
    printed = settings_from_dict({"recipe": "printed", "eps_max": 20.0, "num_epochs": 50})
    authors = settings_from_dict({"recipe": "authors", "eps_max": 20.0, "num_epochs": 50})
    assert printed.ima.resolved_delta(50) == pytest.approx(0.4)  # 20 / 50 epochs
    assert authors.ima.resolved_delta(50) == pytest.approx(2.0)  # 20 / 10
    explicit = settings_from_dict({"recipe": "authors", "eps_max": 20.0, "delta": 5.0})
    assert explicit.ima.resolved_delta(50) == 5.0


def test_files_written_before_recipes_keep_loading(tmp_path):
    """An ima_config.json of a run made before recipes existed (no new keys) continues as the
    printed recipe it followed, and a flat NNUNET_IMA_CONFIG file of that time still loads."""
    old = {"num_epochs": 4, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
           "save_every": 1, "initial_lr": 0.01, "seed": 0, "norm": "l2", "pgd_steps": 3,
           "pgd_alpha": 4.0, "random_start": True, "attack_outputs": "deep_supervision",
           "eps_max": 10.0, "delta": None, "beta": 0.5, "binary_steps": 3,
           "dice_threshold": 0.6, "dice_reduce": "mean", "margin_update": "average",
           "on_clean_wrong": "shrink", "clip_min": "zero", "boundary": "last_correct",
           "adv_eps": 15.0}
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "ima_config.json").write_text(json.dumps(old))
    s = resolve_settings({"recipe": "authors"}, str(fold), True, {})
    assert s.recipe == "printed" and s.adversarial_term == "crossed" and s.attack.steps == 3
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"eps_max": 15, "pgd_steps": 10, "num_epochs": 100}))
    s = resolve_settings({}, None, False, {CONFIG_ENV: str(flat)})
    assert (s.ima.eps_max, s.attack.steps, s.num_epochs) == (15, 10, 100)


def test_class_defaults_add_up_along_the_class_hierarchy():
    assert nnUNetTrainerIMA_authors.class_defaults()["recipe"] == "authors"
    merged = nnUNetTrainerIMA_eps15.class_defaults()
    assert merged["eps_max"] == 15.0
    assert merged.get("recipe") == nnUNetTrainerIMA.class_defaults().get("recipe")


# -------------------------------------------------------------- correctness and margins


def test_absent_class_rule_by_hand():
    # 2 slices x 2 foreground classes. Slice 0: class 1 perfect (tp 4), class 2 absent from
    # both. Slice 1: nothing anywhere (an empty slice, correctly left empty).
    tp = torch.tensor([[4, 0], [0, 0]])
    fp = torch.zeros_like(tp)
    fn = torch.zeros_like(tp)
    assert slice_dice_from_counts(tp, fp, fn, "mean", "one").tolist() == [1.0, 1.0]
    assert slice_dice_from_counts(tp, fp, fn, "mean", "zero").tolist() == [0.5, 0.0]
    assert slice_dice_from_counts(tp, fp, fn, "max", "zero").tolist() == [1.0, 0.0]
    # Class 1 half found (tp 2, fn 2: Dice 2*2 / (4 + 2) = 2/3), class 2 absent.
    tp, fn = torch.tensor([[2, 0]]), torch.tensor([[2, 0]])
    assert slice_dice_from_counts(tp, torch.zeros_like(tp), fn, "max", "zero").item() == \
        pytest.approx(2 / 3)


def test_empty_slice_is_never_correct_under_the_authors_rule():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 0] = 1.0  # predicts background everywhere
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    assert DiceThresholdCorrect(0.6, "mean", "one")(logits, target).tolist() == [True]
    assert DiceThresholdCorrect(0.6, "max", "zero")(logits, target).tolist() == [False]


def test_repeat_draws_rules_by_hand():
    """A slice drawn three times in one epoch: crossed at 2, not crossed, crossed at 4."""
    def store(rule):
        s = MarginStore(eps_max=20.0, delta=1.0, repeat_draws=rule, initial=8.0)
        s.record([("a", 0)] * 3, [True, False, True], [2.0, 0.0, 4.0], [True, True, True])
        # A second slice whose two draws both crossed, at 2 then at 4.
        s.record([("b", 0)] * 2, [True, True], [2.0, 4.0], [True, True])
        s.end_epoch()
        return s
    shrinks = store("cross_shrinks")
    assert shrinks.margin(("a", 0)) == pytest.approx((3.0 + 8.0) / 2)   # mean distance 3
    assert shrinks.margin(("b", 0)) == pytest.approx((3.0 + 8.0) / 2)
    expands = store("miss_expands")
    assert expands.margin(("a", 0)) == pytest.approx(9.0)                # a miss expands
    assert expands.margin(("b", 0)) == pytest.approx(((8.0 + 2.0) / 2 + 4.0) / 2)  # 4.5
    # The rule is saved with the margins and restored.
    assert MarginStore.from_state_dict(expands.state_dict()).repeat_draws == "miss_expands"


def test_old_margin_states_load_with_the_old_rule():
    state = MarginStore(eps_max=5.0, delta=1.0).state_dict()
    del state["repeat_draws"]
    assert MarginStore.from_state_dict(state).repeat_draws == "cross_shrinks"


# ----------------------------------------------------------------- the training step


class PixelValueNet(nn.Module):
    """Logits ``(background 0, foreground x)`` per pixel: a pixel is foreground while x > 0. An
    all-foreground 2x2 slice of value ``c`` falls below Dice 0.6 once 3 pixels flip, which takes
    an L2 perturbation between ``sqrt(3) c`` and ``2 c`` (PGD moves the 4 pixels alike)."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x], dim=1)


def _ima_trainer(recipe: str, **overrides) -> nnUNetTrainerIMA:
    """An nnUNetTrainerIMA with only what ``adversarial_batch`` reads (no nnU-Net set-up)."""
    trainer = nnUNetTrainerIMA.__new__(nnUNetTrainerIMA)
    s = settings_from_dict(dict({"recipe": recipe, "eps_max": 10.0, "delta": 1.0,
                                 "pgd_steps": 10, "binary_steps": 8, "beta": 0.5,
                                 # From x itself: the distances are then the geometry's alone.
                                 "random_start": False}, **overrides))
    trainer.ima_settings = s
    trainer.ima = s.ima
    trainer.margins = trainer.ima.make_margin_store(10)
    trainer.network = PixelValueNet()
    trainer.attack_loss = PerSampleDiceCE()
    trainer.is_correct = DiceThresholdCorrect(s.dice_threshold, s.dice_reduce, s.dice_absent_class)
    return trainer


def _four_slices():
    # Values 0.25 and 0.4 cross within the budget 1 (at L2 <= 0.5 and 0.8), 3 and 4 do not.
    x = torch.tensor([0.25, 0.4, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    y = torch.ones(4, 1, 2, 2, dtype=torch.long)
    batch = {"keys": ["c"] * 4, SLICE_KEY: [0, 1, 2, 3]}
    return x, y, batch


@pytest.mark.parametrize("recipe, rows, weight", [
    ("printed", 2, 0.5 * 2 / 4),   # the 2 crossed slices, weight beta * 2 / 4
    ("authors", 4, 0.5),           # all 4 attacked slices, weight beta
])
def test_adversarial_term_two_of_four_cross(recipe, rows, weight):
    torch.manual_seed(0)
    trainer = _ima_trainer(recipe)
    x, y, batch = _four_slices()
    clean = trainer.network(x)
    result = trainer.adversarial_batch(x, y, clean, batch)
    assert result.x.shape[0] == rows
    assert result.weight == pytest.approx(weight)
    assert result.evidence.crossed.tolist() == [True, True, False, False]
    assert result.evidence.attacked == 4
    # The crossed slices' points lie at their boundary: sqrt(3) c <= distance <= 2 c.
    for c, d in zip((0.25, 0.4), result.evidence.distance[:2].tolist()):
        assert 3 ** 0.5 * c - 0.01 <= d <= 2 * c + 0.01
    if recipe == "authors":
        # A slice that did not cross is trained on at its last PGD iterate, on its budget.
        moved = (x[2:] - result.x[2:]).flatten(1).norm(dim=1)
        assert moved.tolist() == pytest.approx([1.0, 1.0], abs=1e-4)


def test_attack_slices_all_attacks_clean_wrong_slices_too():
    # Slice 0 is wrong without attack.
    x = torch.tensor([-1.0, 0.25, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    y = torch.ones(4, 1, 2, 2, dtype=torch.long)
    batch = {"keys": ["c"] * 4, SLICE_KEY: [0, 1, 2, 3]}
    for attack_slices, attacked in (("correct", 3), ("all", 4)):
        trainer = _ima_trainer("printed", attack_slices=attack_slices)
        result = trainer.adversarial_batch(x, y, trainer.network(x), batch)
        assert result.evidence.attacked == attacked
        assert result.evidence.clean_correct.tolist() == [False, True, True, True]
        assert result.evidence.crossed_correct == 1  # only a clean-correct slice's crossing counts


def test_the_margins_change_in_the_end_of_epoch_hook_not_in_the_statistics():
    """Algorithm 2 runs once, in ``update_margins``; the statistics row only reads what it did."""
    trainer = _ima_trainer("printed")
    trainer.current_epoch, trainer._epoch_stats = 0, EpochAccumulator()
    x, y, batch = _four_slices()
    adversarial = trainer.adversarial_batch(x, y, trainer.network(x), batch)
    trainer.after_step(batch, adversarial, torch.zeros(0))
    assert trainer.margins.epoch == 0 and len(trainer.margins.pending_records()) == 4
    trainer.update_margins()
    assert trainer.margins.epoch == 1 and trainer.margins.pending_records() == {}
    margins = trainer.margins.state_dict()
    rows = [trainer.epoch_statistics() for _ in range(2)]
    assert trainer.margins.state_dict() == margins  # the statistics changed nothing
    for row in rows:  # 2 slices crossed and shrink, 2 did not and expand
        assert (row["slices_updated"], row["fraction_shrunk"], row["fraction_expanded"]) == \
            (4, 0.5, 0.5)


def test_start_on_the_sphere_of_the_given_radius_inside_the_ball():
    from nnunet_ima.attacks import run_pgd
    from nnunet_ima.norms import random_on_sphere
    x = torch.zeros(3, 1, 4, 4)
    y = torch.ones(3, 1, 4, 4, dtype=torch.long)
    # steps=0 returns the start point itself; a radius beyond the budget is cut to the budget.
    run = run_pgd(PixelValueNet(), x, y, torch.tensor([5.0, 5.0, 2.0]), steps=0,
                  loss=PerSampleDiceCE(), start_radius=torch.tensor([4.0, 1.0, 7.0]))
    assert run.x_adv.flatten(1).norm(dim=1).tolist() == pytest.approx([4.0, 1.0, 2.0], rel=1e-5)
    xi = random_on_sphere(torch.zeros(2, 7), torch.tensor([0.5, 3.0]), "linf")
    assert xi.abs().amax(dim=1).tolist() == pytest.approx([0.5, 3.0], rel=1e-6)


def test_ima_trainers_default_to_the_authors_recipe_and_the_baselines_keep_polys_schedule():
    """nnUNetTrainerIMA (and its eps variants) use the recipe the ablation chose; Clean and Adv
    keep nnU-Net's poly learning rate; the printed recipe stays one name away."""
    from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
    from nnunet_ima.trainers.nnUNetTrainerClean import nnUNetTrainerClean
    from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
    from nnunet_ima.trainers.variants.nnUNetTrainerIMA_eps25 import nnUNetTrainerIMA_eps25
    from nnunet_ima.trainers.variants.nnUNetTrainerIMA_printed import nnUNetTrainerIMA_printed

    def resolved(cls):
        return settings_from_dict(cls.class_defaults())
    for cls in (nnUNetTrainerIMA, nnUNetTrainerIMA_eps25):
        s = resolved(cls)
        assert all(s.to_dict()[k] == v for k, v in RECIPES["authors"].items()), cls.__name__
    assert resolved(nnUNetTrainerIMA_eps25).ima.eps_max == 25.0
    # delta = eps_max / 10 under the authors' margin growth: 2.5 for the paper's Heart eps_max.
    assert resolved(nnUNetTrainerIMA_eps25).ima.resolved_delta(50) == pytest.approx(2.5)
    printed = resolved(nnUNetTrainerIMA_printed)
    assert all(printed.to_dict()[k] == v for k, v in RECIPES["printed"].items())
    for cls in (nnUNetTrainerClean, nnUNetTrainerAdv):
        assert resolved(cls).lr_schedule == "poly"
