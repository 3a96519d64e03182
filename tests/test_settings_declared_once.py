"""The attack and IMA settings are declared once: files written before keep loading, the flat
keys map to the composed parts, the classification options come from the declarations, and
the settings are frozen."""
import ast
import dataclasses
import importlib
import json
import os
import shutil

import pytest
import torch

from nnunet_ima.classification.cli import build_parser, config_from_args, main
from nnunet_ima.classification.datasets import load_moons
from nnunet_ima.classification.models import moons_mlp
from nnunet_ima.classification.settings import TrainConfig
from nnunet_ima.classification.training import LATEST, Trainer
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.declared import (METADATA_KEY, FlatKeys, InvalidSetting, declaration,
                                 flag_name)
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.settings import (CONFIG_ENV, CONFIG_FILENAME, KEYS_SINCE_0_1,
                                        TrainerSettings, resolve_settings, settings_from_dict)

DATA = os.path.join(os.path.dirname(__file__), "data", "settings_v0_1")
# The keys a config.json of version 0.1 lacks, at their defaults.
NEW_CLASSIFICATION_KEYS = {"boundary": "last_correct", "repeat_draws": "cross_shrinks",
                           "growth_epochs": None}
# The keys an ima_config.json of version 0.1 lacks (fine-tuning), at their defaults.
NEW_TRAINER_KEYS = {"finetune_from": None, "lr_warmup_epochs": 0}


def _load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


# ------------------------------------------------------------- nnU-Net trainer settings
@pytest.mark.parametrize("name", ["ima_config_adv.json", "ima_config_authors.json"])
def test_saved_trainer_settings_load_to_the_same_flat_dict(name):
    saved = _load(name)
    assert settings_from_dict(saved).to_dict() == {**saved, **NEW_TRAINER_KEYS}


def test_continuing_a_saved_run_reuses_its_file(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    shutil.copy(os.path.join(DATA, "ima_config_authors.json"), fold / CONFIG_FILENAME)
    saved = _load("ima_config_authors.json")
    # nnUNetTrainerIMA's class defaults ({"recipe": "authors"}) under --c: the file wins.
    s = resolve_settings({"recipe": "authors"}, str(fold), True, {})
    assert s.to_dict() == {**saved, **NEW_TRAINER_KEYS}
    assert (s.attack.steps, s.ima.eps_max, s.ima.boundary, s.ima.growth_epochs) == \
        (3, 20.0, "midpoint", 10)
    assert s.ima.resolved_delta(s.num_epochs) == pytest.approx(2.0)  # 20 / 10 growth epochs
    # --c with NNUNET_IMA_CONFIG naming the same settings is fine; other settings are refused.
    same = tmp_path / "same.json"
    same.write_text(json.dumps(saved))
    assert resolve_settings({}, str(fold), True, {CONFIG_ENV: str(same)}) == s
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**saved, "pgd_steps": 4}))
    with pytest.raises(UserInputError, match=r"differ .* in \['pgd_steps'\]"):
        resolve_settings({}, str(fold), True, {CONFIG_ENV: str(other)})


def test_a_users_settings_file_of_version_0_1_still_applies():
    env = {CONFIG_ENV: os.path.join(DATA, "nnunet_ima_config_env.json")}
    s = resolve_settings({}, None, False, env)
    assert (s.recipe, s.ima.eps_max, s.attack.steps, s.ima.beta, s.ima.on_clean_wrong) == \
        ("authors", 15, 10, 0.4, "reset")
    # The authors recipe's IMA keys reach the IMA part.
    assert (s.ima.boundary, s.ima.repeat_draws, s.ima.growth_epochs) == \
        ("midpoint", "miss_expands", 10)
    assert s.ima.resolved_delta(50) == pytest.approx(1.5)  # 15 / 10
    assert (s.attack.norm, s.attack.alpha, s.attack_slices) == ("l2", 4.0, "all")


def test_trainer_settings_write_the_keys_of_version_0_1_and_the_new_ones():
    assert set(TrainerSettings().to_dict()) == \
        set(_load("ima_config_adv.json")) | set(NEW_TRAINER_KEYS)
    assert set(KEYS_SINCE_0_1) == set(NEW_TRAINER_KEYS)
    # Their defaults are what the runs of version 0.1 did: no fine-tuning, no warmup.
    assert {k: TrainerSettings().to_dict()[k] for k in NEW_TRAINER_KEYS} == NEW_TRAINER_KEYS


@pytest.mark.parametrize("values, message", [
    ({"pgd_steps": 0}, "f.json: pgd_steps must be an integer >= 1, got 0"),
    ({"num_val_iterations_per_epoch": 0},
     "f.json: num_val_iterations_per_epoch must be an integer >= 1, got 0"),
    ({"pgd_alpha": -1.0}, "f.json: pgd_alpha must be a finite number > 0, got -1.0"),
    ({"margin_growth_epochs": 0}, "f.json: margin_growth_epochs must be an integer >= 1, got 0"),
    ({"eps_max": 2.0, "delta": 3.0}, "f.json: delta (3.0) must not exceed eps_max (2.0)"),
    ({"random_start": "yes"}, "f.json: random_start must be true or false, got 'yes'"),
    ({"steps": 3}, "f.json: unknown trainer option(s) ['steps']"),
    ({"ima": {}}, "f.json: unknown trainer option(s) ['ima']"),
])
def test_errors_name_the_flat_key(values, message):
    with pytest.raises(UserInputError) as e:
        settings_from_dict(values, source="f.json")
    assert str(e.value).startswith(message)


def test_flat_keys_reach_their_part():
    s = settings_from_dict({"pgd_steps": 7, "margin_growth_epochs": 4, "eps_max": 8.0})
    assert (s.attack.steps, s.ima.growth_epochs, s.ima.eps_max) == (7, 4, 8.0)
    assert s.ima.resolved_delta(100) == pytest.approx(2.0)  # 8 / 4
    # The parts keep their other values (the defaults here).
    assert (s.attack.alpha, s.ima.beta) == (4.0, 0.5)


# ----------------------------------------------------------- classification run configs
@pytest.mark.parametrize("name", ["config_adv.json", "config_ima.json", "config_trades.json"])
def test_saved_run_configs_load_and_gain_only_the_new_keys(name):
    saved = _load(name)
    assert TrainConfig.from_dict(saved).to_dict() == {**saved, **NEW_CLASSIFICATION_KEYS}


def test_saved_run_configs_fill_the_parts():
    ima = TrainConfig.from_dict(_load("config_ima.json"))
    assert (ima.attack.norm, ima.ima.eps_max, ima.ima.beta) == ("linf", 0.3, 0.6)
    assert ima.ima.resolved_delta(ima.epochs) == pytest.approx(0.01)  # 0.3 / 30 epochs
    adv = TrainConfig.from_dict(_load("config_adv.json"))
    assert (adv.ima, adv.eps, adv.attack.steps) == (None, 5.0, 20)


def _train_args(tmp_path, *flags):
    return build_parser().parse_args(["train", "-o", str(tmp_path / "run"), *flags])


@pytest.mark.parametrize("name, flags", [
    ("config_ima.json", ["--dataset", "moons", "--method", "ima", "--norm", "linf",
                         "--beta", "0.6"]),
    ("config_trades.json", ["--dataset", "moons", "--method", "trades", "--trades-beta", "3"]),
])
def test_a_run_of_version_0_1_resumes_with_the_same_flags(tmp_path, name, flags):
    """The checkpoint's config is compared as `train` compares it when it resumes."""
    saved = _load(name)
    config = config_from_args(_train_args(tmp_path, *flags))
    assert config.differences(TrainConfig.from_dict(saved)) == []
    data = load_moons(0, sizes=(64, 8, 8))
    out = tmp_path / "run"
    out.mkdir()
    first = Trainer(config, data, moons_mlp(), str(out), torch.device("cpu"), progress=False)
    first.epoch = 3
    torch.save({**first.state(), "config": saved}, out / LATEST)  # as version 0.1 saved it
    (out / "config.json").write_text(json.dumps(saved))
    resumed = Trainer(config, data, moons_mlp(), str(out), torch.device("cpu"), progress=False)
    resumed.load_checkpoint(str(out / LATEST))
    assert resumed.epoch == 3
    # Other flags are still refused, naming the key.
    other = config_from_args(_train_args(tmp_path, *flags, "--pgd-steps", "5"))
    refused = Trainer(other, data, moons_mlp(), str(out), torch.device("cpu"), progress=False)
    with pytest.raises(UserInputError, match="pgd_steps: 20 != 5"):
        refused.load_checkpoint(str(out / LATEST))


def test_new_ima_flags_reach_the_config(tmp_path):
    config = config_from_args(_train_args(tmp_path, "--dataset", "moons", "--boundary",
                                          "midpoint", "--repeat-draws", "miss_expands",
                                          "--growth-epochs", "5"))
    assert (config.ima.boundary, config.ima.repeat_draws, config.ima.growth_epochs) == \
        ("midpoint", "miss_expands", 5)
    assert config.ima.resolved_delta(config.epochs) == pytest.approx(0.06)  # 0.3 / 5
    flat = config.to_dict()
    assert (flat["boundary"], flat["repeat_draws"], flat["growth_epochs"]) == \
        ("midpoint", "miss_expands", 5)
    assert TrainConfig.from_dict(flat) == config


def test_eps_max_defaults_to_the_papers_for_the_dataset(tmp_path):
    for dataset, eps_max in (("moons", 0.3), ("digits", 2.0)):
        config = config_from_args(_train_args(tmp_path, "--dataset", dataset))
        assert config.ima.eps_max == eps_max
    given = config_from_args(_train_args(tmp_path, "--dataset", "digits", "--eps-max", "1.5"))
    assert given.ima.eps_max == 1.5
    adv = config_from_args(_train_args(tmp_path, "--dataset", "digits", "--method", "adv",
                                       "--eps", "1", "--eps-max", "1.5"))
    assert adv.ima is None and adv.to_dict()["eps_max"] is None


def test_binary_steps_is_imas_or_mmas(tmp_path):
    mma = config_from_args(_train_args(tmp_path, "--dataset", "moons", "--method", "mma",
                                       "--binary-steps", "4", "--beta", "0.7"))
    assert (mma.ima, mma.mma_binary_steps) == (None, 4)
    flat = mma.to_dict()
    # IMA's keys of a run without IMA are the defaults; binary_steps is MMA's.
    assert (flat["binary_steps"], flat["beta"], flat["eps_max"]) == (4, 0.5, None)
    assert "mma_binary_steps" not in flat
    assert TrainConfig.from_dict(flat) == mma
    ima = config_from_args(_train_args(tmp_path, "--dataset", "moons", "--binary-steps", "4"))
    assert (ima.ima.binary_steps, ima.to_dict()["binary_steps"]) == (4, 4)


@pytest.mark.parametrize("flags, message", [
    (["--pgd-steps", "0"], "--pgd-steps must be an integer >= 1, got 0"),
    (["--growth-epochs", "0"], "--growth-epochs: growth_epochs must be an integer >= 1, got 0"),
    (["--delta", "0.5"], "--delta: delta (0.5) must not exceed eps_max (0.3)"),
    (["--method", "gairat", "--pgd-steps", "1"], "--method gairat needs --pgd-steps >= 2"),
])
def test_config_errors_name_the_option(tmp_path, flags, message):
    with pytest.raises(UserInputError) as e:
        config_from_args(_train_args(tmp_path, "--dataset", "moons", *flags))
    assert str(e.value).startswith(message)


def test_config_json_errors_name_the_key():
    with pytest.raises(UserInputError, match=r"config.json: pgd_steps must be an integer >= 1"):
        TrainConfig.from_dict({**_load("config_adv.json"), "pgd_steps": 0})
    with pytest.raises(UserInputError, match=r"unknown keys \['steps'\]"):
        TrainConfig.from_dict({**_load("config_adv.json"), "steps": 3})


# ----------------------------------------------------------------- generated options
# Written out by hand: the dataclasses' defaults and the modules' choices.
EXPECTED_OPTIONS = {
    "--norm": ("l2", ("l2", "linf"), None),
    "--pgd-steps": (20, None, int),
    "--pgd-alpha": (4.0, None, float),
    "--eps-max": (None, None, float),
    "--delta": (None, None, float),
    "--beta": (0.5, None, float),
    "--binary-steps": (10, None, int),
    "--margin-update": ("average", ("average", "replace"), None),
    "--on-clean-wrong": ("shrink", ("shrink", "reset"), None),
    "--clip-min": ("zero", ("zero", "delta"), None),
    "--boundary": ("last_correct", ("last_correct", "midpoint"), None),
    "--repeat-draws": ("cross_shrinks", ("cross_shrinks", "miss_expands"), None),
    "--growth-epochs": (None, None, int),
}


def _options(command):
    """``{option string: argparse action}`` of one subcommand."""
    subcommands = build_parser()._subparsers._group_actions[0]
    return {o: a for a in subcommands.choices[command]._actions for o in a.option_strings}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_generated_options_have_the_declared_defaults_and_choices(command):
    options = _options(command)
    for flag, (default, choices, kind) in EXPECTED_OPTIONS.items():
        action = options[flag]
        assert action.default == default, flag
        assert (tuple(action.choices) if action.choices else None) == choices, flag
        assert action.type is kind, flag


def test_generated_options_follow_the_declarations(monkeypatch):
    """Change a declaration and the option changes: they are generated, not written twice."""
    field = next(f for f in dataclasses.fields(IMAConfig) if f.name == "beta")
    monkeypatch.setattr(field, "default", 0.25)
    assert _options("train")["--beta"].default == 0.25


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_run_options_follow_trainconfigs_declarations(monkeypatch, command):
    """TrainConfig's own fields make their options too: no default is written twice."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "trades_beta")
    monkeypatch.setattr(field, "default", 2.5)
    options = _options(command)
    assert options["--trades-beta"].default == 2.5
    assert options["--trades-beta"].help == declaration(TrainConfig, "trades_beta").help
    assert (options["--lr"].default, options["--moons-noise"].type, options["--seed"].type) == \
        (TrainConfig.__dataclass_fields__["lr"].default, float, int)
    assert tuple(options["--model"].choices) == declaration(TrainConfig, "model").choices
    assert options["--epochs"].default is None  # the paper's for the dataset


def test_a_methods_own_settings_are_checked_in_its_runs(tmp_path):
    """validate() checks TrainConfig's fields by their declared rules, a field of one method
    (``ddn_gamma``) only in a run of that method, as before the rules were declared."""
    ce = config_from_args(_train_args(tmp_path, "--dataset", "moons", "--method", "ce",
                                      "--ddn-gamma", "2"))
    assert ce.ddn_gamma == 2
    for flags, message in (
            (["--method", "ddn", "--ddn-gamma", "2"], "--ddn-gamma must lie strictly between"),
            (["--method", "mma", "--binary-steps", "-1"],
             "--binary-steps: binary_steps must be an integer >= 0, got -1"),
            (["--max-train", "0"], "--max-train must be an integer >= 1, got 0")):
        with pytest.raises(UserInputError) as e:
            config_from_args(_train_args(tmp_path, "--dataset", "moons", *flags))
        assert str(e.value).startswith(message)


def test_help_shows_the_declared_help_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--boundary {last_correct,midpoint}" in out
    assert f"ima: {declaration(IMAConfig, 'beta').help} (default: 0.5)" in out
    assert "(default: the paper's for the dataset: moons 0.3, fashion-mnist 5" in out


@pytest.mark.parametrize("flags, message", [
    (["--boundary", "middle"], "argument --boundary: invalid choice: 'middle'"),
    (["--norm", "l1"], "argument --norm: invalid choice: 'l1'"),
    (["--growth-epochs", "ten"], "argument --growth-epochs: invalid int value: 'ten'"),
])
def test_a_bad_option_is_refused_with_exit_code_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "moons", "-o", str(tmp_path / "x"), *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- declarations
def test_every_attack_and_ima_field_is_declared():
    for cls in (AttackConfig, IMAConfig):
        for f in dataclasses.fields(cls):
            assert declaration(cls, f.name).help, f"{cls.__name__}.{f.name}"
    assert declaration(AttackConfig, "norm").choices == ("l2", "linf")
    assert declaration(IMAConfig, "clip_min").choices == ("zero", "delta")


def test_invalid_setting_is_spelled_and_renamed():
    e = InvalidSetting("growth_epochs", "must not exceed {eps_max}, got {'a': 1}")
    assert str(e) == "growth_epochs must not exceed eps_max, got {'a': 1}"
    assert e.spelled(flag_name) == "--growth-epochs must not exceed --eps-max, got {'a': 1}"
    renamed = e.renamed(lambda name: {"growth_epochs": "margin_growth_epochs"}.get(name, name))
    assert str(renamed) == "margin_growth_epochs must not exceed eps_max, got {'a': 1}"
    assert renamed.spelled(str.upper) == \
        "MARGIN_GROWTH_EPOCHS must not exceed EPS_MAX, got {'a': 1}"


@pytest.mark.parametrize("make, field, value", [
    (lambda: AttackConfig(), "steps", 3),
    (lambda: IMAConfig(eps_max=1.0), "beta", 0.2),
    (lambda: TrainerSettings(), "ima", IMAConfig(eps_max=2.0)),
    (lambda: TrainerSettings(), "num_epochs", 3),
    (lambda: TrainConfig.from_dict(_load("config_ima.json")), "attack", AttackConfig()),
])
def test_settings_are_frozen(make, field, value):
    settings = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, field, value)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FOLDERS = {"nnunet_ima": "nnunet_ima", "evaluation": "nnunet_ima.evaluation"}


def _imports_of_each_module():
    """``{module: the modules and names it imports}`` for the package's sources, read without
    importing them (evaluation/ installs as nnunet_ima.evaluation)."""
    imports = {}
    for folder, package in SOURCE_FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            for name in (n for n in files if n.endswith(".py")):
                with open(os.path.join(dirpath, name)) as f:
                    tree = ast.parse(f.read())
                names = set()
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module:
                        names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                    elif isinstance(node, ast.Import):
                        names |= {a.name for a in node.names}
                imports[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = names
    return imports


def _is_settings(cls, module) -> bool:
    """Declares a field with ``setting()``, or composes parts that a ``FlatKeys`` of its module
    describes (``TrainerSettings``, ``TrainConfig``)."""
    if any(METADATA_KEY in f.metadata for f in dataclasses.fields(cls)):
        return True
    names = {f.name for f in dataclasses.fields(cls)}
    return any(isinstance(obj, FlatKeys) and set(obj.parts) <= names
               for obj in vars(module).values())


def settings_dataclasses():
    """Every settings dataclass (see nnunet_ima.declared), found in the modules that import
    nnunet_ima.declared, so that a new one is covered without being listed here."""
    found = []
    for name, imports in sorted(_imports_of_each_module().items()):
        if "nnunet_ima.declared" in imports:
            module = importlib.import_module(name)
            found += [obj for obj in vars(module).values()
                      if isinstance(obj, type) and dataclasses.is_dataclass(obj)
                      and obj.__module__ == name and _is_settings(obj, module)]
    return found


SETTINGS_DATACLASSES = settings_dataclasses()


def test_the_settings_dataclasses_are_found():
    assert {AttackConfig, IMAConfig, TrainerSettings, TrainConfig} <= set(SETTINGS_DATACLASSES)


@pytest.mark.parametrize("cls", SETTINGS_DATACLASSES, ids=lambda c: c.__name__)
def test_every_settings_dataclass_is_frozen(cls):
    # Without __init__: its checks need valid values, a frozen class refuses any assignment.
    settings = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, f.name, None)
