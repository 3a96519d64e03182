"""What the adversarial trainers need to run under nnU-Net's DDP (``nnUNetv2_train -num_gpus N``).

Under DDP every collective must be entered by every rank the same number of times. An
adversarial training step breaks that in three places, each handled here:

* **Attacks.** PGD and BPGD run many forward/backward passes with respect to the input, and
  BPGD stops early on slices that crossed, so ranks make different numbers of passes. The
  attacks therefore use the network *inside* the DDP wrapper (:func:`unwrap_ddp`), which
  shares its parameters but has no reducer hooks and no buffer broadcasts.
* **The adversarial loss.** IMA trains on a rank-dependent number of boundary points (possibly
  none). nnU-Net's loss with batch Dice all-gathers its Dice statistics across ranks; the
  adversarial term uses the same loss built without that collective (batch Dice over the rank's
  own adversarial samples, as on a single GPU).
* **Gradients.** Both backward passes of a step run without DDP's gradient synchronisation
  (``no_sync``); :func:`average_gradients` then averages the accumulated gradients across ranks
  once per step, which is what DDP itself computes (the mean of the ranks' gradients).

nnU-Net assumes one CUDA device per rank. :func:`cpu_ddp_wrapping` lets its ``initialize`` wrap
a CPU network (``device_ids`` must be ``None`` there), so the same trainers run on CPU under the
gloo backend, which is how the tests exercise the DDP path.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

from nnunet_ima.distributed import is_distributed


def unwrap_ddp(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``network`` itself)."""
    return network.module if isinstance(network, DistributedDataParallel) else network


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace every ``p.grad`` by its mean over the ranks of the default process group.

    One all-reduce over the flattened gradients (a parameter without ``.grad`` contributes
    zeros, so every rank sends a buffer of the same size). A no-op outside a process group of
    more than one rank.
    """
    if not is_distributed():
        return
    params: List[nn.Parameter] = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@contextmanager
def cpu_ddp_wrapping(device: torch.device) -> Iterator[None]:
    """During nnU-Net's ``initialize``, wrap a CPU network in DDP without ``device_ids``.

    nnU-Net calls ``DDP(network, device_ids=[local_rank])``, which PyTorch rejects for CPU
    modules. On CUDA devices this does nothing.
    """
    if device.type != "cpu":
        yield
        return
    original = nnunet_trainer_module.DDP

    def cpu_ddp(module: nn.Module, device_ids=None, **kwargs) -> DistributedDataParallel:
        return DistributedDataParallel(module, **kwargs)

    nnunet_trainer_module.DDP = cpu_ddp
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = original

