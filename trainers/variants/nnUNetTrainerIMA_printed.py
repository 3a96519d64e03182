"""IMA with the ``printed`` recipe: Algorithm 1 as printed in the paper (see ``nnunet_ima.nnunet.settings.RECIPES``)."""
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA


class nnUNetTrainerIMA_printed(nnUNetTrainerIMA):
    ima_defaults = {"recipe": "printed"}
