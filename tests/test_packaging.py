"""The built wheel holds every subpackage, under nnunet_ima only, and the console scripts."""
import os
import shutil
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
    # Built from a copy: setuptools reuses an in-tree build/ folder, whose stale files from an
    # earlier build would end up in the wheel and hide a package left out of setup.cfg.
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("nnunet_ima", "trainers", "evaluation"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out)], check=True)
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


def test_wheel_maps_each_source_folder_to_its_package(wheel):
    # trainers/ must land at nnunet_ima/trainers/ (and evaluation/ at nnunet_ima/evaluation/),
    # file for file: a wrong package_dir would still ship some folder's __init__.py there.
    names = set(wheel.namelist())
    for src, installed in (("trainers", "nnunet_ima/trainers"),
                           ("evaluation", "nnunet_ima/evaluation")):
        for folder, _, files in os.walk(os.path.join(ROOT, src)):
            rel = os.path.relpath(folder, os.path.join(ROOT, src)).replace(os.sep, "/")
            for name in files:
                if name.endswith(".py"):
                    target = os.path.normpath(f"{installed}/{rel}/{name}").replace(os.sep, "/")
                    source = os.path.normpath(f"{src}/{rel}/{name}").replace(os.sep, "/")
                    assert target in names, f"{source} is not at {target} in the wheel"


def test_trainer_dir_lets_nnunet_find_the_trainers():
    # What `export nnUNet_extTrainer=$(nnunet-ima trainer-dir)` gives nnU-Net: the folder of the
    # package nnunet_ima.trainers, where nnU-Net's own lookup finds the trainers, variants/ too.
    out = subprocess.run([sys.executable, "-m", "nnunet_ima.cli", "trainer-dir"], check=True,
                         capture_output=True, text=True).stdout.strip()
    import nnunet_ima.trainers
    assert os.path.samefile(out, os.path.dirname(nnunet_ima.trainers.__file__))
    names = ("nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA",
             "nnUNetTrainerIMA_authors")
    probe = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
             f"for name in {names!r}:\n"
             "    cls = recursive_find_trainer_class_by_name(name)\n"
             "    print('found', cls.__name__)")
    log = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env={**os.environ, "nnUNet_extTrainer": out}).stdout
    assert [line for line in log.splitlines() if line.startswith("found ")] == [
        f"found {name}" for name in names]
    for name in names:
        assert f"Using trainer '{name}' from: {out}" in log
