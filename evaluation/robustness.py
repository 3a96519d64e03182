"""Attack one model's test slices at one noise level and count TP / FP / FN per slice and class.

The attack is PGD (``nnunet_ima.attacks.pgd``) maximising nnU-Net's Dice + CE of the
full-resolution output per slice (or plain CE), L2 by default, 100 steps of ``alpha * eps /
steps`` (alpha 5: a step of 0.05 eps), one random start. Noise 0 is the clean prediction.
Slices are batched by shape; each batch draws its random start from a generator seeded by
``(seed, noise, batch index)``, so a result does not depend on what else ran before it.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_ima.attacks import pgd
from nnunet_ima.metrics import confusion_counts, dice_from_counts, slice_dice_from_counts
from nnunet_ima.nnunet_loss import PerSampleDiceCE

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.samples import SliceSample

ATTACK_LOSSES = ("dc_ce", "ce")


@dataclass(frozen=True)
class AttackSettings:
    """PGD of the evaluation (the paper's: L2, 100 steps, alpha 5, random start, Dice + CE)."""

    norm: str = "l2"
    steps: int = 100
    alpha: float = 5.0
    random_start: bool = True
    loss: str = "dc_ce"
    batch_size: int = 16
    seed: int = 0


@dataclass
class NoiseResult:
    """Per-slice outcome of one (model, noise level).

    ``tp``, ``fp``, ``fn``: ``(N, K)`` counts over the ``K`` foreground classes;
    ``example``: the example slice (:func:`example_index`): ``image`` and ``adversarial``
    ``(C, H, W)``, ``prediction`` (of the adversarial input), ``clean_prediction`` and ``label``
    ``(H, W)``.
    """

    cases: List[str]
    slices: List[int]
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    example: Dict[str, np.ndarray]

    @property
    def per_class_dice(self) -> np.ndarray:
        """``(N, K)`` per-slice per-class Dice."""
        return dice_from_counts(torch.as_tensor(self.tp), torch.as_tensor(self.fp),
                                torch.as_tensor(self.fn)).numpy()

    @property
    def slice_dice(self) -> np.ndarray:
        """``(N,)`` Dice averaged over the classes present in ground truth or prediction."""
        return slice_dice_from_counts(torch.as_tensor(self.tp), torch.as_tensor(self.fp),
                                      torch.as_tensor(self.fn)).numpy()


def attack_loss(name: str, ignore_label) -> Callable:
    """``(logits (B, K, H, W), target (B, 1, H, W)) -> (B,)`` loss the attack maximises."""
    if name == "dc_ce":
        return PerSampleDiceCE(ignore_label=ignore_label)
    if name == "ce":
        def ce(logits, target):
            target = target[:, 0].long()
            if ignore_label is not None:
                valid = target != ignore_label
                pixel = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none")
                return (pixel * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)
            return F.cross_entropy(logits, target, reduction="none").mean(dim=(1, 2))
        return ce
    raise ValueError(f"attack loss must be one of {ATTACK_LOSSES}, got {name!r}")


def example_index(samples: List[SliceSample]) -> int:
    """The slice shown in ``examples.png``: the one with the most foreground (first on ties)."""
    return int(np.argmax([int((s.label > 0).sum()) for s in samples]))


def _batches(samples: List[SliceSample], batch_size: int) -> List[List[int]]:
    by_shape: Dict[tuple, List[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(s.image.shape, []).append(i)
    return [idx[k:k + batch_size] for idx in by_shape.values() for k in range(0, len(idx), batch_size)]


def _generator(seed: int, noise: float, batch_index: int) -> torch.Generator:
    # A CPU generator on every device: the core draws random starts on the CPU (the same start
    # on CPU and GPU runs) and moves them to the input's device.
    key = zlib.crc32(f"{seed}/{noise!r}/{batch_index}".encode())
    return torch.Generator(device="cpu").manual_seed(key)


@contextmanager
def full_precision():
    """True fp32 and deterministic kernels on CUDA for the duration of an evaluation.

    PyTorch lets cuDNN convolutions run in TF32 by default, which rounds inputs to 10 mantissa
    bits: clean predictions then differ from CPU ones, and PGD (a chaotic iteration) amplifies
    the difference. Deterministic kernels make a resumed GPU run repeat an uninterrupted one.
    The previous settings are restored on exit.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def evaluate_noise(model: LoadedModel, samples: List[SliceSample], noise: float,
                   settings: AttackSettings, device: torch.device,
                   progress: Optional[tqdm] = None) -> NoiseResult:
    """Attack every slice at ``noise`` (0: clean) and count TP / FP / FN per slice."""
    loss_fn = attack_loss(settings.loss, model.ignore_label)
    n, k = len(samples), model.num_classes - 1
    tp, fp, fn = (np.zeros((n, k), dtype=np.int64) for _ in range(3))
    show = example_index(samples)
    example: Dict[str, np.ndarray] = {}
    for b, idx in enumerate(_batches(samples, settings.batch_size)):
        x = torch.from_numpy(np.stack([samples[i].image for i in idx])).to(device)
        y = torch.from_numpy(np.stack([samples[i].label for i in idx])[:, None].astype(np.int64)).to(device)
        if noise > 0:
            x_adv = pgd(model.network, x, y, float(noise), norm=settings.norm, steps=settings.steps,
                        alpha=settings.alpha, loss=loss_fn, random_start=settings.random_start,
                        generator=_generator(settings.seed, noise, b))
        else:
            x_adv = x
        with torch.no_grad():
            pred = model.network(x_adv).argmax(dim=1)
        target = y[:, 0]
        if model.ignore_label is not None:
            valid = target != model.ignore_label
            pred, target = torch.where(valid, pred, 0), torch.where(valid, target, 0)
        counts = confusion_counts(pred.cpu(), target.cpu(), model.num_classes)
        for c, store in zip(counts, (tp, fp, fn)):
            store[idx] = c.numpy()
        if show in idx:
            j = idx.index(show)
            with torch.no_grad():
                clean_pred = model.network(x[j:j + 1]).argmax(dim=1)[0]
            example = {"image": x[j].cpu().numpy(), "adversarial": x_adv[j].detach().cpu().numpy(),
                       "prediction": pred[j].cpu().numpy().astype(np.int16),
                       "clean_prediction": clean_pred.cpu().numpy().astype(np.int16),
                       "label": samples[show].label}
        if progress is not None:
            progress.update(len(idx))
    return NoiseResult([s.case for s in samples], [s.index for s in samples], tp, fp, fn, example)
