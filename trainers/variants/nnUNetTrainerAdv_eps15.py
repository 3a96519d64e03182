"""Vanilla adversarial training at eps = 15 (z-score units, L2), a baseline of the paper's tables."""
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerAdv_eps15(nnUNetTrainerAdv):
    ima_defaults = {"adv_eps": 15.0}
