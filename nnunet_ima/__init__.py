"""nnunet-ima: Increasing-Margin Adversarial (IMA) training for nnU-Net v2 and classifiers.

The core (``attacks``, ``margins``, ``losses``, ``metrics``, ``config``) is plain PyTorch;
``nnunet_ima.trainers`` holds the nnU-Net trainer classes, ``nnunet_ima.evaluation`` the
robustness evaluator and ``nnunet_ima.classification`` the classification trainer.
"""
__version__ = "0.1.0"


def installed_version() -> str:
    """The installed distribution's version, as every command's ``--version`` prints it."""
    import importlib.metadata
    try:
        return importlib.metadata.version("nnunet-ima")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"
