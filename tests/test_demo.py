"""The README's first command, `nnunet-ima demo`, end to end (with a shorter schedule)."""
import json
import os
import subprocess
import sys


def test_demo_runs_all_steps_and_prints_the_tables(tmp_path):
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("nnUNet_") and k != "NNUNET_IMA_CONFIG"}
    command = [os.path.join(os.path.dirname(sys.executable), "nnunet-ima"), "demo",
               "--workdir", str(workdir), "--epochs", "2", "--iterations", "3",
               "--eval-steps", "5", "--max-slices", "4", "--cases", "6"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "TVDI (%)" in out and "ADI (%)" in out
    for trainer in ("nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA"):
        assert f"| {trainer} |" in out
        assert f"-tr {trainer} -device cpu" in out  # the nnU-Net command is shown to the user
    summary = json.loads((workdir / "robustness" / "summary.json").read_text())
    assert sorted(summary["models"]) == ["nnUNetTrainerAdv", "nnUNetTrainerClean", "nnUNetTrainerIMA"]
    assert set(summary["models"]["nnUNetTrainerIMA"]["noise"]) == {"0", "4", "8", "16"}

    # A second run skips every finished step and prints the same tables.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("already trained, skipped") == 3
    table = out[out.index("TVDI (%)"):out.index("results in")]
    assert table in again.stdout
