"""The benchmark scripts run (they are not timed here): short train_step.py runs (the tiny nnU-Net
plan, the digits classifier) print their table with the passes each step made and, last, the
three ratios; the pyradiomics benchmark refuses a bad --jobs."""
import os
import re
import subprocess
import sys


ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=600)


def test_train_step_benchmark_prints_the_three_ratios_last():
    result = _run("train_step.py", "--repeats", "1", "--warmup-steps", "20", "--pgd-steps", "2",
                  "--epoch-iterations", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # The shipped IMA trainer's recipe, measured: nnUNetTrainerIMA's own ("authors").
    # The first four keys where they always were, the baselines' ratios after them.
    assert re.fullmatch(r"ima_over_adv20=\d+\.\d{3} ima_over_plain=\d+\.\d{3} "
                        r"floor_efficiency=\d+\.\d{3} recipe=authors "
                        r"trades_over_adv20=\d+\.\d{3} nfgsm_over_adv20=\d+\.\d{3}", lines[-1])
    assert any(line.startswith("trainers: nnUNetTrainer, nnUNetTrainerAdv, nnUNetTrainerIMA "
                               "with their class defaults; IMA recipe 'authors'") for line in lines)
    assert any(line.startswith("baselines: nnUNetTrainerTRADES, nnUNetTrainerNFGSM with their "
                               "class defaults at Adv's eps 15;") for line in lines)
    rows = {line.split()[0]: line.split() for line in lines
            if line.startswith(("plain", "adv", "ima ", "trades ", "nfgsm "))}
    # Samples per step (train, attack, forward-only): plain 6 training samples; Adv 6 clean + 6
    # adversarial training samples and 2 PGD steps x 6 attack samples; IMA attacks every slice
    # (the authors' recipe) and a slice takes no PGD step after it crossed.
    # Columns: name, median s, train, attack, forward, floor s.
    assert rows["plain"][-4:-1] == ["6", "0", "0"]
    assert rows["adv"][-4:-1] == ["12", "12", "0"]
    assert 6 <= int(rows["ima"][-4]) <= 12 and int(rows["ima"][-3]) <= 12
    # TRADES: a clean and an adversarial training forward of the 6 slices, PGD on the KL with
    # Adv's 2 steps x 6; N-FGSM: Adv's clean + adversarial 12 and one attack step x 6.
    assert rows["trades"][-4:-1] == ["12", "12", "0"]
    assert rows["nfgsm"][-4:-1] == ["12", "6", "0"]
    for name in ("plain", "adv", "ima", "trades", "nfgsm"):
        assert 0 < float(rows[name][-1]) <= 10 * float(rows[name][-5])  # floor: a real time
    assert any(line.startswith("IMA epoch of 2 train steps") for line in lines)


def test_pyradiomics_benchmark_refuses_jobs_below_one(tmp_path):
    result = _run("pyradiomics_benchmark.py", "--workdir", str(tmp_path / "w"), "--jobs", "0")
    assert result.returncode == 2
    assert "--jobs must be >= 1" in result.stderr
    assert not (tmp_path / "w").exists()


def test_a_benchmark_refuses_val_iterations_below_one(tmp_path):
    result = _run("colin27_benchmark.py", "--workdir", str(tmp_path / "w"), "--val-iterations",
                  "0")
    assert result.returncode == 2
    assert "--val-iterations must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "w").exists()


def test_train_step_benchmark_runs_the_classification_trainer_on_digits():
    result = _run("train_step.py", "--classification", "digits", "--repeats", "1",
                  "--warmup-steps", "30", "--pgd-steps", "2", "--batch-size", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("ima_over_adv20=")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("ce ", "adv", "ima "))}
    assert rows["ce"][-4:-1] == ["16", "0", "0"]
    assert rows["adv"][-4:-1] == ["32", "32", "0"]      # clean + adversarial; 2 PGD steps x 16
    assert int(rows["ima"][-3]) <= 32                    # PGD on the correct samples only
