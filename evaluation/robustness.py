"""Attack one model's test slices at one or several noise levels and count TP / FP / FN per
slice and class.

The default attack is PGD maximising nnU-Net's Dice + CE of the full-resolution output per
slice (or plain CE), L2 by default, 100 steps of ``alpha * eps / steps`` (alpha 5: a step of
0.05 eps), one random start; SegPGD and APGD are the alternatives (:mod:`.attacks`). Noise 0 is
the clean prediction. Slices are batched by shape in batches of ``batch_size``; each batch draws
its random start at each level from a generator seeded by ``(seed, noise, batch index)``, so a
result does not depend on what else ran before it.

Several levels in one batch: when a batch of slices is smaller than ``batch_size`` (few slices,
the last batch of a shape or of a case), the same slices are attacked at as many levels together
as fit (4 slices x 4 levels = 16). Levels still finish in order, each as soon as all its batches
are done (a small batch computes later levels ahead), so a resumable part per level is written
as early as before. Each (slice, level) gets the start it gets alone (its level's generator, the
draws concatenated) and every step is per sample. That alone does not make the bits equal:
kernels may round differently at another batch size (PyTorch's single-threaded CPU 1x1
convolution switches to oneDNN at 16 samples; cuDNN picks algorithms by shape), and 100 chaotic
PGD steps turn a last-bit difference into a few different pixels. So a pack of levels is used
only after a 1-step probe of the same attack on the same slices gave, bit for bit, the iterates
and logits of one level per batch (kernels are chosen by shape: one probe per batch shape and
pack size); otherwise the levels run one per batch. Results therefore never depend on the
packing, and the resume key does not hold it. Packing is on for GPUs by default (a CPU gains
nothing from larger batches; ``level_batching`` overrides).
"""
from __future__ import annotations

import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_ima.metrics import confusion_counts, dice_from_counts, slice_dice_from_counts
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.norms import random_in_ball

from nnunet_ima.evaluation.attacks import ATTACKS, run_attack
from nnunet_ima.evaluation.segmentation_losses import SEA_LOSSES, sea_loss

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.predictor_path import segmentation
from nnunet_ima.evaluation.samples import SliceSample

ATTACK_LOSSES = ("dc_ce", "ce") + tuple(SEA_LOSSES)
LEVEL_BATCHING = ("auto", "on", "off")


@dataclass(frozen=True)
class AttackSettings:
    """The evaluation's attack (the paper's: PGD, L2, 100 steps, alpha 5, random start, Dice + CE).

    ``attack``: ``pgd``, ``segpgd`` or ``apgd``; ``alpha`` does not apply to ``apgd``, ``loss``
    not to ``segpgd`` (see :func:`.attacks.run_attack`). ``level_batching``: attack small
    batches at several noise levels at once, ``"on"``, ``"off"`` or ``"auto"`` (on for GPUs
    only: a CPU is busy with a small batch already, so packing gains nothing there and its probe
    costs a step); results are the same in every case.
    """

    attack: str = "pgd"
    norm: str = "l2"
    steps: int = 100
    alpha: float = 5.0
    random_start: bool = True
    loss: str = "dc_ce"
    batch_size: int = 16
    seed: int = 0
    level_batching: str = "auto"


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
    if name in SEA_LOSSES:
        return sea_loss(name, ignore_label)
    raise ValueError(f"attack loss must be one of {ATTACK_LOSSES}, got {name!r}")


def scored_counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  ignore_label: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TP, FP, FN ``(B, K)`` of predicted labels ``(B, H, W)`` against ``labels`` ``(B, H, W)``,
    the ignore label's pixels counted nowhere (both set to background there)."""
    if ignore_label is not None:
        valid = labels != ignore_label
        pred, labels = torch.where(valid, pred, 0), torch.where(valid, labels, 0)
    return confusion_counts(pred.cpu(), labels.cpu(), num_classes)


def slice_dice_score(num_classes: int, ignore_label: Optional[int]) -> Callable:
    """``(logits (B, K, H, W), target (B, 1, H, W)) -> (B,)`` slice Dice of the argmax, the
    tables' convention (ignore-label pixels unscored): what ``apgd_sea`` drives down."""
    def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        counts = scored_counts(logits.argmax(dim=1), target[:, 0].long(), num_classes,
                               ignore_label)
        return slice_dice_from_counts(*counts).to(logits.device)
    return score


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


def _stack_levels(x: torch.Tensor, levels: Sequence[float], settings: AttackSettings,
                  batch_index: int):
    """``x`` ``(B, C, H, W)`` repeated per level ``(L * B, C, H, W)``, level-major; the budgets
    ``(L * B,)``; and the start offsets: level ``l``'s drawn from its own generator exactly as a
    run of that level alone draws them (``None`` without random start)."""
    eps = [torch.full((x.shape[0],), float(n), dtype=x.dtype, device=x.device) for n in levels]
    start = None
    if settings.random_start:
        start = torch.cat([random_in_ball(x, e, settings.norm,
                                          _generator(settings.seed, n, batch_index))
                           for n, e in zip(levels, eps)])
    return x.repeat(len(levels), 1, 1, 1), torch.cat(eps), start


def _attack_levels(model: LoadedModel, x: torch.Tensor, y: torch.Tensor, levels: Sequence[float],
                   settings: AttackSettings, batch_index: int, loss_fn: Callable,
                   steps: Optional[int] = None):
    """Attack the slices ``x`` at ``levels`` in one batch: ``(L * B, C, H, W)`` adversarial
    inputs and their ``(L * B, K, H, W)`` logits, level-major."""
    xs, eps, start = _stack_levels(x, levels, settings, batch_index)
    score = (slice_dice_score(model.num_classes, model.ignore_label)
             if settings.attack == "apgd_sea" else None)
    adv = run_attack(settings.attack, model.network, xs, y.repeat(len(levels), 1, 1, 1), eps, start,
                     norm=settings.norm, steps=settings.steps if steps is None else steps,
                     alpha=settings.alpha, loss=loss_fn, ignore_label=model.ignore_label,
                     score=score)
    with torch.no_grad():
        return adv, model.network(adv)


PROBE_STEPS = 1


def packing_is_exact(model: LoadedModel, x: torch.Tensor, y: torch.Tensor, levels: Sequence[float],
                     settings: AttackSettings, batch_index: int, loss_fn: Callable) -> bool:
    """Whether :data:`PROBE_STEPS` steps of the attack on ``levels`` packed in one batch give the
    same bits (iterates and logits) as one level per batch, on the slices ``x`` ``(B, C, H, W)``."""
    adv, logits = _attack_levels(model, x, y, levels, settings, batch_index, loss_fn, PROBE_STEPS)
    alone = [_attack_levels(model, x, y, [n], settings, batch_index, loss_fn, PROBE_STEPS)
             for n in levels]
    return (torch.equal(adv, torch.cat([a for a, _ in alone]))
            and torch.equal(logits, torch.cat([l for _, l in alone])))


def iter_levels(model: LoadedModel, samples: List[SliceSample], noise_levels: Sequence[float],
                settings: AttackSettings, device: torch.device, progress: Optional[tqdm] = None,
                packing: Optional[Counter] = None) -> Iterator[Tuple[float, NoiseResult]]:
    """Attack every slice at each of ``noise_levels`` (0: clean) and count TP / FP / FN per slice;
    yields ``(noise, result)`` in increasing noise, each as soon as all its batches are done.

    With level batching (``settings.level_batching``), a batch of ``B`` slices is attacked at up
    to ``batch_size // B`` of the attacked levels together (in order: 1-4, 5-8, ... for 4 per
    batch) when :func:`packing_is_exact`, else one level per batch: the counts are always those
    of one level at a time. ``packing`` (optional)
    counts the attack batches: ``"packed"`` (several levels), ``"declined"`` (a pack the probe
    refused, run one level per batch), ``"single"`` (one level).
    """
    if settings.attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {settings.attack!r}")
    if settings.level_batching not in LEVEL_BATCHING:
        raise ValueError(f"level_batching must be one of {LEVEL_BATCHING}, "
                         f"got {settings.level_batching!r}")
    pack_levels = settings.level_batching == "on" or (settings.level_batching == "auto"
                                                      and torch.device(device).type != "cpu")
    packing = Counter() if packing is None else packing
    loss_fn = attack_loss(settings.loss, model.ignore_label)
    levels = sorted(set(float(n) for n in noise_levels))
    attacked = [noise for noise in levels if noise > 0]
    n, k = len(samples), model.num_classes - 1
    counts = {noise: tuple(np.zeros((n, k), dtype=np.int64) for _ in range(3)) for noise in levels}
    show = example_index(samples)
    examples: Dict[float, Dict[str, np.ndarray]] = {noise: {} for noise in levels}
    clean_example: Dict[str, np.ndarray] = {}
    batches = _batches(samples, settings.batch_size)
    computed = set()  # (batch index, noise) already counted
    exact: Dict[tuple, bool] = {}  # (batch shape, levels per pack) -> probe verdict

    def record(b: int, x: torch.Tensor, y: torch.Tensor, noise: float, x_adv: torch.Tensor,
               pred: torch.Tensor) -> None:
        idx = batches[b]
        confusion = scored_counts(pred, y[:, 0], model.num_classes, model.ignore_label)
        for c, store in zip(confusion, counts[noise]):
            store[idx] = c.numpy()
        if show in idx:
            j = idx.index(show)
            if not clean_example:
                with torch.no_grad():
                    clean = segmentation(model, x[j:j + 1])[0]
                clean_example.update(image=x[j].cpu().numpy(),
                                     clean_prediction=clean.cpu().numpy().astype(np.int16))
            examples[noise] = {"image": clean_example["image"],
                               "adversarial": x_adv[j].detach().cpu().numpy(),
                               "prediction": pred[j].cpu().numpy().astype(np.int16),
                               "clean_prediction": clean_example["clean_prediction"],
                               "label": samples[show].label}
        computed.add((b, noise))

    def compute(b: int, noise: float) -> None:
        """Count batch ``b`` at ``noise`` and at the levels packed with it."""
        idx = batches[b]
        x = torch.from_numpy(np.stack([samples[i].image for i in idx])).to(device)
        y = torch.from_numpy(np.stack([samples[i].label for i in idx])[:, None].astype(np.int64)
                             ).to(device)
        if noise == 0:
            with torch.no_grad():
                record(b, x, y, noise, x, segmentation(model, x))
            if progress is not None:
                progress.update(len(idx))
            return
        per_batch = max(1, settings.batch_size // len(idx)) if pack_levels else 1
        start = attacked.index(noise) // per_batch * per_batch
        pack = [m for m in attacked[start:start + per_batch] if (b, m) not in computed]
        runs = [pack]
        if len(pack) > 1:
            key = (tuple(x.shape), len(pack))
            if key not in exact:
                exact[key] = packing_is_exact(model, x, y, pack, settings, b, loss_fn)
            packing["packed" if exact[key] else "declined"] += 1
            runs = [pack] if exact[key] else [[m] for m in pack]
        else:
            packing["single"] += 1
        for run in runs:
            adv, logits = _attack_levels(model, x, y, run, settings, b, loss_fn)
            labels = segmentation(model, adv, logits)
            for l, m in enumerate(run):
                part = slice(l * len(idx), (l + 1) * len(idx))
                record(b, x, y, m, adv[part], labels[part])
            if progress is not None:
                progress.update(len(idx) * len(run))

    cases, slices = [s.case for s in samples], [s.index for s in samples]
    for noise in levels:
        for b in range(len(batches)):
            if (b, noise) not in computed:
                compute(b, noise)
        yield noise, NoiseResult(cases, slices, *counts.pop(noise), examples.pop(noise))


def evaluate_levels(model: LoadedModel, samples: List[SliceSample], noise_levels: Sequence[float],
                    settings: AttackSettings, device: torch.device,
                    progress: Optional[tqdm] = None,
                    packing: Optional[Counter] = None) -> Dict[float, NoiseResult]:
    """:func:`iter_levels` as a dict ``noise -> result``."""
    return dict(iter_levels(model, samples, noise_levels, settings, device, progress, packing))


def evaluate_noise(model: LoadedModel, samples: List[SliceSample], noise: float,
                   settings: AttackSettings, device: torch.device,
                   progress: Optional[tqdm] = None) -> NoiseResult:
    """Attack every slice at ``noise`` (0: clean) and count TP / FP / FN per slice."""
    return evaluate_levels(model, samples, [noise], settings, device, progress)[float(noise)]
