"""Fine-tuning from a trained model: every weight of an nnU-Net checkpoint, heads included.

The setting ``finetune_from`` names an nnU-Net checkpoint (``checkpoint_final.pth`` /
``checkpoint_best.pth``: a dict whose ``network_weights`` is the network's state dict). The
trainers load all of it at the end of ``initialize()`` (:func:`load_finetune_weights`), into
the module inside nnU-Net's DDP and torch.compile wrappers, as nnU-Net's
``load_pretrained_weights`` finds it. Unlike ``nnUNetv2_train -pretrained_weights``, which
leaves out the ``.seg_layers.`` (the segmentation heads restart from a random initialisation, so
that a model can be transferred to another label set), nothing is left out: the fine-tuned run
starts from the trained model's predictions. A checkpoint of another plans, configuration or
label set is therefore refused, naming the first parameter that does not fit.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_ima.errors import UserInputError

# What a wrapper adds in front of every key of a state dict saved without unwrapping it
# (nnU-Net's save_checkpoint unwraps; other code may not).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

FIX = ("Set finetune_from to the checkpoint_final.pth (or checkpoint_best.pth) of a model "
       "trained on this dataset with the same plans, configuration and labels "
       "(nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION/fold_F/), or remove the key to "
       "train from nnU-Net's initialisation.")
OTHER_LABELS_FIX = ("To start from a model of another label set, use nnUNetv2_train ... "
                    "-pretrained_weights CHECKPOINT instead (without finetune_from): it loads "
                    "every weight but the segmentation heads.")


def inner_module(network: nn.Module) -> nn.Module:
    """The network inside nnU-Net's DDP and torch.compile wrappers (the one whose state dict
    nnU-Net saves), as nnU-Net's ``load_pretrained_weights`` finds it."""
    module = network.module if isinstance(network, DistributedDataParallel) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def _strip_wrappers(key: str, known: Mapping[str, Any]) -> str:
    """``key`` without the wrapper prefixes in front of it, where the network does not know it
    with them (nnU-Net's heuristic for ``module.``, extended to torch.compile's prefix)."""
    while key not in known and key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The nnU-Net checkpoint at ``path``, on the CPU.

    Raises:
        UserInputError: ``path`` is missing, a folder, unreadable or not an nnU-Net checkpoint;
            the message names ``path`` and the fix.
    """
    if os.path.isdir(path):
        raise UserInputError(f"finetune_from: {path} is a folder, not a checkpoint file. {FIX}")
    if not os.path.isfile(path):
        raise UserInputError(f"finetune_from: {path} does not exist. {FIX}")
    try:
        # nnU-Net's checkpoints hold its plans and logs besides the tensors (weights_only=False,
        # as nnU-Net loads them); this is the user's own model file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises many types
        raise UserInputError(f"finetune_from: cannot read {path} ({type(e).__name__}: {e}); "
                             f"is the file complete? {FIX}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"),
                                                          Mapping):
        raise UserInputError(f"finetune_from: {path} is not an nnU-Net checkpoint (it has no "
                             f"'network_weights'). {FIX}")
    return checkpoint


def _shape(tensor: Any) -> str:
    return str(tuple(tensor.shape)) if hasattr(tensor, "shape") else type(tensor).__name__


def weights_problem(source: Mapping[str, Any], target: Mapping[str, torch.Tensor]
                    ) -> Optional[str]:
    """Why the state dict ``source`` (the checkpoint's, prefixes stripped) cannot replace
    ``target`` (the network's) whole; ``None`` when it can. Names the first key, in the
    network's order, that the checkpoint lacks or holds in another shape, else the first key
    of the checkpoint that the network lacks."""
    for key, value in target.items():
        if key not in source:
            return f"the network's parameter {key!r} {_shape(value)} is not in the checkpoint"
        if not hasattr(source[key], "shape") or tuple(source[key].shape) != tuple(value.shape):
            return (f"parameter {key!r} has the shape {_shape(source[key])} in the checkpoint "
                    f"but {_shape(value)} in this network")
    for key, value in source.items():
        if key not in target:
            return f"the checkpoint's parameter {key!r} {_shape(value)} is not in this network"
    return None


def _labels_problem(checkpoint: Mapping[str, Any], labels: Optional[Mapping[str, Any]]
                    ) -> Optional[str]:
    """Why the checkpoint's labels (its ``init_args``' dataset.json, where nnU-Net saved it)
    are not ``labels``; ``None`` when they are or when either is unknown. Heads of the same
    shape for other classes would load without a complaint and predict the wrong classes."""
    init_args = checkpoint.get("init_args")
    theirs = init_args.get("dataset_json", {}).get("labels") if isinstance(init_args, dict) \
        else None
    if theirs is None or labels is None or dict(theirs) == dict(labels):
        return None
    return f"it was trained on the labels {dict(theirs)}, this run's dataset.json has {dict(labels)}"


def load_finetune_weights(network: nn.Module, path: str,
                          labels: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """Load every weight of the nnU-Net checkpoint ``path`` into ``network``.

    Args:
        network: the trainer's network, possibly inside DDP and/or torch.compile wrappers.
        path: the checkpoint (``checkpoint_final.pth`` / ``checkpoint_best.pth``).
        labels: this run's ``dataset.json`` labels, compared with the checkpoint's.

    Returns:
        The loaded state dict (CPU tensors, keys as the inner network names them).

    Raises:
        UserInputError: an unreadable checkpoint, or one whose labels, parameter names or shapes
            are not this network's; the message names ``path``, the first mismatch and the fix.
    """
    checkpoint = read_checkpoint(path)
    module = inner_module(network)
    target = module.state_dict()
    source = {_strip_wrappers(k, target): v for k, v in checkpoint["network_weights"].items()}
    problem = _labels_problem(checkpoint, labels) or weights_problem(source, target)
    if problem:
        raise UserInputError(f"finetune_from: the checkpoint {path} does not fit this run: "
                             f"{problem}. {FIX} {OTHER_LABELS_FIX}")
    module.load_state_dict(source)
    return source


def first_changed_weight(network: nn.Module, weights: Mapping[str, torch.Tensor]
                         ) -> Optional[str]:
    """The first key whose value in ``network`` is no longer ``weights[key]``; ``None`` when all
    still are (bit for bit)."""
    for key, value in inner_module(network).state_dict().items():
        if key in weights and not torch.equal(value.detach().cpu(), weights[key]):
            return key
    return None
