"""N-FGSM adversarial training at eps = 8 (z-score units, L2)."""
from nnunet_ima.trainers.nnUNetTrainerNFGSM import nnUNetTrainerNFGSM


class nnUNetTrainerNFGSM_eps8(nnUNetTrainerNFGSM):
    ima_defaults = {"adv_eps": 8.0}
