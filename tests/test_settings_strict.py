"""Settings mean one thing: a key the chosen trainer does not read is refused (naming the
trainers that read it), a named variant refuses another value of the setting its name fixes, a
key given twice is refused, and a bad NNUNET_IMA_CONFIG path says what is wrong with it -- in
``resolve_settings`` (what ``nnUNetv2_train`` calls) and in ``nnunet-ima check-config`` alike.

The declaration of who reads which key (``READ_BY``) is checked against what the trainers' code
really reads: their hooks run on a tiny network while every read of a settings field is recorded.
"""
import builtins
import json
import os
import re
import shutil
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_ima.cli import main
from nnunet_ima.commands.check_config import _trainer_names, trainer_class
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.data import SLICE_KEY
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.nnunet.settings import (ADV, CLEAN, CONFIG_ENV, CONFIG_FILENAME, FAMILIES,
                                        FLAT_KEYS, IMA, READ_BY, RECIPES, TrainerSettings,
                                        fixed_by_name, read_config_file, resolve_settings,
                                        settings_for_trainer, settings_from_dict, trainer_family,
                                        write_settings)
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
from nnunet_ima.trainers.nnUNetTrainerClean import nnUNetTrainerClean
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
from nnunet_ima.trainers.variants.nnUNetTrainerAdv_eps15 import nnUNetTrainerAdv_eps15
from nnunet_ima.trainers.variants.nnUNetTrainerIMA_eps15 import nnUNetTrainerIMA_eps15

DATA = os.path.join(os.path.dirname(__file__), "data", "settings_v0_1")
# The keys an ima_config.json of version 0.1 lacks, at the defaults its runs trained with.
NEW_TRAINER_KEYS = {"finetune_from": None, "lr_warmup_epochs": 0}
VARIANTS = sorted(n for n in _trainer_names() if "_" in n[len("nnUNetTrainer"):])
TRAINERS = {CLEAN: nnUNetTrainerClean, ADV: nnUNetTrainerAdv, IMA: nnUNetTrainerIMA}


def _file(tmp_path, content, name="ima.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _resolve(tmp_path, trainer, content, output_folder=None, continuing=False):
    """What ``nnUNetv2_train -tr TRAINER`` resolves with ``content`` as NNUNET_IMA_CONFIG."""
    return resolve_settings(trainer.class_defaults(), output_folder, continuing,
                            {CONFIG_ENV: _file(tmp_path, content)}, trainer=trainer)


def _check_config(capsys, *args):
    """``nnunet-ima check-config ARGS``: (exit code, stdout, the stderr lines)."""
    code = main(["check-config", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _refused(capsys, *args):
    """check-config's one error line for a refused file (exit 2, nothing on stdout)."""
    code, out, err = _check_config(capsys, *args)
    assert (code, out, len(err)) == (2, "", 1), (code, out, err)
    assert err[0].startswith("nnunet-ima check-config: error: ")
    return err[0]


# -------------------------------------------------------------------- rule 1: keys read
def _reads(family):
    return {k for k, families in READ_BY.items() if family in families}


def test_the_families_read_what_the_issue_says():
    clean, adv, ima = _reads(CLEAN), _reads(ADV), _reads(IMA)
    assert {"num_epochs", "seed", "initial_lr", "lr_schedule"} <= clean
    assert clean < adv and adv - clean >= {"adv_eps", "pgd_steps", "norm", "dice_threshold"}
    assert "adv_eps" not in ima and "recipe" in ima and (adv - {"adv_eps"}) < ima
    assert "eps_max" not in adv and "recipe" not in adv
    assert set(READ_BY) == set(FLAT_KEYS.known(TrainerSettings))
    for cls in [nnUNetTrainerClean, nnUNetTrainerAdv, nnUNetTrainerIMA]:
        assert trainer_family(cls) == cls.__name__
    assert trainer_family(nnUNetTrainerAdv_eps15) == ADV
    assert trainer_family(nnUNetTrainerIMA_eps15) == IMA


@pytest.mark.parametrize("trainer, key, readers", [
    (nnUNetTrainerAdv, "eps_max", "nnUNetTrainerIMA"),
    (nnUNetTrainerAdv, "recipe", "nnUNetTrainerIMA"),
    (nnUNetTrainerAdv_eps15, "attack_slices", "nnUNetTrainerIMA"),
    (nnUNetTrainerClean, "pgd_steps", "nnUNetTrainerAdv and nnUNetTrainerIMA"),
    (nnUNetTrainerClean, "adv_eps", "nnUNetTrainerAdv"),
    (nnUNetTrainerIMA, "adv_eps", "nnUNetTrainerAdv"),
    (nnUNetTrainerIMA_eps15, "adv_eps", "nnUNetTrainerAdv"),
])
def test_a_key_the_trainer_does_not_read_is_refused_naming_its_readers(tmp_path, capsys, trainer,
                                                                       key, readers):
    value = TrainerSettings().to_dict()[key]  # even the default value: the key is not read
    with pytest.raises(UserInputError) as e:
        _resolve(tmp_path, trainer, {key: value, "num_epochs": 3})
    message = str(e.value)
    assert f"does not read {key} (read by {readers})" in message
    assert message.startswith(str(tmp_path / "ima.json")) and trainer.__name__ in message
    assert _refused(capsys, str(tmp_path / "ima.json"), "-tr", trainer.__name__) == \
        f"nnunet-ima check-config: error: {message}"


def test_eps_max_with_adv_is_refused_and_every_unread_key_is_named(tmp_path, capsys):
    path = _file(tmp_path, {"eps_max": 5, "binary_steps": 3, "pgd_steps": 4})
    line = _refused(capsys, path, "-tr", "nnUNetTrainerAdv")
    assert "nnUNetTrainerAdv does not read eps_max (read by nnUNetTrainerIMA), binary_steps " \
           "(read by nnUNetTrainerIMA)" in line
    assert "pgd_steps" not in line  # Adv reads it


def test_keys_the_trainer_reads_are_accepted(tmp_path, capsys):
    for trainer, values in [
            (nnUNetTrainerClean, {"num_epochs": 3, "seed": 1, "lr_schedule": "constant"}),
            (nnUNetTrainerAdv, {"adv_eps": 5, "pgd_steps": 4, "adversarial_dice": "per_sample"}),
            (nnUNetTrainerIMA, {"eps_max": 5, "recipe": "printed", "beta": 0.3}),
    ]:
        s = _resolve(tmp_path, trainer, values)
        assert all(s.to_dict()[k] == v for k, v in values.items())
        code, out, _ = _check_config(capsys, str(tmp_path / "ima.json"), "-tr", trainer.__name__)
        assert code == 0 and json.loads(out) == s.to_dict()


def test_unknown_keys_keep_their_message_with_a_trainer(tmp_path):
    with pytest.raises(UserInputError, match=re.escape("unknown trainer option(s) ['epsmax']")):
        _resolve(tmp_path, nnUNetTrainerIMA, {"epsmax": 3})


def test_without_a_trainer_every_key_is_accepted_as_before():
    """The drivers (ablation, benchmarks) and the tests check values without a trainer."""
    s = settings_from_dict({"eps_max": 5.0, "adv_eps": 3.0})
    assert (s.ima.eps_max, s.adv_eps) == (5.0, 3.0)


def test_class_defaults_of_every_trainer_are_keys_its_family_reads():
    for name in _trainer_names():
        cls = trainer_class(name)
        family = trainer_family(cls)
        assert set(cls.class_defaults()) <= _reads(family), name
        settings_for_trainer(cls.class_defaults(), {}, cls)  # resolves without an error


def test_a_subclass_whose_defaults_its_family_does_not_read_is_refused():
    class nnUNetTrainerAdv_mine(nnUNetTrainerAdv):
        ima_defaults = {"eps_max": 5.0}
    with pytest.raises(UserInputError, match=re.escape(
            "nnUNetTrainerAdv_mine's class defaults: nnUNetTrainerAdv_mine (of the "
            "nnUNetTrainerAdv family) does not read eps_max")):
        resolve_settings(nnUNetTrainerAdv_mine.class_defaults(), None, False, {},
                         trainer=nnUNetTrainerAdv_mine)


# ---------------------------------------------------- rule 1: checked against the code
class _Recorder:
    """Records the flat key of every settings field read while ``on`` (the parts' fields under
    their flat keys: ``attack.steps`` is ``pgd_steps``)."""

    def __init__(self, monkeypatch):
        self.on, self.read = False, set()
        for cls, part in ((TrainerSettings, None), (AttackConfig, "attack"), (IMAConfig, "ima")):
            names = {f.name for f in fields(cls)} - set(FLAT_KEYS.parts)
            monkeypatch.setattr(cls, "__getattribute__", self._getter(names, part))

    def _getter(self, names, part):
        recorder = self

        def getattribute(obj, name):
            if recorder.on and name in names:
                recorder.read.add(FLAT_KEYS.key_of(part, name) if part else name)
            return object.__getattribute__(obj, name)
        return getattribute


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _fake_nnunet(monkeypatch, tmp_path):
    """nnU-Net's own constructor, initialize and epoch hooks replaced by the few attributes our
    trainers use: their code runs, nnU-Net's (which reads no nnunet-ima setting) does not."""
    def init(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        self.device, self.is_ddp, self.local_rank, self.current_epoch = device, False, 0, 0
        self.configuration_manager = SimpleNamespace(patch_size=[8, 8])
        self.output_folder = str(tmp_path / "fold_0")
        os.makedirs(self.output_folder, exist_ok=True)
        self.log_file = os.path.join(self.output_folder, "log.txt")
        self.weight_decay, self.grad_scaler, self.disable_checkpointing = 3e-5, None, True

    def initialize(self):
        self.network = _TinyNet()
        self.label_manager = SimpleNamespace(has_regions=False, ignore_label=None)
        per_sample = PerSampleDiceCE()
        self.loss = lambda output, target: per_sample(output, target).mean()
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    monkeypatch.setattr(nnUNetTrainer, "__init__", init)
    monkeypatch.setattr(nnUNetTrainer, "initialize", initialize)
    for hook in ("on_train_epoch_start", "on_train_epoch_end", "print_to_log_file"):
        monkeypatch.setattr(nnUNetTrainer, hook, lambda self, *args, **kwargs: None)


# Plans of a 2D configuration, as much as the trainers' own checks before nnU-Net's read.
PLANS = {"plans_name": "nnUNetPlans", "dataset_name": "Dataset999_Settings",
         "configurations": {"2d": {"patch_size": [8, 8], "architecture": {
             "network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}}}}


def _new_trainer(monkeypatch, tmp_path, trainer):
    """``trainer`` as ``nnUNetv2_train DATASET 2d 0 -tr TRAINER`` constructs it, nnU-Net faked."""
    _fake_nnunet(monkeypatch, tmp_path)
    os.makedirs(tmp_path / "results", exist_ok=True)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return trainer(dict(PLANS), "2d", 0, {}, torch.device("cpu"))


def _code_reads(monkeypatch, tmp_path, trainer, values):
    """The flat keys ``trainer``'s code reads in __init__, initialize and one training epoch."""
    settings = settings_from_dict(dict(trainer.class_defaults(), **values))
    recorder = _Recorder(monkeypatch)

    def resolved(*args, **kwargs):  # resolve_settings itself reads every key; not recorded
        recorder.on = True
        return settings
    monkeypatch.setattr("nnunet_ima.trainers.nnUNetTrainerClean.resolve_settings", resolved)
    torch.manual_seed(0)
    t = _new_trainer(monkeypatch, tmp_path, trainer)
    assert recorder.on  # the constructor resolves its settings through resolve_settings
    t.initialize()
    if isinstance(t, nnUNetTrainerAdv):  # Clean's training step is nnU-Net's own
        t.on_train_epoch_start()
        data = torch.randn(4, 1, 8, 8)
        target = (data > 0).long()
        batch = {"data": data, "target": target, "keys": ["a"] * 4, SLICE_KEY: [0, 1, 2, 3]}
        outputs = [t.train_step(batch)]
        t.on_train_epoch_end(outputs)
    recorder.on = False
    return recorder.read


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_read_by_is_what_each_trainers_code_reads(monkeypatch, tmp_path, family):
    trainer = TRAINERS[family]
    small = {"num_epochs": 2, "pgd_steps": 2}
    if family == IMA:
        small.update(binary_steps=2)
        # Both recipes: each takes other branches (BPGD on all slices or the correct ones).
        read = set()
        for recipe in RECIPES:
            read |= _code_reads(monkeypatch, tmp_path / recipe, trainer,
                                dict(small, recipe=recipe))
    else:
        read = _code_reads(monkeypatch, tmp_path, trainer, small)
    # recipe is read when the settings are resolved (it sets other keys), not by the trainer.
    assert read == _reads(family) - {"recipe"}


@pytest.mark.parametrize("trainer, content, message", [
    (nnUNetTrainerAdv, {"eps_max": 5}, "nnUNetTrainerAdv does not read eps_max"),
    (nnUNetTrainerAdv_eps15, {"adv_eps": 5},
     "sets adv_eps = 5, but nnUNetTrainerAdv_eps15 fixes adv_eps = 15.0"),
])
def test_the_trainers_apply_the_same_rules(monkeypatch, tmp_path, capsys, trainer, content,
                                           message):
    """What nnUNetv2_train constructs refuses the file as check-config does."""
    monkeypatch.setenv(CONFIG_ENV, _file(tmp_path, content))
    with pytest.raises((SystemExit, UserInputError)):
        _new_trainer(monkeypatch, tmp_path, trainer)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------- rule 2: names fix settings
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_refuses_another_value_of_what_its_name_fixes(tmp_path, capsys, name):
    cls = trainer_class(name)
    fixed = fixed_by_name(cls)
    assert len(fixed) == 1, name
    (key, value), = fixed.items()
    # The name says the value: _eps15 -> 15, _authors -> "authors".
    suffix = name.rsplit("_", 1)[1]
    assert suffix in (f"eps{value:g}" if key in ("adv_eps", "eps_max") else str(value)), name
    other = {"adv_eps": 7.0, "eps_max": 7.0, "recipe": "printed" if value == "authors"
             else "authors"}[key]
    with pytest.raises(UserInputError) as e:
        _resolve(tmp_path, cls, {key: other})
    message = str(e.value)
    assert f"sets {key} = {other!r}, but {name} fixes {key} = {value!r} by its name" in message
    assert _refused(capsys, str(tmp_path / "ima.json"), "-tr", name) == \
        f"nnunet-ima check-config: error: {message}"
    # The same value is fine, with or without the key.
    for same in ({key: value}, {}):
        assert _resolve(tmp_path, cls, same).to_dict()[key] == value
        code, out, _ = _check_config(capsys, str(tmp_path / "ima.json"), "-tr", name)
        assert code == 0 and json.loads(out)[key] == value


def test_adv_eps_5_with_the_eps15_variant_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=re.escape(
            "sets adv_eps = 5, but nnUNetTrainerAdv_eps15 fixes adv_eps = 15.0 by its name")):
        _resolve(tmp_path, nnUNetTrainerAdv_eps15, {"adv_eps": 5})
    assert _resolve(tmp_path, nnUNetTrainerAdv_eps15, {"adv_eps": 15}).adv_eps == 15
    assert _resolve(tmp_path, nnUNetTrainerAdv, {"adv_eps": 5}).adv_eps == 5  # the family reads it


def test_a_familys_own_defaults_are_not_fixed(tmp_path):
    """nnUNetTrainerIMA's recipe is its default, not its name: a file may change it."""
    assert fixed_by_name(nnUNetTrainerIMA) == {} and fixed_by_name(nnUNetTrainerAdv) == {}
    assert _resolve(tmp_path, nnUNetTrainerIMA, {"recipe": "printed"}).recipe == "printed"
    assert _resolve(tmp_path, nnUNetTrainerIMA_eps15, {"recipe": "printed"}).ima.eps_max == 15


def test_a_recipe_may_not_change_what_a_name_fixes(tmp_path):
    class nnUNetTrainerIMA_constant(nnUNetTrainerIMA):
        ima_defaults = {"lr_schedule": "constant"}
    assert fixed_by_name(nnUNetTrainerIMA_constant) == {"lr_schedule": "constant"}
    with pytest.raises(UserInputError, match=re.escape(
            "sets recipe 'printed', which sets lr_schedule = 'poly', but "
            "nnUNetTrainerIMA_constant fixes lr_schedule = 'constant'")):
        _resolve(tmp_path, nnUNetTrainerIMA_constant, {"recipe": "printed"})
    s = _resolve(tmp_path, nnUNetTrainerIMA_constant, {"recipe": "printed",
                                                        "lr_schedule": "constant"})
    assert (s.recipe, s.lr_schedule) == ("printed", "constant")


# --------------------------------------------------------------- rule 3: duplicate keys
def test_a_key_given_twice_is_refused_naming_key_and_file(tmp_path, capsys):
    path = _file(tmp_path, '{"adv_eps": 5, "num_epochs": 3, "adv_eps": 8}')
    with pytest.raises(UserInputError) as e:
        resolve_settings({}, None, False, {CONFIG_ENV: path}, trainer=nnUNetTrainerAdv)
    assert f"{path} gives the key 'adv_eps' twice" in str(e.value)
    assert "gives the key 'adv_eps' twice" in _refused(capsys, path, "-tr", "nnUNetTrainerAdv")


# ------------------------------------------------------------------ rule 4: bad paths
def _bytes(path, content):
    path.write_bytes(content)
    return str(path)


def _bad_inputs(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "folder": (str(folder), "is a folder, but a settings file (JSON) is expected"),
        "missing": (str(tmp_path / "nope.json"), "does not exist"),
        "empty": (_file(tmp_path, "  \n", "empty.json"), "is empty"),
        "binary": (_bytes(tmp_path / "binary.json", b"\xff\xfe{\x00}\x00"),  # UTF-16
                   "is not UTF-8 text"),
        "list": (_file(tmp_path, "[1, 2]", "list.json"),
                 "must hold a JSON object of trainer options, got list"),
        "string": (_file(tmp_path, '"eps_max"', "string.json"),
                   "must hold a JSON object of trainer options, got str"),
        "invalid": (_file(tmp_path, "{eps_max: 3", "invalid.json"), "is not valid JSON"),
    }


@pytest.mark.parametrize("case", ["folder", "missing", "empty", "binary", "list", "string",
                                  "invalid"])
def test_a_bad_settings_path_says_what_is_wrong(tmp_path, capsys, case):
    path, problem = _bad_inputs(tmp_path)[case]
    with pytest.raises(UserInputError) as e:
        resolve_settings({}, None, False, {CONFIG_ENV: path}, trainer=nnUNetTrainerIMA)
    assert path in str(e.value) and problem in str(e.value)
    assert f"Set {CONFIG_ENV} to a JSON file" in str(e.value)  # the fix names the variable
    line = _refused(capsys, path)  # check-config FILE: its own fix
    assert path in line and problem in line and "Give check-config a JSON settings file" in line


def test_an_unreadable_file_says_so(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, '{"num_epochs": 3}')
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(UserInputError, match=re.escape(f"cannot read {path} (Permission denied)")):
        read_config_file(path)
    assert f"cannot read {path} (Permission denied)" in _refused(capsys, path)


def test_a_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"num_epochs": 3}')
    assert read_config_file(str(path)) == {"num_epochs": 3}


def test_check_config_with_the_variable_set_to_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    line = _refused(capsys)
    assert f"{tmp_path} is a folder, but a settings file (JSON) is expected" in line
    assert f"Set {CONFIG_ENV} to a JSON settings file" in line


# --------------------------------------------------- rule 6: saved runs keep resuming
@pytest.mark.parametrize("trainer, name", [(nnUNetTrainerAdv, "ima_config_adv.json"),
                                           (nnUNetTrainerIMA, "ima_config_authors.json"),
                                           (nnUNetTrainerAdv_eps15, "ima_config_adv.json")])
def test_saved_settings_of_version_0_1_resume_under_the_strict_rules(tmp_path, trainer, name):
    """A saved ima_config.json holds every key of its version (and, before this rule, an _eps15
    variant could have saved another adv_eps): --c reads it as it is, the keys added since at
    their defaults."""
    fold = tmp_path / "fold_0"
    fold.mkdir()
    shutil.copy(os.path.join(DATA, name), fold / CONFIG_FILENAME)
    with open(os.path.join(DATA, name)) as f:
        saved = json.load(f)
    s = resolve_settings(trainer.class_defaults(), str(fold), True, {}, trainer=trainer)
    assert s.to_dict() == {**saved, **NEW_TRAINER_KEYS}


def test_a_truncated_saved_file_names_itself_and_the_way_out(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / CONFIG_FILENAME).write_text('{"num_epochs": 3, "pgd')
    with pytest.raises(UserInputError) as e:
        resolve_settings({}, str(fold), True, {}, trainer=nnUNetTrainerAdv)
    message = str(e.value)
    assert message.startswith(f"{fold / CONFIG_FILENAME} is not valid JSON")
    assert "settings of the run being continued" in message and "without --c" in message
    assert CONFIG_ENV not in message  # the variable is not set: not the fix


def test_resume_with_the_users_file_set_applies_the_rules_to_that_file(tmp_path):
    fold = tmp_path / "fold_0"
    first = _resolve(tmp_path, nnUNetTrainerAdv, {"adv_eps": 5.0, "num_epochs": 3},
                     str(fold), False)
    write_settings(first, str(fold))
    # --c with the same file: the saved settings.
    assert _resolve(tmp_path, nnUNetTrainerAdv, {"adv_eps": 5.0, "num_epochs": 3},
                    str(fold), True) == first
    with pytest.raises(UserInputError, match="does not read eps_max"):
        _resolve(tmp_path, nnUNetTrainerAdv, {"adv_eps": 5.0, "num_epochs": 3, "eps_max": 5},
                 str(fold), True)


def test_a_saved_complete_file_may_be_reused_as_the_users_file(tmp_path):
    """Every key, as ima_config.json is written: the keys the trainer does not read are refused
    only where they would change something (the record of an IMA run given to Adv). A record
    of version 0.1, without the keys added since, is still complete."""
    for trainer, name in [(nnUNetTrainerAdv, "ima_config_adv.json"),
                          (nnUNetTrainerIMA, "ima_config_authors.json")]:
        with open(os.path.join(DATA, name)) as f:
            saved = json.load(f)
        assert _resolve(tmp_path, trainer, saved).to_dict() == {**saved, **NEW_TRAINER_KEYS}
    with open(os.path.join(DATA, "ima_config_authors.json")) as f:
        ima_record = json.load(f)
    with pytest.raises(UserInputError, match=r"does not read .*eps_max \(read by "):
        _resolve(tmp_path, nnUNetTrainerAdv, ima_record)
    with open(os.path.join(DATA, "ima_config_adv.json")) as f:
        adv_record = json.load(f)  # adv_eps 5
    with pytest.raises(UserInputError, match="fixes adv_eps = 15.0"):
        _resolve(tmp_path, nnUNetTrainerAdv_eps15, adv_record)
