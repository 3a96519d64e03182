"""Damaged resume state (``nnUNetv2_train ... --c`` after a crash): one message that names the
file and says which checkpoint can still be used, and how; never torch's zip error, a bare
``JSONDecodeError`` or ``KeyError: 'delta'``."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import _bin
from nnunet_ima.errors import UserInputError
from nnunet_ima.margins import MarginStore
from nnunet_ima.nnunet.margin_checkpoint import load_margins, margins_path, save_margins
from nnunet_ima.nnunet.resume_state import CHECKPOINT_KEYS, checkpoint_epoch, recovery_advice
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA

DATASET = "Dataset990_Toy"


def _checkpoint(path, epoch, **changes):
    """A file with the entries nnU-Net's load_checkpoint reads, saved as torch saves it."""
    content = {k: {} for k in CHECKPOINT_KEYS}
    content.update(current_epoch=epoch, network_weights={"w": torch.zeros(64, 64)})
    content.update(changes)
    torch.save({k: v for k, v in content.items() if v is not None}, str(path))
    return str(path)


def _margins(checkpoint, epoch):
    store = MarginStore(eps_max=10.0, delta=1.0)
    store.record([("case", 0)], torch.tensor([True]), torch.tensor([2.0]), torch.tensor([True]))
    store.end_epoch()
    save_margins(checkpoint, store, epoch)
    return margins_path(checkpoint)


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


# ------------------------------------------------------------------ checkpoints
def test_a_whole_checkpoint_gives_its_epoch(tmp_path):
    assert checkpoint_epoch(_checkpoint(tmp_path / "c.pth", 7)) == 7


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "it is not a complete torch checkpoint"),
    ("empty", "it is empty"),
    ("overwrite", "the checksum of its part"),
    ("keys", "it lacks the entries ['optimizer_state']"),
    ("list", "it holds a list, not an nnU-Net checkpoint"),
])
def test_a_damaged_checkpoint_is_one_error_naming_the_file(tmp_path, damage, reason):
    path = _checkpoint(tmp_path / "checkpoint_latest.pth", 3,
                       optimizer_state=None if damage == "keys" else {})
    if damage == "truncate":
        _truncate(path)
    elif damage == "empty":
        _truncate(path, 0)
    elif damage == "overwrite":  # the zip directory intact, the weights overwritten
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
        open(path, "wb").write(bytes(data))
    elif damage == "list":
        torch.save([1, 2], path)
    with pytest.raises(UserInputError) as e:
        checkpoint_epoch(path)
    assert str(e.value).startswith(f"{path} cannot be read ({reason}")
    assert "truncated or damaged" in str(e.value)


# ------------------------------------------------------------------ margins
@pytest.mark.parametrize("damage, message", [
    ("missing", "is missing: the margins of"),
    ("truncate", "cannot read"),
    ("delta", "the margins of epoch 3 cannot be restored (the entry 'delta' is missing)"),
    ("states", "is not a margins file of this package"),
    ("epoch", "holds margins for checkpoint epochs [3], not for 4"),
])
def test_damaged_margins_are_one_error_naming_the_file(tmp_path, damage, message):
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    path = _margins(checkpoint, 3)
    if damage == "missing":
        os.remove(path)
    elif damage == "truncate":
        _truncate(path)
    elif damage in ("delta", "states"):
        content = json.load(open(path))
        if damage == "delta":
            del content["states"][-1]["margins"]["delta"]
        else:
            content = {"states": [{"margins": {}}]}
        json.dump(content, open(path, "w"))
    with pytest.raises(UserInputError) as e:
        load_margins(checkpoint, 4 if damage == "epoch" else 3)
    assert str(tmp_path / "checkpoint_latest.margins.json") in str(e.value)
    assert message in str(e.value)
    assert "Traceback" not in str(e.value)


# ------------------------------------------------------------------ the advice
def test_the_advice_names_the_usable_checkpoint_and_the_commands(tmp_path):
    latest = _checkpoint(tmp_path / "checkpoint_latest.pth", 5)
    best = _checkpoint(tmp_path / "checkpoint_best.pth", 3)
    for path in (latest, best):
        _margins(path, 5 if path == latest else 3)

    def problem_of(path):
        return None if path == best else "damaged"

    advice = recovery_advice(latest, "PROBLEM", "nnUNetv2_train D 2d 0 -tr T", problem_of,
                             lambda p: [margins_path(p)])
    lines = advice.splitlines()
    assert lines[0] == "PROBLEM"
    assert lines[2].startswith("- checkpoint_best.pth (epoch 3) with checkpoint_best.margins.json"
                               ": move the damaged files aside and continue from it")
    assert lines[3:6] == [f"    mv {latest} {latest}.damaged",
                          f"    mv {margins_path(latest)} {margins_path(latest)}.damaged",
                          "    nnUNetv2_train D 2d 0 -tr T --c"]
    assert lines[-2:] == [f"    mv {tmp_path} {tmp_path}.damaged",
                          "    nnUNetv2_train D 2d 0 -tr T"]
    # checkpoint_best cannot be used either: only a fresh start remains.
    advice = recovery_advice(latest, "PROBLEM", "CMD", lambda p: "damaged")
    assert "no other checkpoint of this fold can be resumed from; start afresh" in advice
    assert "--c" not in advice.replace("without --c", "")


def _fake_ima(tmp_path):
    """nnUNetTrainerIMA with just what its resume checks read (no nnU-Net constructor)."""
    t = nnUNetTrainerIMA.__new__(nnUNetTrainerIMA)
    t.fold, t.local_rank, t.device = 0, 0, torch.device("cpu")
    t.output_folder = str(tmp_path / "fold_0")
    os.makedirs(t.output_folder)
    t.log_file = os.path.join(t.output_folder, "training_log.txt")
    t._created_folders = []
    t.plans_manager = SimpleNamespace(dataset_name=DATASET, plans_name="nnUNetPlans")
    t.configuration_name = "2d"
    return t


@pytest.mark.parametrize("damage, first_line", [
    ("margins_truncated", "cannot read {margins}"),
    ("margins_delta", "{margins}: the margins of epoch 5 cannot be restored (the entry 'delta'"),
    ("checkpoint_truncated", "{latest} cannot be read (it is not a complete torch checkpoint)"),
])
def test_the_ima_trainer_stops_with_the_way_out(tmp_path, capsys, monkeypatch, damage,
                                                first_line):
    t = _fake_ima(tmp_path)
    latest = _checkpoint(os.path.join(t.output_folder, "checkpoint_latest.pth"), 5)
    best = _checkpoint(os.path.join(t.output_folder, "checkpoint_best.pth"), 3)
    margins = _margins(latest, 5)
    _margins(best, 3)
    if damage == "margins_truncated":
        _truncate(margins)
    elif damage == "margins_delta":
        content = json.load(open(margins))
        del content["states"][-1]["margins"]["delta"]
        json.dump(content, open(margins, "w"))
    else:
        _truncate(latest)
    loads = []
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer."
                        "load_checkpoint", lambda self, f: loads.append(f))
    with pytest.raises(SystemExit) as e:
        t.load_checkpoint(latest)
    assert e.value.code == 2 and not loads  # nnU-Net never read the damaged state
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "nnunet-ima: nnUNetTrainerIMA cannot continue."
    assert lines[1].startswith(first_line.format(margins=margins, latest=latest))
    assert ("- checkpoint_best.pth (epoch 3) with checkpoint_best.margins.json: move the damaged "
            "files aside") in err
    assert f"    mv {latest} {latest}.damaged" in err
    assert f"    nnUNetv2_train {DATASET} 2d 0 -tr nnUNetTrainerIMA -device cpu --c" in err
    assert lines[-1] == "(nothing was trained or written)"
    assert os.path.isfile(latest) and os.path.isfile(margins)  # nothing moved or deleted


def test_the_ima_trainer_restores_whole_margins(tmp_path, monkeypatch):
    t = _fake_ima(tmp_path)
    latest = _checkpoint(os.path.join(t.output_folder, "checkpoint_latest.pth"), 5)
    _margins(latest, 5)

    def nnunet_load(self, filename):
        self.current_epoch = 5
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer."
                        "load_checkpoint", nnunet_load)
    t.print_to_log_file = lambda *args, **kwargs: None
    t.load_checkpoint(latest)
    assert t._loaded_checkpoint == latest and len(t.margins) == 1


# ------------------------------------------------------------------ real nnUNetv2_train --c
def _copy_model(ws, trained_clean_model, tmp_path, trainer):
    """The trained fold copied into a results folder of its own (the session's model stays
    whole), under ``trainer``'s name."""
    results = tmp_path / "results"
    target = results / ws.dataset_name / f"{trainer}__nnUNetPlans__2d"
    shutil.copytree(trained_clean_model, target)
    return str(results), str(target / "fold_0")


def _resume(ws, results, trainer):
    return ws.run([_bin("nnUNetv2_train"), str(ws.dataset_id), "2d", "0", "-tr", trainer,
                   "-device", "cpu", "--c"], extra_env={"nnUNet_results": results}, check=False)


@pytest.mark.slow
def test_nnunetv2_train_continues_from_a_truncated_checkpoint_with_advice(
        nnunet_workspace, trained_clean_model, tmp_path, monkeypatch):
    ws = nnunet_workspace
    results, fold = _copy_model(ws, trained_clean_model, tmp_path, "nnUNetTrainerClean")
    final = os.path.join(fold, "checkpoint_final.pth")
    _truncate(final)
    result = _resume(ws, results, "nnUNetTrainerClean")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("nnunet-ima: "):].splitlines()
    assert message[0] == "nnunet-ima: nnUNetTrainerClean cannot continue."
    assert message[1].startswith(f"{final} cannot be read (it is not a complete torch checkpoint)")
    assert message[3].startswith("- checkpoint_best.pth (epoch ")
    assert message[4] == f"    mv {final} {final}.damaged"
    # The advice works: with the damaged file moved aside, nnU-Net's --c takes checkpoint_best.
    os.rename(final, final + ".damaged")
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    monkeypatch.setenv("nnUNet_results", results)
    monkeypatch.delenv("NNUNET_IMA_CONFIG", raising=False)
    trainer = get_trainer_from_args(str(ws.dataset_id), "2d", 0, "nnUNetTrainerClean",
                                    continue_training=True, device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, True, False, None)
    assert trainer._loaded_checkpoint == os.path.join(fold, "checkpoint_best.pth")


@pytest.mark.slow
def test_nnunetv2_train_ima_with_truncated_margins_names_the_file(nnunet_workspace,
                                                                 trained_clean_model, tmp_path):
    ws = nnunet_workspace
    # The clean model's weights stand in for an IMA run: same network, margins written here.
    results, fold = _copy_model(ws, trained_clean_model, tmp_path, "nnUNetTrainerIMA")
    os.remove(os.path.join(fold, "ima_config.json"))  # the clean run's settings
    final, best = (os.path.join(fold, f"checkpoint_{n}.pth") for n in ("final", "best"))
    _margins(final, checkpoint_epoch(final))
    _margins(best, checkpoint_epoch(best))
    _truncate(margins_path(final))
    result = _resume(ws, results, "nnUNetTrainerIMA")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("nnunet-ima: "):].splitlines()
    assert message[0] == "nnunet-ima: nnUNetTrainerIMA cannot continue."
    assert message[1].startswith(f"cannot read {margins_path(final)}")
    assert message[3].startswith(f"- checkpoint_best.pth (epoch {checkpoint_epoch(best)}) with "
                                 f"checkpoint_best.margins.json")
