"""Every evaluation result knows what produced it: part records, the output folder's lock, and
stale parts recomputed (never reused) so that the tables equal a fresh run's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation import provenance
from nnunet_ima.evaluation.cli import main
from nnunet_ima.evaluation.lock import LOCK_FILENAME, output_lock
from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.provenance import (PartRecords, check_unchanged, checkpoint_identity,
                                              record_mismatch, slices_digest)
from nnunet_ima.evaluation.report import load_part_record, part_path, save_part
from nnunet_ima.evaluation.resume import can_resume, finished_parts, report_stale
from nnunet_ima.evaluation.robustness import AttackSettings, NoiseResult
from nnunet_ima.evaluation.run_config import run_config
from nnunet_ima.evaluation.samples import SliceSample


# ----------------------------------------------------------------------------------- records

def _samples(shift=0.0):
    return [SliceSample("case_a", z, np.full((1, 4, 4), z + shift, np.float32),
                        np.eye(4, dtype=np.int16)) for z in range(3)]


def _model(name="IMA", sha="a" * 64, folder="/models/IMA__nnUNetPlans__2d"):
    return LoadedModel(name=name, folder=folder, network=None, num_classes=3,
                       configuration="2d", data_identifier="nnUNetPlans_2d",
                       dataset_name="Dataset990_SyntheticOrgan", ignore_label=None, plans={},
                       dataset_json={}, checkpoint_path=f"{folder}/fold_0/checkpoint_final.pth",
                       checkpoint_sha256=sha)


def _options(**changes):
    # --images: the case source is "raw", known without nnU-Net's folders.
    base = EvalOptions(output="out", model_folders=("/models/IMA__nnUNetPlans__2d",),
                       images="/data/imagesTs", labels="/data/labelsTs", noise=(0, 5),
                       attack=AttackSettings(steps=30), device="cpu")
    attack = {k: changes.pop(k) for k in list(changes) if k in AttackSettings.__annotations__}
    return replace(base, attack=replace(base.attack, **attack), **changes)


def _records(options=None, model=None, samples=None, device="cpu"):
    options = options or _options()
    model = model or _model()
    samples = samples or _samples()
    config = run_config(options, [model], {model.name: samples}, {})
    identity = {"path": model.checkpoint_path, "size": 1, "mtime": 0.0,
                "sha256": model.checkpoint_sha256}
    return PartRecords(config, {model.name: slices_digest(samples)}, {model.name: identity},
                       {"device": device})


@pytest.mark.parametrize("change, field", [
    ({"steps": 3}, "settings.steps"),
    ({"alpha": 2.5}, "settings.alpha"),
    ({"norm": "linf"}, "settings.norm"),
    ({"seed": 1}, "settings.seed"),
    ({"batch_size": 8}, "settings.batch_size"),
    ({"random_start": False}, "settings.random_start"),
    ({"loss": "ce"}, "settings.attack_loss"),
    ({"attack": "segpgd"}, "settings.attack"),
    ({"inference": "predictor"}, "settings.inference"),
    ({"checkpoint": "best"}, "settings.checkpoint"),
    ({"max_slices": 2}, "settings.max_slices"),
    ({"include_empty": True}, "settings.include_empty"),
    ({"images": "/elsewhere/imagesTs"}, "settings.images"),
    ({"ensemble": ("pgd", "segpgd")}, "settings.ensemble"),
])
def test_a_setting_that_changes_the_number_changes_the_record(change, field):
    expected = _records().record("IMA", 5.0)
    other = _records(_options(**change)).record("IMA", 5.0)
    reason = record_mismatch(other, expected)
    assert reason is not None and field in reason


def test_what_does_not_change_the_number_leaves_the_record_alone():
    expected = _records().record("IMA", 5.0)
    # The device, the progress bar, the noise list and the masking checks are not part of a
    # part's number.
    same = _records(_options(progress=False, noise=(0, 5, 9),
                             masking_checks=True), device="cuda").record("IMA", 5.0)
    assert record_mismatch(same, expected) is None
    assert same["produced_by"]["device"] == "cuda"


def test_a_folder_that_differs_only_in_a_footnote_resumes(tmp_path):
    """A rewritten split changes the note on how a model's training cases were known, not a
    number: the folder resumes. A changed checkpoint digest is still refused."""
    config = {"models": {"IMA": {"folder": "f", "checkpoint_sha256": "aa", "cases": ["a"],
                                 "training_cases_note": "from today's splits_final.json"}},
              "attack": "pgd", "steps": 20}
    (tmp_path / "config.json").write_text(json.dumps(config))
    renoted = json.loads(json.dumps(config))
    renoted["models"]["IMA"]["training_cases_note"] = "the split changed; record used"
    renoted["models"]["IMA"]["train_cases_scored"] = ["a"]
    assert can_resume(str(tmp_path), renoted, overwrite=False)
    retrained = json.loads(json.dumps(config))
    retrained["models"]["IMA"]["checkpoint_sha256"] = "bb"
    with pytest.raises(UserInputError, match=r"models\.IMA\.checkpoint_sha256"):
        can_resume(str(tmp_path), retrained, overwrite=False)
    assert not can_resume(str(tmp_path), retrained, overwrite=True)


def test_model_checkpoint_level_member_and_slices_are_in_the_record():
    expected = _records().record("IMA", 5.0)
    cases = [
        (_records(model=_model(sha="b" * 64)).record("IMA", 5.0), "model.checkpoint_sha256"),
        (_records(model=_model(folder="/models/other/IMA__nnUNetPlans__2d")).record("IMA", 5.0),
         "model.folder"),
        (_records().record("IMA", 9.0), "noise"),
        (_records(samples=_samples(shift=0.5)).record("IMA", 5.0), "slices_sha256"),
        (_records().record("IMA", 5.0, "apgd", ["pgd"]), "member"),
        (_records().record("IMA", 5.0, "apgd", ["pgd"]), "members_before"),
    ]
    for record, field in cases:
        reason = record_mismatch(record, expected)
        assert reason is not None and field in reason, (field, reason)
    assert "no record" in record_mismatch(None, expected)
    assert record_mismatch(_records().record("IMA", 5.0), expected) is None


def _result(samples, value):
    n = len(samples)
    counts = np.full((n, 2), value, np.int64)
    return NoiseResult([s.case for s in samples], [s.index for s in samples], counts, counts,
                       counts, {"label": np.zeros((2, 2), np.int16)})


def test_parts_that_are_not_this_runs_are_recomputed_not_reused(tmp_path, capsys):
    out = str(tmp_path)
    samples = _samples()
    model = _model()
    records = _records()
    noise = [0.0, 3.0, 5.0, 9.0, 15.0]
    save_part(part_path(out, "IMA", 0.0), _result(samples, 1), record=records.record("IMA", 0.0))
    # 3: made at 3 steps (another run's settings) -- the --overwrite race of issue 22.
    save_part(part_path(out, "IMA", 3.0), _result(samples, 2),
              record=_records(_options(steps=3)).record("IMA", 3.0))
    # 5: another model's part, copied here under this model's name.
    other = _model(name="IMA", sha="c" * 64, folder="/elsewhere/IMA__nnUNetPlans__2d")
    save_part(part_path(out, "IMA", 5.0), _result(samples, 3),
              record=_records(model=other).record("IMA", 5.0))
    # 9: written before parts had records.
    save_part(part_path(out, "IMA", 9.0), _result(samples, 4))
    # 15: this run's record, but other slices in the file.
    save_part(part_path(out, "IMA", 15.0), _result(samples[:2], 5),
              record=records.record("IMA", 15.0))
    results, stale = finished_parts(out, [model], {"IMA": samples}, noise, records)
    assert list(results["IMA"]) == [0.0]
    assert [p.label for p in stale] == ["IMA at noise 3", "IMA at noise 5", "IMA at noise 9",
                                        "IMA at noise 15"]
    reasons = {p.label: p.reason for p in stale}
    assert "settings.steps" in reasons["IMA at noise 3"]
    assert "model.checkpoint_sha256" in reasons["IMA at noise 5"]
    assert "model.folder" in reasons["IMA at noise 5"]
    assert "no record" in reasons["IMA at noise 9"]
    assert "other test slices" in reasons["IMA at noise 15"]
    report_stale(stale)
    printed = capsys.readouterr().out
    assert printed.startswith("recomputing 4 parts whose settings differ from this run's")
    assert "IMA at noise 3: differs in settings.steps" in printed


def test_a_part_keeps_its_record(tmp_path):
    path = part_path(str(tmp_path), "IMA", 5.0)
    record = _records().record("IMA", 5.0)
    save_part(path, _result(_samples(), 1), {"attacked": 3}, record=record)
    assert load_part_record(path) == record
    assert record["checkpoint"]["sha256"] == "a" * 64
    (tmp_path / "parts" / "junk.npz").write_bytes(b"not a part")
    assert load_part_record(str(tmp_path / "parts" / "junk.npz")) is None


def test_checkpoint_identity_is_hashed_once_per_run_and_a_change_is_seen(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(b"weights v1")
    calls = []
    original = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda p: calls.append(p) or original(p))
    provenance.clear_checkpoint_hashes()
    first = checkpoint_identity(str(path))
    assert checkpoint_identity(str(path)) == first and len(calls) == 1
    assert first["size"] == len(b"weights v1") and first["path"] == str(path)
    import hashlib
    assert first["sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    check_unchanged(first, "the evaluator")
    path.write_bytes(b"weights v2, longer")
    with pytest.raises(UserInputError, match="changed while the evaluator loaded it"):
        check_unchanged(first, "the evaluator")
    assert checkpoint_identity(str(path))["sha256"] != first["sha256"]
    provenance.clear_checkpoint_hashes()
    checkpoint_identity(str(path))
    assert len(calls) == 3


# ------------------------------------------------------------------------------------- lock

def test_a_second_evaluation_is_refused_with_the_holder_named(tmp_path):
    out = tmp_path / "out"
    with output_lock(str(out), command="nnunet-ima-eval -d 2 --steps 30 -o out"):
        assert (out / LOCK_FILENAME).is_file()
        with pytest.raises(UserInputError) as refused:
            with output_lock(str(out), command="nnunet-ima-eval -d 2 --steps 3 -o out"):
                pass
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message
        assert "nnunet-ima-eval -d 2 --steps 30 -o out" in message
        assert "running since" in message and "choose another -o" in message
        assert (out / LOCK_FILENAME).is_file()  # the refused one leaves the holder's lock
    assert not (out / LOCK_FILENAME).exists()
    assert not out.exists()  # created for the lock, still empty: removed again


@pytest.mark.parametrize("error", [KeyboardInterrupt, UserInputError, RuntimeError])
def test_the_lock_is_released_however_the_run_ends(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error):
        with output_lock(str(out)):
            raise error("stop")
    assert not (out / LOCK_FILENAME).exists() and out.is_dir()
    with output_lock(str(out)):
        pass


_HOLDER = textwrap.dedent("""
    import sys, time
    from nnunet_ima.evaluation.lock import output_lock
    with output_lock(sys.argv[1], command="nnunet-ima-eval --steps 30 -o held"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=f"pid {holder.pid} .*--steps 30 -o held"):
            with output_lock(str(out)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no finally runs in the holder: its file stays
        holder.wait()
    assert json.loads((out / LOCK_FILENAME).read_text())["pid"] == holder.pid
    with output_lock(str(out), command="taker"):
        assert json.loads((out / LOCK_FILENAME).read_text())["command"] == "taker"
    assert not (out / LOCK_FILENAME).exists()


def test_the_lock_falls_back_to_its_record_without_flock(tmp_path, monkeypatch):
    """File systems without flock: a record naming a live process of this host refuses, a
    record of a dead one is taken over."""
    import errno

    from nnunet_ima.evaluation import lock

    def no_flock(fd):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock, "_flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILENAME).write_text(json.dumps(dict(lock.holder_record("other run"),
                                                     pid=os.getppid())))
    with pytest.raises(UserInputError, match=f"pid {os.getppid()}"):
        with output_lock(str(out)):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILENAME).write_text(json.dumps(dict(lock.holder_record("old run"),
                                                     pid=dead.pid)))
    with output_lock(str(out)):
        assert json.loads((out / LOCK_FILENAME).read_text())["pid"] == os.getpid()


def test_eval_into_a_folder_in_use_exits_2_and_touches_nothing(tmp_path, capsys):
    """issue 22: `--overwrite --steps 3` into the -o of a running 30-step evaluation."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"steps": 30}')
    with output_lock(str(out), command="nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA --steps 30"):
        code = main(["-d", "2", "-tr", "nnUNetTrainerIMA", "--steps", "3", "--overwrite",
                     "--device", "cpu", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nnunet-ima-eval: error: {out} is in use by another evaluation: "
                          f"pid {os.getpid()}")
    assert "--steps 30" in err and "Traceback" not in err
    assert (out / "config.json").read_text() == '{"steps": 30}'


# ------------------------------------------------------------- end to end on a trained model

def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "--noise", "0", "3", "--max-slices", "3",
            "--steps", "2", "-o", str(out), *extra]


def _summary(out):
    """The results of ``out``'s summary.json: without the peak memory, a measurement."""
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("peak_memory")
    return summary


def _part(out, noise):
    return out / "parts" / f"nnUNetTrainerClean__noise{noise}.npz"


def _perturbed_copy(source, target):
    """A copy of a model folder whose checkpoint holds other weights."""
    shutil.copytree(source, target)
    checkpoint = target / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for key, value in state["network_weights"].items():
        if value.is_floating_point() and value.numel() > 1:  # noise: normalisation undoes a scale
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            state["network_weights"][key] = value + 0.5 * value.std() * noise
    torch.save(state, checkpoint)
    return checkpoint


@pytest.mark.slow
def test_stale_parts_are_recomputed_to_a_fresh_runs_summary(nnunet_workspace, trained_clean_model,
                                                           tmp_path, capsys, one_thread):
    ws = nnunet_workspace
    fresh = tmp_path / "fresh"
    assert main(_args(ws, fresh)) == 0
    expected = _summary(fresh)
    per_slice = (fresh / "per_slice.csv").read_text()

    # Settings changed: a 3-step part lands among the 2-step parts (what a concurrent
    # `--overwrite --steps 3` did before the lock); the 2-step rerun recomputes it.
    other_steps = tmp_path / "steps3"
    assert main(_args(ws, other_steps)[:-2] + ["--steps", "3", "-o", str(other_steps)]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(fresh, mixed)
    shutil.copy(_part(other_steps, 3), _part(mixed, 3))
    capsys.readouterr()
    assert main(_args(ws, mixed)) == 0
    out = capsys.readouterr().out
    assert "recomputing 1 part whose settings differ from this run's" in out
    assert "nnUNetTrainerClean at noise 3: differs in settings.steps" in out
    assert "reused 1 of 2 (model, noise) results" in out
    assert _summary(mixed) == expected
    assert (mixed / "per_slice.csv").read_text() == per_slice

    # A part copied from another model's output folder (same trainer name, other weights).
    other_model = tmp_path / "models" / "nnUNetTrainerClean__nnUNetPlans__2d"
    _perturbed_copy(trained_clean_model, other_model)
    other_out = tmp_path / "other_model"
    assert main(["-m", str(other_model)] + _args(ws, other_out)[8:]) == 0
    assert _summary(other_out)["models"] != expected["models"]
    copied = tmp_path / "copied"
    shutil.copytree(fresh, copied)
    for noise in ("0", "3"):
        shutil.copy(_part(other_out, noise), _part(copied, noise))
    capsys.readouterr()
    assert main(_args(ws, copied)) == 0
    out = capsys.readouterr().out
    assert "recomputing 2 parts whose settings differ" in out
    assert "model.checkpoint_sha256" in out and "model.folder" in out
    assert _summary(copied) == expected


@pytest.mark.slow
def test_a_replaced_checkpoint_recomputes_every_part(nnunet_workspace, trained_clean_model,
                                                     tmp_path, capsys, one_thread):
    ws = nnunet_workspace
    model = tmp_path / "models" / "nnUNetTrainerClean__nnUNetPlans__2d"
    shutil.copytree(trained_clean_model, model)
    argv = ["-m", str(model)] + _args(ws, tmp_path / "x")[8:-2]
    before = tmp_path / "before"
    assert main(argv + ["-o", str(before)]) == 0
    raced = tmp_path / "raced"
    shutil.copytree(before, raced)
    # The checkpoint is replaced after the parts were written (a training that went on).
    replacement = _perturbed_copy(trained_clean_model, tmp_path / "v2" / model.name)
    shutil.copy(replacement, model / "fold_0" / "checkpoint_final.pth")
    fresh = tmp_path / "fresh"
    assert main(argv + ["-o", str(fresh)]) == 0
    expected = _summary(fresh)
    assert expected["models"] != _summary(before)["models"]
    # --overwrite: every part of the old weights goes.
    assert main(argv + ["-o", str(before), "--overwrite"]) == 0
    assert _summary(before) == expected
    # A config.json that names the new weights over parts of the old ones (a run that rewrote
    # config.json while another wrote parts): the parts' records say which weights made them.
    shutil.copy(fresh / "config.json", raced / "config.json")
    capsys.readouterr()
    assert main(argv + ["-o", str(raced)]) == 0
    out = capsys.readouterr().out
    assert "recomputing 2 parts whose settings differ" in out
    assert "model.checkpoint_sha256" in out
    assert _summary(raced) == expected
    sha = expected["config"]["models"]["nnUNetTrainerClean"]["checkpoint_sha256"]
    for noise in ("0", "3"):
        record = load_part_record(str(_part(raced, noise)))
        assert record["checkpoint"]["sha256"] == sha
        assert record["checkpoint"]["path"] == str(model / "fold_0" / "checkpoint_final.pth")
        assert record["checkpoint"]["size"] == os.path.getsize(model / "fold_0" /
                                                               "checkpoint_final.pth")
        assert record["compared"]["settings"]["steps"] == 2
        assert record["compared"]["model"]["cases"] == expected["config"]["models"][
            "nnUNetTrainerClean"]["cases"]


@pytest.mark.slow
def test_ensemble_member_parts_carry_their_record(nnunet_workspace, trained_clean_model, tmp_path,
                                                  capsys, one_thread):
    ws = nnunet_workspace
    common = ["--attack", "ensemble", "--ensemble", "pgd", "segpgd", "--masking-checks", "off"]
    fresh = tmp_path / "fresh"
    assert main(_args(ws, fresh, *common)) == 0
    record = load_part_record(str(fresh / "parts" / "nnUNetTrainerClean__noise3__segpgd.npz"))
    assert record["compared"]["member"] == "segpgd"
    assert record["compared"]["members_before"] == ["pgd"]
    mixed = tmp_path / "mixed"
    shutil.copytree(fresh, mixed)
    # segpgd's part swapped for pgd's: same model and level, another member.
    shutil.copy(fresh / "parts" / "nnUNetTrainerClean__noise3__pgd.npz",
                mixed / "parts" / "nnUNetTrainerClean__noise3__segpgd.npz")
    capsys.readouterr()
    assert main(_args(ws, mixed, *common)) == 0
    out = capsys.readouterr().out
    assert "recomputing 1 part whose settings differ" in out
    assert "nnUNetTrainerClean at noise 3 (segpgd): differs in member, members_before" in out

    def without_seconds(summary):
        summary["ensemble"].pop("seconds")
        return summary
    assert without_seconds(_summary(mixed)) == without_seconds(_summary(fresh))
