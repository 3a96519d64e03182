"""The nnU-Net glue: everything of nnunet-ima that imports nnunetv2 or drives its commands.

The core (``nnunet_ima.attacks``, ``norms``, ``margins``, ``losses``, ``metrics``, ``config``...)
is plain PyTorch; the trainers and the evaluator build on both.
"""
