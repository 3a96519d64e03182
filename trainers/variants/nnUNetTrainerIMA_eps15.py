"""IMA with eps_max = 15 (z-score units, L2), a setting of the paper's segmentation tables."""
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA


class nnUNetTrainerIMA_eps15(nnUNetTrainerIMA):
    ima_defaults = {"eps_max": 15.0}
