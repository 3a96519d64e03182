"""Each sample's minimal adversarial noise (``--minimal-noise``): the combination of the
minimal-perturbation attack with the grid of the run's own attacks, by hand; censoring and the
statistics; the witness check; and the evaluator end to end on a tiny network (the csv, the
summary, the table, the curve, the threshold's validation and the resume of its part)."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation import attacks, minimal_noise as mn
from nnunet_ima.evaluation import plots, run, run_config as run_config_module
from nnunet_ima.evaluation.cli import build_parser, main, options_from_args
from nnunet_ima.evaluation.robustness import NoiseResult

from core_models import tiny_segmentation_problem

pytestmark = pytest.mark.usefixtures("one_thread")
INF = math.inf


# ------------------------------------------------------------------------- combining, by hand

def test_the_grid_gives_the_smallest_level_below_the_threshold():
    dice = {0.0: np.array([0.9, 0.4, 0.9, 0.9]),
            1.0: np.array([0.6, 0.3, 0.45, 0.9]),
            2.0: np.array([0.49, 0.2, 0.55, 0.8]),   # sample 2 recovers above: still broken at 1
            4.0: np.array([0.1, 0.0, 0.1, 0.5])}     # 0.5 is not below 0.5
    assert mn.grid_minimal(dice, 0.5).tolist() == [2.0, 0.0, 1.0, INF]


def test_the_smaller_witness_wins_and_unbroken_samples_are_censored():
    attack = np.array([0.7, 3.0, INF, INF, 0.0, 2.0])
    grid = np.array([1.0, 2.0, 4.0, INF, 0.0, 2.0])
    value, source, censored = mn.combine(attack, grid, censored_at=16.0)
    assert value.tolist() == [0.7, 2.0, 4.0, 16.0, 0.0, 2.0]
    assert source.tolist() == ["attack", "grid", "grid", "none", "clean", "grid"]  # tie: grid
    assert censored.tolist() == [False, False, False, True, False, False]
    # The attack alone finds a clean break too (no level 0 in the grid).
    value, source, _ = mn.combine(np.array([0.0]), np.array([INF]), 8.0)
    assert (value.tolist(), source.tolist()) == ([0.0], ["clean"])


def _result(dice_of_class_1):
    """A one-class NoiseResult whose slice Dice are the given values (tp / fp / fn chosen so)."""
    n = len(dice_of_class_1)
    tp = np.array([[int(round(100 * d))] for d in dice_of_class_1])
    fp = np.zeros((n, 1), dtype=np.int64)
    fn = 2 * (100 - tp)   # Dice = 2 tp / (2 tp + fn) = tp / 100
    return NoiseResult([f"c{i}" for i in range(n)], [0] * n, tp, fp, fn, {})


def test_statistics_count_censored_samples_as_infinite():
    settings = mn.minimal_settings(0.5, "l2", 10, [0, 1, 2, 4])
    assert (settings.init_eps, settings.max_eps) == (1.0, 16.0)
    grid = {0.0: _result([0.9, 0.9, 0.9, 0.9, 0.2]), 1.0: _result([0.9, 0.9, 0.9, 0.9, 0.1]),
            2.0: _result([0.9, 0.3, 0.9, 0.9, 0.1]), 4.0: _result([0.9, 0.1, 0.9, 0.9, 0.0])}
    attack = np.array([0.5, 3.0, 6.0, INF, INF])
    reach = np.array([0.5, 3.0, 6.0, 9.0, 0.0])   # the attack's last iterate got to 9
    found = mn.combined([f"c{i}" for i in range(5)], [0] * 5, attack, reach, grid, settings)
    assert found.value.tolist() == [0.5, 2.0, 6.0, 9.0, 0.0]
    assert found.source.tolist() == ["attack", "grid", "attack", "none", "clean"]
    entry = mn.summarise(found, [0, 1, 2, 4])
    # Sorted with inf: [0, 0.5, 2, 6, inf]: q25 at position 1, median 2, q75 at position 3.
    assert (entry["q25"], entry["median"], entry["q75"]) == (0.5, 2.0, 6.0)
    assert not any(entry[f"{q}_censored"] for q in ("q25", "median", "q75"))
    assert entry["fraction_above"] == {"0": 0.8, "1": 0.6, "2": 0.4, "4": 0.4}
    assert entry["n"] == 5 and entry["n_censored"] == 1 and entry["censored_at"] == 9.0
    assert entry["sources"] == {"clean": 1, "grid": 1, "attack": 2, "none": 1}
    assert (entry["threshold"], entry["norm"], entry["steps"]) == (0.5, "l2", 10)
    # Mostly censored: the median and q75 are only known to exceed the budget.
    # Censored at the largest level (1) or further where the attack's last iterate got further.
    found = mn.combined(["c0", "c1", "c2"], [0] * 3, np.array([1.0, INF, INF]),
                        np.array([1.0, 0.5, 3.0]), {1.0: _result([0.9, 0.9, 0.9])},
                        mn.minimal_settings(0.5, "l2", 5, [1]))
    assert found.value.tolist() == [1.0, 1.0, 3.0] and found.censored_at == 1.0
    entry = mn.summarise(found, [1])
    assert entry["median"] is None and entry["median_censored"] is True
    assert entry["q75"] is None and entry["q75_censored"] is True
    # q25 interpolates between 1 and a censored value: unknown too.
    assert entry["q25"] is None and entry["q25_censored"] is True
    assert "| m | 3 | > 1 | > 1 | > 1 | 66.7 | 2 |" in mn.markdown_table({"m": entry}, [1])


def test_quantiles_match_numpy_where_nothing_is_censored():
    values = np.array([3.0, 0.5, 1.25, 7.0, 2.0, 0.0])
    for q in (0.25, 0.5, 0.75, 0.1):
        assert mn.quantile(values, q) == pytest.approx(np.quantile(values, q))
    assert mn.quantile(np.array([1.0, INF]), 0.0) == 1.0
    assert mn.quantile(np.array([1.0, INF]), 1.0) == INF


def test_the_survival_curve_steps_at_each_value():
    settings = mn.minimal_settings(0.5, "linf", 3, [0.5, 1.0])
    found = mn.combined(["c0", "c1", "c2", "c3"], [0] * 4, np.array([0.25, 1.5, INF, 0.0]),
                        np.array([0.25, 1.5, 2.5, 0.0]), {1.0: _result([0.9] * 4)}, settings)
    e, fraction = mn.survival_curve(found)
    assert e.tolist() == [0.0, 0.25, 1.5, 2.5]
    assert fraction.tolist() == [0.75, 0.5, 0.25, 0.25]   # the censored one stays above


# ------------------------------------------------------------------------- the witness check

class FixedAttack:
    """A stand-in for :func:`.attacks.minimal_perturbation` that returns chosen witnesses: each
    sample's input scaled by ``1 + factor`` (a noise of ``factor * ||x||``), flagged found."""

    def __init__(self, factors, found):
        self.factors, self.found, self.calls = factors, found, []

    def __call__(self, model, x, y, *, norm, steps, score, threshold, loss, init_eps,
                 max_eps=None, start=None):
        self.calls.append(dict(norm=norm, steps=steps, threshold=threshold, init_eps=init_eps,
                               max_eps=max_eps, batch=x.shape[0]))
        factors = torch.tensor(self.factors[:x.shape[0]], dtype=x.dtype)
        x_adv = x * (1 + factors.view(-1, 1, 1, 1))
        return attacks.MinimalRun(x_adv, torch.zeros(x.shape[0]),
                                  torch.tensor(self.found[:x.shape[0]]))


@pytest.fixture(scope="module")
def tiny():
    return tiny_segmentation_problem()


def test_a_witness_counts_only_where_it_scores_below_the_threshold(tiny, monkeypatch):
    model, samples = tiny
    samples = samples[:3]
    # -1: the input becomes 0 (no object left: Dice 0); 0: the clean input (Dice > 0.9).
    fake = FixedAttack([-1.0, 0.0, -1.0], [True, True, False])
    monkeypatch.setattr(attacks, "minimal_perturbation", fake, raising=False)
    settings = mn.minimal_settings(0.5, "l2", 7, [0, 2, 4])
    noise, reach = mn.attack_minimal(model, samples, settings, batch_size=16,
                                     device=torch.device("cpu"))
    # Found and broken: its noise measured on the witness (||x||); found but not broken, or
    # not found: no witness. The reach is the size of what it returned, either way.
    norms = [float(np.linalg.norm(s.image)) for s in samples]
    assert noise[0] == pytest.approx(norms[0], rel=1e-5)
    assert noise[1:].tolist() == [INF, INF]
    assert reach == pytest.approx([norms[0], 0.0, norms[2]], rel=1e-5)
    assert fake.calls == [dict(norm="l2", steps=7, threshold=0.5, init_eps=2.0, max_eps=16.0,
                               batch=3)]


# ------------------------------------------------------------------------- options

@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_a_threshold_outside_0_1_is_refused(tmp_path, value):
    args = build_parser().parse_args(["-m", str(tmp_path), "-o", str(tmp_path / "o"),
                                      "--device", "cpu", "--dice-threshold", value])
    with pytest.raises(UserInputError, match="--dice-threshold"):
        options_from_args(args)


def test_the_cli_exits_2_naming_the_threshold(tmp_path, capsys):
    assert main(["-m", str(tmp_path), "-o", str(tmp_path / "o"), "--device", "cpu",
                 "--minimal-noise", "--dice-threshold", "1"]) == 2
    err = capsys.readouterr().err
    assert "--dice-threshold" in err and "between 0 and 1" in err
    assert not os.path.exists(tmp_path / "o")
    assert main(["-m", str(tmp_path), "-o", str(tmp_path / "o"), "--device", "cpu",
                 "--minimal-noise", "--noise", "0"]) == 2
    assert "--minimal-noise" in capsys.readouterr().err


def test_the_options_default_to_off_and_the_attacks_steps(tmp_path):
    def parsed(*extra):
        return options_from_args(build_parser().parse_args(
            ["-m", str(tmp_path), "-o", str(tmp_path / "o"), "--device", "cpu", *extra]))
    plain = parsed()
    assert (plain.minimal_noise, plain.dice_threshold, plain.minimal_noise_steps) == \
        (False, 0.5, None)
    assert parsed("--steps", "12").minimal_steps == 12
    assert parsed("--steps", "12", "--minimal-noise-steps", "30").minimal_steps == 30
    with pytest.raises(UserInputError, match="--minimal-noise-steps"):
        parsed("--minimal-noise-steps", "0")


# ------------------------------------------------------------------------- end to end

@pytest.fixture
def tiny_evaluator(tiny, monkeypatch):
    """``nnunet-ima-eval`` with its models and samples replaced by the tiny problem's."""
    model, samples = tiny
    monkeypatch.setattr(run_config_module, "case_source", lambda m, o: ["test"])
    monkeypatch.setattr(run_config_module, "training_cases_note", lambda m, o: "")

    def prepare(options, preflight=True):
        by_model = {model.name: samples}
        config = run_config_module.run_config(options, [model], by_model, {})
        return run.Prepared(options, torch.device("cpu"), [model], by_model, config,
                            run._part_records(options, config, [model], by_model))
    monkeypatch.setattr(run, "_prepare", prepare)
    return model, samples


def _argv(out, *extra):
    return ["-m", "tiny", "-o", str(out), "--device", "cpu", "--no-progress", "--noise", "0",
            "0.5", "1.5", "--steps", "4", "--attack", "pgd", "--minimal-noise", *extra]


def _rows(out):
    with open(out / "minimal_noise.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_minimal_noise_end_to_end_and_its_resume(tiny_evaluator, tmp_path, monkeypatch, capsys):
    model, samples = tiny_evaluator
    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: (figures.append((os.path.basename(path),
                                                           len(fig.axes))),
                                           real_save(fig, path)))
    out = tmp_path / "out"
    assert main(_argv(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["minimal_noise"][model.name]
    assert set(entry) >= {"threshold", "norm", "n", "median", "q25", "q75", "fraction_above",
                          "censored_at", "n_censored", "sources", "steps", "loss"}
    assert (entry["threshold"], entry["norm"], entry["n"], entry["steps"]) == (0.5, "l2", 6, 4)
    assert list(entry["fraction_above"]) == ["0", "0.5", "1.5"] and entry["max_eps"] == 6.0
    rows = _rows(out)
    assert [(r["case"], r["slice"]) for r in rows] == [(s.case, str(s.index)) for s in samples]
    assert {r["source"] for r in rows} <= set(mn.SOURCES)
    values = np.array([INF if r["censored"] == "1" else float(r["minimal_noise"]) for r in rows])
    # The csv and the summary agree (independently recomputed from the rows).
    for key, level in entry["fraction_above"].items():
        assert level == pytest.approx(np.mean(values > float(key)))
    assert entry["n_censored"] == int(np.isinf(values).sum())
    # The grid rule against the run's own per-slice Dice: no value above the smallest level
    # that broke the sample there.
    with open(out / "per_slice.csv", newline="") as f:
        per_slice = list(csv.DictReader(f))
    for r, v in zip(rows, values):
        broken = sorted(float(p["noise"]) for p in per_slice
                        if p["case"] == r["case"] and float(p["slice_dice"]) < 0.5)
        if broken:
            assert v <= broken[0] + 1e-12
            assert r["source"] in ("grid", "clean") or v < broken[0]
    assert ("curves.png", 3) in figures and (out / "curves.png").is_file()
    table = (out / "minimal_noise.md").read_text()
    assert "upper bounds" in table and f"| {model.name} | 6 |" in table
    assert "Minimal noise (L2" in capsys.readouterr().out
    assert os.path.isfile(out / "parts" / "tiny__minimal_noise.npz")

    # A rerun reuses the part; a changed threshold recomputes it (without redoing the attacks).
    calls = []
    real = attacks.minimal_perturbation
    monkeypatch.setattr(attacks, "minimal_perturbation",
                        lambda *a, **k: calls.append(k["threshold"]) or real(*a, **k))
    assert main(_argv(out)) == 0
    assert calls == [] and "reused the minimal noise of tiny" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["minimal_noise"] == \
        summary["minimal_noise"]
    assert main(_argv(out, "--dice-threshold", "0.8")) == 0
    assert calls == [0.8]
    printed = capsys.readouterr().out
    assert "recomputing the minimal noise of tiny" in printed
    assert "resuming: reused 3 of 3 (model, noise) results" in printed
    higher = json.loads((out / "summary.json").read_text())["minimal_noise"][model.name]
    assert higher["threshold"] == 0.8
    # A higher threshold breaks a sample no later: no sample's value grows (same grid).
    assert higher["fraction_above"]["0.5"] <= entry["fraction_above"]["0.5"] + 1e-12
    # Without the option, the minimal-noise files of the earlier run are removed.
    assert main(_argv(out)[:-1]) == 0
    assert not (out / "minimal_noise.csv").exists()
    assert "minimal_noise" not in json.loads((out / "summary.json").read_text())


def test_censoring_end_to_end(tiny_evaluator, tmp_path, monkeypatch):
    # An attack that never finds a witness and a grid that never breaks: all censored.
    model, samples = tiny_evaluator
    monkeypatch.setattr(attacks, "minimal_perturbation",
                        FixedAttack([0.0] * 16, [False] * 16), raising=False)
    out = tmp_path / "out"
    assert main(["-m", "tiny", "-o", str(out), "--device", "cpu", "--no-progress", "--noise",
                 "0", "0.01", "--steps", "2", "--attack", "pgd", "--minimal-noise"]) == 0
    entry = json.loads((out / "summary.json").read_text())["minimal_noise"][model.name]
    # The stand-in returns the clean input (reach 0): censored at the largest level.
    assert entry["n_censored"] == 6 and entry["censored_at"] == pytest.approx(0.01)
    assert entry["median"] is None and entry["median_censored"]
    assert all(v == 1.0 for v in entry["fraction_above"].values())
    rows = _rows(out)
    assert {(r["source"], r["censored"], r["minimal_noise"]) for r in rows} == {
        ("none", "1", "0.01")}
    assert "> 0.01" in (out / "minimal_noise.md").read_text()


def test_shards_leave_it_to_the_merge(tiny_evaluator, tmp_path):
    model, samples = tiny_evaluator
    out = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        assert main(_argv(out, "--shard", shard)) == 0
        assert not (out / "minimal_noise.csv").exists()   # a shard writes no table
    assert main(["merge", str(out), "--no-progress"]) == 0
    merged = json.loads((out / "summary.json").read_text())["minimal_noise"]
    assert main(_argv(tmp_path / "one")) == 0
    alone = json.loads((tmp_path / "one" / "summary.json").read_text())["minimal_noise"]
    assert merged == alone
    assert _rows(out) == _rows(tmp_path / "one")


def test_under_an_ensemble_the_grid_is_the_per_slice_worst_case(tiny_evaluator, tmp_path,
                                                                monkeypatch):
    # No witness from the attack: every value is the grid's, which must be the smallest level
    # at which some member (the per-slice worst case) brought the slice below the threshold.
    model, samples = tiny_evaluator
    monkeypatch.setattr(attacks, "minimal_perturbation",
                        FixedAttack([0.0] * 16, [False] * 16), raising=False)
    out = tmp_path / "ens"
    assert main(["-m", "tiny", "-o", str(out), "--device", "cpu", "--no-progress", "--noise",
                 "0", "4", "8", "16", "--steps", "5", "--attack", "ensemble", "--ensemble", "pgd",
                 "segpgd", "--masking-checks", "off", "--minimal-noise"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    members = summary["ensemble"]["per_attack"][model.name]
    assert list(members) == ["pgd", "segpgd"]
    with open(out / "per_slice.csv", newline="") as f:
        headline = [r for r in csv.DictReader(f)]   # the per-slice worst case
    for r in _rows(out):
        broken = sorted(float(p["noise"]) for p in headline
                        if p["case"] == r["case"] and float(p["slice_dice"]) < 0.5)
        if broken:
            assert (float(r["minimal_noise"]), r["source"], r["censored"]) == \
                (broken[0], "clean" if broken[0] == 0 else "grid", "0")
        else:
            assert (r["source"], r["censored"]) == ("none", "1")
    assert any(r["source"] == "grid" for r in _rows(out))   # the attacks broke some slice


def test_minimal_noise_of_a_trained_nnunet_model_through_its_predictor(nnunet_workspace,
                                                                        trained_clean_model,
                                                                        tmp_path):
    # nnU-Net's predictor segments in its own precision: every attack witness is scored again
    # through it, and a value from the attack is a perturbation that breaks the slice there.
    ws = nnunet_workspace
    out = tmp_path / "predictor"
    assert main(["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
                 "--device", "cpu", "--no-progress", "-o", str(out), "--inference", "predictor",
                 "--noise", "0", "3", "--steps", "2", "--max-slices", "3", "--minimal-noise",
                 "--minimal-noise-steps", "40"]) == 0
    entry = json.loads((out / "summary.json").read_text())["minimal_noise"]["nnUNetTrainerClean"]
    assert entry["n"] == 3 and entry["max_eps"] == 12.0 and entry["steps"] == 40
    rows = _rows(out)
    assert len(rows) == 3 and all(r["source"] in mn.SOURCES for r in rows)
    for r in rows:
        assert (r["censored"] == "1") == (r["source"] == "none")
        if r["source"] == "attack":
            assert 0 < float(r["minimal_noise"]) <= 12.0 * (1 + 1e-6)
