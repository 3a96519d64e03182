"""Vanilla adversarial training at eps = 1 (z-score units, L2), a baseline of the paper's tables."""
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerAdv_eps1(nnUNetTrainerAdv):
    ima_defaults = {"adv_eps": 1.0}
