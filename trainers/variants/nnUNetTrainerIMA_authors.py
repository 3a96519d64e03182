"""IMA with the ``authors`` recipe: the IMA authors' segmentation code (see
``nnunet_ima.nnunet.settings.RECIPES``). The same as ``nnUNetTrainerIMA``, whose default it is;
the name keeps the recipe fixed should that default change."""
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA


class nnUNetTrainerIMA_authors(nnUNetTrainerIMA):
    ima_defaults = {"recipe": "authors"}
