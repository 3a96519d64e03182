"""IMA with the ``authors`` recipe: the IMA authors' segmentation code (see ``nnunet_ima.trainer_config.RECIPES``)."""
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA


class nnUNetTrainerIMA_authors(nnUNetTrainerIMA):
    ima_defaults = {"recipe": "authors"}
