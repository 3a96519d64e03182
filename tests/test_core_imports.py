"""The core and the classification trainer are plain PyTorch: importing them loads no nnunetv2."""
import subprocess
import sys

CORE_MODULES = [
    "nnunet_ima.attacks", "nnunet_ima.norms", "nnunet_ima.margins", "nnunet_ima.losses",
    "nnunet_ima.metrics", "nnunet_ima.config", "nnunet_ima.model_mode",
    "nnunet_ima.distributed", "nnunet_ima.io", "nnunet_ima.errors", "nnunet_ima.plotting",
    "nnunet_ima.help_format",
    "nnunet_ima.classification.training", "nnunet_ima.classification.cli",
    "nnunet_ima.classification.compare", "nnunet_ima.classification.robust_eval",
    "nnunet_ima.evaluation.report",
]


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
