"""Vanilla adversarial training at eps = 5 (z-score units, L2), a baseline of the paper's tables."""
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerAdv_eps5(nnUNetTrainerAdv):
    ima_defaults = {"adv_eps": 5.0}
