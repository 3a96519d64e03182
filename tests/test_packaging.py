"""The built wheel holds every subpackage, under nnunet_ima only, and the console scripts."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_packages():
    """Every folder with an __init__.py under the source roots, as its installed dotted name."""
    roots = {"nnunet_ima": "nnunet_ima", "trainers": "nnunet_ima/trainers",
             "evaluation": "nnunet_ima/evaluation"}
    found = set()
    for src, installed in roots.items():
        for folder, _, files in os.walk(os.path.join(ROOT, src)):
            if "__init__.py" in files and "__pycache__" not in folder:
                rel = os.path.relpath(folder, os.path.join(ROOT, src))
                found.add(os.path.normpath(os.path.join(installed, rel)).replace(os.sep, "/"))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True)
    (path,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return zipfile.ZipFile(path)


def test_wheel_contains_every_subpackage(wheel):
    names = set(wheel.namelist())
    packages = _source_packages()
    assert {"nnunet_ima", "nnunet_ima/trainers", "nnunet_ima/evaluation"} <= packages
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"


def test_no_generic_top_level_packages(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nnunet_ima"}


def test_console_scripts_declared(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry).decode()
    for script in ("nnunet-ima =", "nnunet-ima-eval =", "nnunet-ima-classify ="):
        assert script in text


def test_trainer_dir_points_at_the_trainers_folder():
    out = subprocess.run([sys.executable, "-m", "nnunet_ima.cli", "trainer-dir"], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert os.path.isdir(out) and os.path.basename(out) == "trainers"
