"""Presets (--preset quick / standard / sea / rse), ensemble members with their own steps, and
restarts: what each preset runs, the conflicts refused (exit code 2 with the fix), restarts
checked against the runs they are made of, and folders written before still resuming."""
import dataclasses
import json
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ima.declared import InvalidSetting
from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation import cli
from nnunet_ima.evaluation.attacks import run_attack
from nnunet_ima.evaluation.cli import main
from nnunet_ima.evaluation.ensemble import (DEFAULT_ENSEMBLE, MEMBERS, PRESETS, MemberSpec,
                                            member_settings)
from nnunet_ima.evaluation.options import EvalOptions, options_from_dict, options_to_dict
from nnunet_ima.evaluation.provenance import record_mismatch
from nnunet_ima.evaluation.report import attack_caption
from nnunet_ima.evaluation.resume import can_resume
from nnunet_ima.evaluation.robustness import (AttackSettings, _generator, attack_loss,
                                              evaluate_levels, scored_counts)
from nnunet_ima.evaluation.run_config import run_config
from nnunet_ima.metrics import slice_dice_from_counts
from nnunet_ima.norms import random_in_ball

from core_models import tiny_segmentation_problem
from test_eval_provenance import _model, _options, _records, _samples

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ members
def test_the_members_of_before_keep_their_attack_and_loss():
    base = AttackSettings(steps=7, random_start=False, alpha=3.0, seed=4)
    before = {"pgd": ("pgd", "dc_ce"), "pgd-ce": ("pgd", "ce"), "segpgd": ("segpgd", "ce"),
              "apgd": ("apgd", "dc_ce"), "apgd-mask-ce": ("apgd_sea", "mask_ce"),
              "apgd-bal-mask-ce": ("apgd_sea", "bal_mask_ce"), "apgd-js": ("apgd_sea", "js")}
    for name, (attack, loss) in before.items():
        assert member_settings(base, name) == dataclasses.replace(base, attack=attack, loss=loss)
    assert member_settings(base, None) is base


def test_rse_members_fix_their_steps_and_random_start():
    base = AttackSettings(steps=7, random_start=False)
    padam = member_settings(base, "rse-padam-cos")
    assert (padam.attack, padam.loss, padam.steps, padam.random_start) == ("padam", "cos", 200,
                                                                          True)
    apgd = member_settings(base, "rse-apgd-mask-norm-logit")
    # rse's APGD runs at the plain radius (not SEA's apgd_sea), the run's steps, and keeps
    # each slice's lowest-Dice iterate (apgd_lowest).
    assert (apgd.attack, apgd.loss, apgd.steps, apgd.random_start) == \
        ("apgd_lowest", "mask_norm_logit", 7, True)
    assert MEMBERS["rse-apgd-segpgd"].attack == "apgd_segpgd"
    assert member_settings(base, "padam-ce").steps == 7  # the plain PAdam member: the run's
    assert MEMBERS["cospgd"] == MemberSpec("pgd", "cospgd")


def test_every_member_and_preset_names_a_runnable_attack_and_loss():
    from nnunet_ima.evaluation.attacks import ATTACKS
    from nnunet_ima.evaluation.robustness import ATTACK_LOSSES
    for name in MEMBERS:
        settings = member_settings(AttackSettings(), name)   # AttackSettings checks both names
        assert settings.attack in ATTACKS and settings.loss in ATTACK_LOSSES
        attack_loss(settings.loss, None)
    for preset in PRESETS.values():
        assert set(preset.members) <= set(MEMBERS)


class Counting(nn.Module):
    """The network, counting its forward calls."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x):
        self.calls += 1
        return self.network(x)


def _calls(model, samples, settings):
    counting = Counting(model.network)
    evaluate_levels(dataclasses.replace(model, network=counting), samples, [2.0], settings, CPU)
    return counting.calls


def test_an_rse_padam_member_runs_its_200_steps_whatever_the_run_says():
    model, samples = tiny_segmentation_problem()
    base = AttackSettings(steps=5, batch_size=6, seed=0)   # one batch of all 6 slices
    plain = _calls(model, samples, member_settings(base, "padam-ce"))
    fixed = _calls(model, samples, member_settings(base, "rse-padam-ce"))
    # One network call per step (the rest, the final prediction, is the same for both).
    assert fixed - plain == 200 - 5
    # Restarts multiply the steps: 3 restarts of 5 steps, 10 more calls than 1 restart.
    assert _calls(model, samples, member_settings(dataclasses.replace(base, restarts=3),
                                                  "padam-ce")) - plain == 2 * 5 + 2


# ------------------------------------------------------------------------------ presets
EXPECTED = {
    "quick": (("pgd", "segpgd", "apgd-mask-ce", "apgd-bal-mask-ce", "apgd-js"), 20),
    "standard": (("pgd", "segpgd", "cospgd", "apgd", "apgd-mask-ce", "apgd-bal-mask-ce",
                  "apgd-js", "padam-ce", "padam-cos", "minimal"), 100),
    "sea": (("apgd-mask-ce", "apgd-bal-mask-ce", "apgd-js"), 300),
    "rse": (("rse-padam-ce", "rse-padam-cos", "rse-apgd-mask-ce", "rse-apgd-segpgd",
             "rse-apgd-js", "rse-apgd-mask-norm-logit", "minimal"), 300),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_a_preset_resolves_to_ordinary_members_and_settings(preset):
    members, steps = EXPECTED[preset]
    options = EvalOptions(output="o", dataset="2", device="cpu", preset=preset,
                          attack=AttackSettings(norm="linf", seed=3))
    assert options.ensemble == members and options.members == members
    assert options.attack == AttackSettings(norm="linf", seed=3, steps=steps, random_start=True,
                                            restarts=1)
    # A stored preset run (a shard's options) reads back as itself.
    assert options_from_dict(options_to_dict(options), output="o") == options
    # The command line gives the same options.
    args = cli.build_parser().parse_args(["-d", "2", "--device", "cpu", "-o", "o", "--preset",
                                          preset, "--norm", "linf", "--seed", "3"])
    assert cli.options_from_args(args) == dataclasses.replace(options, masking_checks=True)
    assert set(members) <= set(MEMBERS)


def test_the_quick_preset_is_the_default_ensemble_at_20_steps():
    assert PRESETS["quick"].members == DEFAULT_ENSEMBLE and PRESETS["quick"].steps == 20


@pytest.mark.parametrize("argv, message", [
    (["--ensemble", "pgd"], "--preset sea with --ensemble pgd: the preset sets the members"),
    (["--steps", "50"], "--preset sea with --steps 50: the preset sets the steps"),
    # Given at its default it is refused too: the preset would silently replace it.
    (["--steps", "100"], "--preset sea with --steps 100"),
    (["--restarts", "2"], "--preset sea with --restarts 2: the preset sets the restarts"),
    (["--attack", "apgd"], "--preset sea with --attack apgd: the preset sets the attack"),
    (["--no-random-start"], "--preset sea with --no-random-start: the preset sets the random"),
])
def test_the_command_line_refuses_what_a_preset_sets(tmp_path, capsys, argv, message):
    assert main(["-d", "2", "--device", "cpu", "-o", str(tmp_path / "o"), "--preset", "sea",
                 *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert f"drop {argv[0]}, or drop --preset" in err  # the fix
    assert not (tmp_path / "o").exists()


def test_attack_ensemble_agrees_with_a_preset():
    args = cli.build_parser().parse_args(["-d", "2", "--device", "cpu", "-o", "o", "--preset",
                                          "sea", "--attack", "ensemble"])
    assert cli.options_from_args(args).ensemble == EXPECTED["sea"][0]


@pytest.mark.parametrize("changes, message", [
    ({"ensemble": ("pgd",)}, "--preset rse runs the members rse-padam-ce"),
    ({"attack": AttackSettings(steps=7)}, "--preset rse runs 300 steps, not --steps 7"),
    ({"attack": AttackSettings(restarts=2)}, "--preset rse runs 1 restart, not --restarts 2"),
    ({"attack": AttackSettings(random_start=False)}, "drop --no-random-start"),
    ({"preset": "autoattack"}, "--preset must be one of ('quick', 'standard', 'sea', 'rse')"),
])
def test_eval_options_refuse_a_preset_with_other_settings(changes, message):
    with pytest.raises(UserInputError) as refused:
        EvalOptions(**{"output": "o", "dataset": "2", "device": "cpu", "preset": "rse",
                       **changes})
    assert message in str(refused.value)


def test_the_preset_settings_themselves_are_accepted():
    """What a preset resolves to (a shard's stored options) is not a conflict."""
    options = EvalOptions(output="o", dataset="2", device="cpu", preset="sea",
                          ensemble=EXPECTED["sea"][0], attack=AttackSettings(steps=300))
    assert options.attack.steps == 300


# ----------------------------------------------------------------------------- restarts
def test_restarts_need_the_random_start(tmp_path, capsys):
    with pytest.raises(InvalidSetting, match="restarts must be 1 without a random start"):
        AttackSettings(restarts=2, random_start=False)
    with pytest.raises(InvalidSetting, match="restarts must be an integer >= 1, got 0"):
        AttackSettings(restarts=0)
    assert main(["-d", "2", "--device", "cpu", "-o", str(tmp_path / "o"), "--restarts", "2",
                 "--no-random-start"]) == 2
    err = capsys.readouterr().err
    assert "--restarts must be 1 without a random start, got 2" in err
    assert "drop --no-random-start" in err


def test_restart_0_draws_the_start_runs_always_drew():
    def draw(generator):
        return torch.rand(5, generator=generator)

    # The key of (seed 0, noise 2.0, batch 0) as it always was; restart 1 another one.
    always = draw(torch.Generator().manual_seed(zlib.crc32(b"0/2.0/0")))
    assert torch.equal(draw(_generator(0, 2.0, 0)), always)
    assert torch.equal(draw(_generator(0, 2.0, 0, 0)), always)
    assert torch.equal(draw(_generator(0, 2.0, 0, 1)),
                       draw(torch.Generator().manual_seed(zlib.crc32(b"0/2.0/0/1"))))
    assert not torch.equal(draw(_generator(0, 2.0, 0, 1)), always)


def _one_restart(model, samples, settings, noise, restart):
    """Counts ``(3, N, K)`` and slice Dice ``(N,)`` of one run from restart ``restart``'s start,
    by hand: one batch of all samples."""
    x = torch.from_numpy(np.stack([s.image for s in samples]))
    y = torch.from_numpy(np.stack([s.label for s in samples])[:, None].astype(np.int64))
    eps = torch.full((len(samples),), noise)
    start = random_in_ball(x, eps, settings.norm, _generator(settings.seed, noise, 0, restart))
    adv = run_attack(settings.attack, model.network, x, y, eps, start, norm=settings.norm,
                     steps=settings.steps, alpha=settings.alpha,
                     loss=attack_loss(settings.loss, None))
    with torch.no_grad():
        counts = scored_counts(model.network(adv).argmax(1), y[:, 0], 2, None)
    return np.stack([c.numpy() for c in counts]), slice_dice_from_counts(*counts).numpy()


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_restarts_keep_per_slice_the_lowest_dice_run(attack):
    model, samples = tiny_segmentation_problem()
    settings = AttackSettings(attack=attack, steps=3, batch_size=6, seed=0)
    noise = 3.0
    one = evaluate_levels(model, samples, [noise], settings, CPU)[noise]
    three = evaluate_levels(model, samples, [noise], dataclasses.replace(settings, restarts=3),
                            CPU)[noise]
    runs = [_one_restart(model, samples, settings, noise, r) for r in range(3)]
    # Restart 0 is the run of one restart.
    assert np.array_equal(runs[0][0], np.stack([one.tp, one.fp, one.fn]))
    # Per slice the first run of lowest Dice (hand: ties to the earlier restart).
    dice = np.stack([d for _, d in runs])                                   # (3, N)
    chosen = [int(np.flatnonzero(column == column.min())[0]) for column in dice.T]
    expected = np.stack([runs[r][0][:, i] for i, r in enumerate(chosen)], axis=1)
    assert np.array_equal(np.stack([three.tp, three.fp, three.fn]), expected)
    # Never worse per slice than one restart, and better somewhere (the test can fail).
    assert np.all(three.slice_dice <= one.slice_dice + 1e-12)
    assert np.any(three.slice_dice < one.slice_dice - 1e-6)
    assert any(r > 0 for r in chosen)


# ----------------------------------------------------------------- records, resume, captions
def test_restarts_and_preset_are_recorded_only_when_set():
    config = run_config(_options(), [_model()], {"IMA": _samples()}, {})
    assert "restarts" not in config and "preset" not in config
    restarted = run_config(_options(restarts=2), [_model()], {"IMA": _samples()}, {})
    assert restarted["restarts"] == 2
    sea = EvalOptions(output="out", model_folders=("/models/IMA__nnUNetPlans__2d",),
                      images="/data/imagesTs", labels="/data/labelsTs", noise=(0, 5),
                      device="cpu", preset="sea")
    preset = run_config(sea, [_model()], {"IMA": _samples()}, {})
    assert (preset["preset"], preset["attack"], preset["ensemble"], preset["steps"]) == \
        ("sea", "ensemble", list(EXPECTED["sea"][0]), 300)
    # A part of another restart count or preset is not this run's.
    expected = _records().record("IMA", 5.0)
    assert "settings.restarts" in record_mismatch(_records(_options(restarts=2)).record(
        "IMA", 5.0), expected)


def test_a_folder_written_before_restarts_and_presets_resumes(tmp_path):
    """config.json and part records of a run written before (no restarts, no preset key) are
    this run's; a run of 2 restarts is refused in that folder."""
    options = _options()
    config = run_config(options, [_model()], {"IMA": _samples()}, {})
    before = {"models": config["models"], "fold": 0, "checkpoint": "final",
              "images": "/data/imagesTs", "labels": "/data/labelsTs", "include_empty": False,
              "max_slices": None, "noise": [0.0, 5.0], "attack": "pgd", "norm": "l2",
              "steps": 30, "alpha": 5.0, "random_start": True, "attack_loss": "dc_ce",
              "seed": 0, "batch_size": 16}
    (tmp_path / "config.json").write_text(json.dumps(before))
    assert can_resume(str(tmp_path), config, overwrite=False)
    with pytest.raises(UserInputError, match="restarts"):
        can_resume(str(tmp_path),
                   run_config(_options(restarts=2), [_model()], {"IMA": _samples()}, {}),
                   overwrite=False)
    # Stored options of before (a shard's, without restarts and preset) load as today's.
    stored = options_to_dict(options)
    del stored["attack"]["restarts"], stored["preset"]
    assert options_from_dict(stored, output=options.output) == options


def test_the_caption_names_the_preset_and_what_it_ran():
    config = {"attack": "ensemble", "ensemble": list(EXPECTED["rse"][0]), "steps": 300,
              "alpha": 5.0, "random_start": True, "norm": "linf", "preset": "rse"}
    caption = attack_caption(config)
    assert caption.startswith("preset rse: the per-slice worst case of rse-padam-ce (200 steps), "
                              "rse-padam-cos (200 steps), rse-apgd-mask-ce")
    assert "(Linf, 300 steps for the others, pgd / segpgd alpha 5, random start, 1 restart)" \
        in caption
    assert "DAG / PDPGD / ALMA-prox" in caption and "carried over" not in caption
    sea = attack_caption({**config, "preset": "sea", "norm": "l2",
                          "ensemble": list(EXPECTED["sea"][0])})
    assert "(L2, 300 steps each," in sea and "L2: SEA's protocol carried over" in sea
    # Without a preset or restarts, the caption of before.
    plain = {k: v for k, v in config.items() if k != "preset"}
    plain["ensemble"] = ["pgd", "segpgd"]
    assert attack_caption(plain) == ("the per-slice worst case of pgd, segpgd (Linf, 300 steps "
                                     "each, pgd / segpgd alpha 5, random start)")
    assert "3 restarts" in attack_caption({**plain, "restarts": 3})


# --------------------------------------------------------------- end to end (slow tier)
def test_a_preset_run_records_its_preset_and_resumes(nnunet_workspace, trained_clean_model,
                                                     tmp_path, monkeypatch, capsys):
    """--preset quick on a trained nnU-Net model: config.json, summary.json and the caption
    name the preset, its parts are the ensemble's, and an interrupted run resumes."""
    from nnunet_ima.evaluation import run
    ws = nnunet_workspace
    argv = ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "--preset", "quick", "--noise", "0", "3",
            "--max-slices", "2", "--masking-checks", "off", "-o", str(tmp_path / "out")]
    original, calls = run.save_part, []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(run, "save_part", crash_on_third)
    assert main(argv) == 130
    monkeypatch.setattr(run, "save_part", original)
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming: reused 2 (model, noise, attack) results" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["preset"], config["ensemble"], config["steps"]) == \
        ("quick", list(DEFAULT_ENSEMBLE), 20)
    assert "restarts" not in config
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["preset"] == "quick"
    assert summary["ensemble"]["members"] == list(DEFAULT_ENSEMBLE)
    # One part per (noise, member) with a clean pass shared at noise 0: 1 + 5.
    assert len(list((tmp_path / "out" / "parts").iterdir())) == 6
    assert "under preset quick: the per-slice worst case of pgd, segpgd" in \
        (tmp_path / "out" / "tvdi.md").read_text()
