"""The core and the classification trainer are plain PyTorch: importing them loads no nnunetv2."""
import os
import subprocess
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_ima")


def _modules(folder, package):
    """The modules of the files directly in ``folder`` (``__init__.py`` as the package)."""
    return [package if name == "__init__.py" else f"{package}.{name[:-3]}"
            for name in sorted(os.listdir(folder)) if name.endswith(".py")]


# The core (every module directly in nnunet_ima/, the nnU-Net glue being in nnunet/ and the
# subcommands in commands/) and the classification trainer, read from the folders so that a new
# module is covered; and the evaluator's report writer (tables and files from plain arrays).
CORE_MODULES = (_modules(PACKAGE, "nnunet_ima")
                + _modules(os.path.join(PACKAGE, "classification"), "nnunet_ima.classification")
                + ["nnunet_ima.evaluation.report"])


def test_the_core_list_is_read_from_the_folders():
    assert {"nnunet_ima.attacks", "nnunet_ima.declared", "nnunet_ima.devices",
            "nnunet_ima.classification.training"} <= set(CORE_MODULES)
    glue = ("nnunet_ima.nnunet", "nnunet_ima.commands")
    assert not [m for m in CORE_MODULES if m.startswith(glue)]


def test_core_imports_no_nnunetv2():
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in CORE_MODULES)
            + "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'nnunetv2')\n"
            + "print(repr(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"nnunetv2 modules loaded by the core: {out.stdout}"


def test_the_glue_does_import_nnunetv2():
    """The check above can fail: the nnU-Net glue, imported the same way, loads nnunetv2."""
    code = ("import sys\nimport nnunet_ima.nnunet.data\n"
            "print(any(m.split('.')[0] == 'nnunetv2' for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
