"""benchmarks/presets_compare.py on hand-made summaries: the standard - sea gap, the verdict
against the 0.5-point tolerance, the strongest member and the cost in multiples of PGD-100."""
import json
import os

from benchmark_scripts import load_benchmark_script

compare = load_benchmark_script("presets_compare")


def _write(root, norm, run, tvdi, seconds, per_attack=None):
    folder = os.path.join(root, norm, run)
    os.makedirs(folder)
    entry = {"noise": {key: {"tvdi": value} for key, value in tvdi.items()}}
    summary = {"models": {"M": entry}}
    if per_attack is not None:
        summary["ensemble"] = {"per_attack": {"M": {
            member: {"noise": {key: {"tvdi": value} for key, value in values.items()}}
            for member, values in per_attack.items()}}}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(folder, "wall_seconds"), "w") as f:
        f.write(str(seconds))


def test_the_report_compares_standard_with_sea_and_prices_each_run(tmp_path):
    root = str(tmp_path)
    _write(root, "linf", "pgd", {"0": 0.9, "0.1": 0.6, "0.2": 0.4}, 100)
    _write(root, "linf", "standard", {"0": 0.9, "0.1": 0.5, "0.2": 0.31}, 1000,
           per_attack={"pgd": {"0": 0.9, "0.1": 0.6, "0.2": 0.4},
                       "padam-ce": {"0": 0.9, "0.1": 0.52, "0.2": 0.35}})
    _write(root, "linf", "sea", {"0": 0.9, "0.1": 0.52, "0.2": 0.30}, 900)
    lines = compare.norm_report(root, "linf")
    text = "\n".join(lines)
    # 0.1: 50 - 52 = -2.00 (standard stronger); 0.2: 31 - 30 = +1.00 (weaker beyond 0.5).
    assert "| M | 0.1 | 60.00 | 50.00 | 52.00 | -2.00 | padam-ce / - / - |" in text
    assert "| M | 0.2 | 40.00 | 31.00 | 30.00 | +1.00 | padam-ce / - / - |" in text
    assert "at 1 of 2 (model, noise) pairs" in text
    assert "pgd 1.0x, standard 10.0x, sea 9.0x" in text
    assert compare.norm_report(root, "l2") == []
