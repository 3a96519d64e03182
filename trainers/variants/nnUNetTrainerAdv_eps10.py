"""Vanilla adversarial training at eps = 10 (z-score units, L2), a baseline of the paper's tables."""
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerAdv_eps10(nnUNetTrainerAdv):
    ima_defaults = {"adv_eps": 10.0}
