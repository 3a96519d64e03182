"""Trainer settings: defaults, variants, the NNUNET_IMA_CONFIG file, continuing a run."""
import json

import pytest

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.settings import (CONFIG_ENV, TrainerSettings, resolve_settings,
                                       settings_from_dict, write_settings)


def test_defaults_are_the_papers_protocol():
    s = TrainerSettings()
    assert (s.num_epochs, s.num_iterations_per_epoch) == (50, 50)
    assert (s.ima.eps_max, s.attack.norm, s.attack.steps, s.attack.alpha, s.ima.binary_steps) == \
        (25.0, "l2", 20, 4.0, 10)
    assert (s.ima.beta, s.dice_threshold, s.ima.margin_update) == (0.5, 0.6, "average")
    assert s.ima.resolved_delta(s.num_epochs) == pytest.approx(0.5)  # 25 / 50


def _env_file(tmp_path, values):
    path = tmp_path / "ima.json"
    path.write_text(json.dumps(values))
    return {CONFIG_ENV: str(path)}


def test_file_overrides_variant_defaults(tmp_path):
    env = _env_file(tmp_path, {"pgd_steps": 3, "num_epochs": 4})
    s = resolve_settings({"eps_max": 15.0}, str(tmp_path / "fold"), False, env)
    assert (s.ima.eps_max, s.attack.steps, s.num_epochs) == (15.0, 3, 4)
    assert s.ima.make_margin_store(s.num_epochs).initial == pytest.approx(15.0 / 4)


@pytest.mark.parametrize("values, message", [
    ({"epochs": 3}, "unknown trainer option(s) ['epochs']"),
    ({"eps_max": -1}, "eps_max must be a finite number > 0"),
    ({"eps_max": 0}, "eps_max must be a finite number > 0"),
    ({"dice_threshold": 0}, "dice_threshold must lie strictly between 0 and 1"),
    ({"dice_threshold": 1.0}, "dice_threshold must lie strictly between 0 and 1"),
    ({"norm": "l1"}, "norm must be one of"),
    ({"delta": 30.0}, "delta (30.0) must not exceed eps_max"),
    ({"pgd_steps": 0}, "pgd_steps must be an integer >= 1"),
    ({"beta": 1.5}, "beta must be in [0, 1]"),
    ({"margin_update": "halve"}, "margin_update must be one of"),
])
def test_bad_values_name_the_problem(tmp_path, values, message):
    with pytest.raises(UserInputError) as e:
        resolve_settings({}, None, False, _env_file(tmp_path, values))
    assert message in str(e.value)
    assert "ima.json" in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_settings({}, None, False, {CONFIG_ENV: str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{eps_max: 3")
    with pytest.raises(UserInputError, match="not valid JSON"):
        resolve_settings({}, None, False, {CONFIG_ENV: str(bad)})
    bad.write_text("[1, 2]")
    with pytest.raises(UserInputError, match="JSON object"):
        resolve_settings({}, None, False, {CONFIG_ENV: str(bad)})


def test_continuing_reuses_or_checks_the_saved_settings(tmp_path):
    fold = tmp_path / "fold_0"
    saved = settings_from_dict({"eps_max": 10.0, "num_epochs": 3})
    write_settings(saved, str(fold))
    # --c without the variable: the saved settings, not the class defaults.
    assert resolve_settings({}, str(fold), True, {}) == saved
    # --c with the same file content: fine; with a different one: an error naming the keys.
    assert resolve_settings({}, str(fold), True,
                            _env_file(tmp_path, {"eps_max": 10.0, "num_epochs": 3})) == saved
    with pytest.raises(UserInputError, match=r"differ .* in \['eps_max'\]"):
        resolve_settings({}, str(fold), True, _env_file(tmp_path, {"eps_max": 12.0, "num_epochs": 3}))
    # A new run (no --c) ignores what an earlier run saved.
    assert resolve_settings({}, str(fold), False, {}) == TrainerSettings()


def test_epoch_accumulator_means():
    from nnunet_ima.nnunet.training_stats import EpochAccumulator
    acc = EpochAccumulator()
    # IMA-like steps: 4 samples, 3 attacked, 1 crossed whose boundary point has Dice 0.7.
    acc.add([1.0, 0.9, 0.8, 0.1], 3, [0.7], attacked=3, crossed=1, attack_seconds=1.0,
            step_seconds=2.0)
    acc.add([0.5, 0.5, 0.5, 0.5], 0, [], attacked=0, crossed=0, attack_seconds=0.0,
            step_seconds=1.0)
    s = acc.summary()
    assert s["clean_dice"] == pytest.approx(4.8 / 8)
    assert s["fraction_clean_correct"] == pytest.approx(3 / 8)
    assert s["adv_dice"] == pytest.approx(0.7)
    assert s["fraction_crossed"] == pytest.approx(1 / 3)
    assert (s["attack_seconds"], s["step_seconds"]) == (1.0, 3.0)


@pytest.mark.parametrize("value, expected", [(None, False), ("t", True), ("TRUE", True),
                                             ("1", True), ("f", False)])
def test_torch_compile_is_off_unless_nnUNet_compile_asks_for_it(monkeypatch, value, expected):
    """nnU-Net compiles on CUDA when nnUNet_compile is unset; the IMA trainers only on request."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ima.trainers.nnUNetTrainerClean import nnUNetTrainerClean
    from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA

    if value is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", value)
    for cls in (nnUNetTrainerClean, nnUNetTrainerIMA):
        trainer = cls.__new__(cls)  # _do_i_compile reads the device and the environment only
        trainer.device = torch.device("cuda")
        assert trainer._do_i_compile() is expected
    plain = nnUNetTrainer.__new__(nnUNetTrainer)
    plain.device = torch.device("cuda")
    assert plain._do_i_compile() is (value is None or expected)  # nnU-Net's own default: on
