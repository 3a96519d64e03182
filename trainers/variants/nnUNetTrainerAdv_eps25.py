"""Vanilla adversarial training at eps = 25 (z-score units, L2), a baseline of the paper's tables."""
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerAdv_eps25(nnUNetTrainerAdv):
    ima_defaults = {"adv_eps": 25.0}
