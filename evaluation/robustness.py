"""Attack one model's test samples at one or several noise levels and count TP / FP / FN per
sample and class.

A sample is a 2D slice ``(C, H, W)`` or, for a 3D configuration, a whole case ``(C, D, H, W)``
(:data:`.samples.WHOLE_CASE`); everything below is per sample, over all its spatial axes, so
in 3D the noise budget is per volume and the counts are per case.

The default attack is PGD maximising nnU-Net's Dice + CE of the full-resolution output per
sample (or plain CE), L2 by default, 100 steps of ``alpha * eps / steps`` (alpha 5: a step of
0.05 eps), one random start; SegPGD and APGD are the alternatives (:mod:`.attacks`). Noise 0 is
the clean prediction. Slices are batched by shape in batches of ``batch_size``; volumes are
attacked one at a time (a batch of one: a volume's tiles are batched inside the network). Each
batch draws its random start at each level from a generator seeded by ``(seed, noise, batch
index)``, so a result does not depend on what else ran before it.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_ima.declared import (Choice, Count, Flag, Integer, InvalidSetting, Positive, setting,
                                 validate_declared)
from nnunet_ima.label_mask import label_map, scored_label_maps, scored_labels, scored_mean
from nnunet_ima.metrics import confusion_counts, dice_from_counts, slice_dice_from_counts
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.norms import NORMS, random_in_ball

from nnunet_ima.evaluation.attacks import ATTACKS, run_attack
from nnunet_ima.evaluation.segmentation_losses import EXTRA_LOSSES, SEA_LOSSES, segmentation_loss

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.objects import DEFAULT_SIZE_BINS, batch_object_counts, empty_counts
from nnunet_ima.evaluation.predictor_path import segmentation
from nnunet_ima.evaluation.samples import SliceSample

ATTACK_LOSSES = ("dc_ce", "ce") + tuple(SEA_LOSSES) + tuple(EXTRA_LOSSES)


@dataclass(frozen=True)
class AttackSettings:
    """The evaluation's attack (the paper's: PGD, L2, 100 steps, alpha 5, random start, Dice + CE).

    ``attack``: ``pgd``, ``segpgd``, ``apgd`` or ``apgd_sea``; ``alpha`` does not apply to
    ``apgd``, ``loss`` not to ``segpgd`` (see :func:`.attacks.run_attack`). Each field is
    declared once with its help and rule (:mod:`nnunet_ima.declared`): ``nnunet-ima-eval``
    builds its options from them, and an instance out of range is an ``InvalidSetting``.
    """

    attack: str = setting(
        "pgd", rule=Choice(ATTACKS),
        help="pgd: projected gradient ascent with a fixed step; segpgd: SegPGD (Gu et al. "
             "2022), PGD on a CE that shifts weight from correctly to wrongly classified pixels "
             "over the steps; apgd: Auto-PGD (Croce & Hein 2020), momentum and a per-slice step "
             "size halved when the loss stalls, keeping each slice's highest-loss iterate; "
             "apgd_lowest: APGD keeping the lowest-Dice iterate (rse's APGD); "
             "apgd_sea: APGD at radii 2, 1.5, 1 x noise keeping the lowest-Dice iterate (SEA, "
             "Croce et al. 2024); apgd_segpgd: APGD on SegPGD's loss, lowest-Dice iterate; "
             "padam: projected AMSGrad Adam, lr noise / 4 (rse's PAdam); minimal: a "
             "minimal-perturbation attack (FMN-style) clamped to the ball")
    norm: str = setting("l2", rule=Choice(NORMS), help="all attacks")
    steps: int = setting(100, rule=Count(1), help="iterations (gradient steps) of every attack")
    alpha: float = setting(5.0, rule=Positive(),
                           help="pgd, segpgd: each step is alpha * noise / steps (apgd adapts "
                                "its own step, starting at 2 * noise)")
    random_start: bool = setting(True, rule=Flag(),
                                 help="all attacks: start at a seeded random point of the ball")
    loss: str = setting(
        "dc_ce", rule=Choice(ATTACK_LOSSES),
        help="pgd, apgd, apgd_sea: loss maximised, nnU-Net's Dice + CE, CE, or SEA's masked CE, "
             "class-balanced masked CE, Jensen-Shannon (segpgd maximises its own weighted CE; "
             "ensemble members bring their own)")
    batch_size: int = setting(16, rule=Count(1),
                              help="slices per attack batch (3D volumes: one at a time)")
    seed: int = setting(0, rule=Integer(),
                        help="random starts of the attacks and the --max-slices draw")
    restarts: int = setting(
        1, rule=Count(1),
        help="runs of every attack from different random starts, keeping per slice the run "
             "with the lowest slice Dice (the first run starts where a run of 1 does); needs "
             "the random start")

    def __post_init__(self):
        validate_declared(self)
        if self.restarts > 1 and not self.random_start:
            # Without a random start every run repeats the first: the cost without the gain.
            raise InvalidSetting("restarts", f"must be 1 without a random start, got "
                                 f"{self.restarts}: every restart would repeat the same attack; "
                                 f"turn the random start on (drop --no-random-start) or run 1 "
                                 f"restart")


@dataclass
class NoiseResult:
    """Per-slice outcome of one (model, noise level).

    ``tp``, ``fp``, ``fn``: ``(N, K)`` counts over the ``K`` foreground classes;
    ``example``: the example sample (:func:`example_index`): ``image`` and ``adversarial``
    ``(C, H, W)``, ``prediction`` (of the adversarial input), ``clean_prediction`` and ``label``
    ``(H, W)``; of a volume, its slice with the most foreground (:func:`example_plane`), whose
    index along ``D`` is ``example["plane"]`` (a 0-d int array);
    ``objects``: ``(N, K, B, 5)`` per-sample object counts per class and size bin
    (:mod:`.objects`, the size breakdown), carried row by row like ``tp``; ``None`` for a result
    without them (a part written before they existed: its breakdown is absent).
    """

    cases: List[str]
    slices: List[int]
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    example: Dict[str, np.ndarray]
    objects: Optional[np.ndarray] = None

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
    """``(logits (B, K, *spatial), target (B, 1, *spatial)) -> (B,)`` loss the attack maximises,
    each sample's mean over all its spatial axes (``(H, W)`` or ``(D, H, W)``)."""
    if name == "dc_ce":
        return PerSampleDiceCE(ignore_label=ignore_label)
    if name == "ce":
        def ce(logits, target):
            labels, scored = scored_labels(label_map(target, logits), ignore_label)
            pixel = F.cross_entropy(logits, labels, reduction="none")
            # Every pixel scored: the plain mean, whose reduction rounds as it always has.
            return (pixel.mean(dim=tuple(range(1, pixel.dim()))) if ignore_label is None
                    else scored_mean(pixel, scored))
        return ce
    if name in SEA_LOSSES or name in EXTRA_LOSSES:
        return segmentation_loss(name, ignore_label)
    raise ValueError(f"attack loss must be one of {ATTACK_LOSSES}, got {name!r}")


def scored_counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  ignore_label: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TP, FP, FN ``(B, K)`` of predicted labels ``(B, *spatial)`` against ``labels``
    ``(B, *spatial)`` (slices or volumes), the ignore label's pixels counted nowhere
    (:func:`nnunet_ima.label_mask.scored_label_maps`)."""
    pred, labels = scored_label_maps(pred, labels, ignore_label)
    return confusion_counts(pred.cpu(), labels.cpu(), num_classes)


def slice_dice_score(num_classes: int, ignore_label: Optional[int]) -> Callable:
    """``(logits (B, K, *spatial), target (B, 1, *spatial)) -> (B,)`` sample Dice of the argmax,
    the tables' convention (ignore-label pixels unscored): what ``apgd_sea`` drives down."""
    def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        counts = scored_counts(logits.argmax(dim=1), target[:, 0].long(), num_classes,
                               ignore_label)
        return slice_dice_from_counts(*counts).to(logits.device)
    return score


def example_index(samples: List[SliceSample]) -> int:
    """The sample shown in ``examples.png``: the one with the most foreground (first on ties)."""
    return int(np.argmax([int((s.label > 0).sum()) for s in samples]))


def example_plane(label: np.ndarray, ignore_label: Optional[int] = None) -> int:
    """The slice of a volume's ``label`` ``(D, H, W)`` shown in ``examples.png``: the one along
    ``D`` (nnU-Net's slicing axis, axial for scans stored as ``(z, y, x)``) with the most
    scored foreground voxels, first on ties."""
    labels = scored_labels(torch.from_numpy(np.asarray(label)), ignore_label)[0]
    return int(np.argmax((labels > 0).flatten(1).sum(1).numpy()))


def _example_view(example: Dict[str, np.ndarray], plane: Optional[int], case: str
                  ) -> Dict[str, np.ndarray]:
    """``example`` as stored: a slice as it is; of a volume, the 2D slice ``plane`` along ``D``
    (images ``(C, D, H, W)`` -> ``(C, H, W)``, label maps ``(D, H, W)`` -> ``(H, W)``), with
    ``plane`` and ``case`` (0-d arrays) for the figure, so a part never holds whole volumes."""
    if plane is None:
        return example
    cut = {k: (v[:, plane] if k in ("image", "adversarial") else v[plane])
           for k, v in example.items()}
    return {**cut, "plane": np.array(plane), "case": np.array(case)}


def batch_size_for(samples: Sequence[SliceSample], batch_size: int) -> int:
    """``batch_size`` for slices, 1 for whole volumes: a 3D attack holds the activations of all
    of a volume's tiles, so volumes are attacked one at a time."""
    return 1 if any(s.is_volume for s in samples) else batch_size


def _batches(samples: List[SliceSample], batch_size: int) -> List[List[int]]:
    batch_size = batch_size_for(samples, batch_size)
    by_shape: Dict[tuple, List[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(s.image.shape, []).append(i)
    return [idx[k:k + batch_size] for idx in by_shape.values() for k in range(0, len(idx), batch_size)]


def batch_tensors(samples: Sequence[SliceSample], idx: Sequence[int], device: torch.device
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The samples ``idx`` as a batch on ``device``: images ``(B, C, *spatial)`` and int64
    labels ``(B, 1, *spatial)``, as the attacks take them."""
    x = torch.from_numpy(np.stack([samples[i].image for i in idx])).to(device)
    y = torch.from_numpy(np.stack([samples[i].label for i in idx])[:, None].astype(np.int64))
    return x, y.to(device)


def _generator(seed: int, noise: float, batch_index: int, restart: int = 0) -> torch.Generator:
    # A CPU generator on every device: the core draws random starts on the CPU (the same start
    # on CPU and GPU runs) and moves them to the input's device. Restart 0 keeps the key runs
    # have always had, so a run of one restart draws the start it always drew.
    key = f"{seed}/{noise!r}/{batch_index}" + (f"/{restart}" if restart else "")
    key = zlib.crc32(key.encode())
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


SCORED_ATTACKS = ("apgd_sea", "minimal", "apgd_lowest", "apgd_segpgd")
"""Attacks that take the slice Dice as their criterion (``run_attack``'s ``score``)."""


def _attack(model: LoadedModel, x: torch.Tensor, y: torch.Tensor, noise: float,
            settings: AttackSettings, batch_index: int, loss_fn: Callable):
    """Attack the samples ``x`` ``(B, C, *spatial)`` (labels ``y`` ``(B, 1, *spatial)``) at
    ``noise``: the ``(B, C, *spatial)`` adversarial inputs and their ``(B, K, *spatial)``
    logits. Restart ``r`` starts from the generator of ``(seed, noise, batch_index, r)``
    (restart 0: of ``(seed, noise, batch_index)``, the start of a run without restarts); with
    several, each sample keeps the restart of lowest slice Dice, the earlier one on ties."""
    eps = torch.full((x.shape[0],), float(noise), dtype=x.dtype, device=x.device)
    dice = slice_dice_score(model.num_classes, model.ignore_label)
    score = dice if settings.attack in SCORED_ATTACKS else None
    best_adv = best_logits = best_dice = None
    for restart in range(settings.restarts):
        start = (random_in_ball(x, eps, settings.norm,
                                _generator(settings.seed, noise, batch_index, restart))
                 if settings.random_start else None)
        adv = run_attack(settings.attack, model.network, x, y, eps, start, norm=settings.norm,
                         steps=settings.steps, alpha=settings.alpha, loss=loss_fn,
                         ignore_label=model.ignore_label, score=score)
        with torch.no_grad():
            logits = model.network(adv)
        if settings.restarts == 1:
            return adv, logits
        with torch.no_grad():
            value = dice(logits, y)                                            # (B,)
        if best_adv is None:
            best_adv, best_logits, best_dice = adv.detach(), logits, value
            continue
        better = value < best_dice                           # strictly: ties keep the earlier
        best_adv = torch.where(better.view(-1, *[1] * (adv.dim() - 1)), adv.detach(), best_adv)
        best_logits = torch.where(better.view(-1, *[1] * (logits.dim() - 1)), logits,
                                  best_logits)
        best_dice = torch.where(better, value, best_dice)
    return best_adv, best_logits


def iter_levels(model: LoadedModel, samples: List[SliceSample], noise_levels: Sequence[float],
                settings: AttackSettings, device: torch.device, progress: Optional[tqdm] = None,
                only_batches: Optional[Collection[int]] = None,
                size_bins: Sequence[int] = DEFAULT_SIZE_BINS
                ) -> Iterator[Tuple[float, NoiseResult]]:
    """Attack every sample at each of ``noise_levels`` (0: clean) and count TP / FP / FN per
    sample, and its objects per class and size bin (edges ``size_bins``, :mod:`.objects`: one
    CPU labelling per sample and class of the prediction already made); yields ``(noise,
    result)`` in increasing noise, each as soon as all its batches are done.

    ``only_batches``: compute only these batches (indices into :func:`_batches` of ``samples``,
    which seed their random starts), a shard's share (:mod:`.sharding`); the other samples'
    rows stay 0, and the example is set only if its sample's batch is among them."""
    if settings.attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {settings.attack!r}")
    loss_fn = attack_loss(settings.loss, model.ignore_label)
    n, k = len(samples), model.num_classes - 1
    show = example_index(samples)
    plane = (example_plane(samples[show].label, model.ignore_label)
             if samples[show].is_volume else None)
    batches = _batches(samples, settings.batch_size)
    cases, slices = [s.case for s in samples], [s.index for s in samples]
    clean_example: Dict[str, np.ndarray] = {}
    for noise in sorted(set(float(n) for n in noise_levels)):
        counts = tuple(np.zeros((n, k), dtype=np.int64) for _ in range(3))
        objects = empty_counts(n, model.num_classes, size_bins)
        example: Dict[str, np.ndarray] = {}
        for b, idx in enumerate(batches):
            if only_batches is not None and b not in only_batches:
                continue
            x, y = batch_tensors(samples, idx, device)
            if noise == 0:
                with torch.no_grad():
                    x_adv, pred = x, segmentation(model, x)
            else:
                x_adv, logits = _attack(model, x, y, noise, settings, b, loss_fn)
                pred = segmentation(model, x_adv, logits)
            for c, store in zip(scored_counts(pred, y[:, 0], model.num_classes,
                                              model.ignore_label), counts):
                store[idx] = c.numpy()
            objects[idx] = batch_object_counts(pred, y[:, 0], model.num_classes, size_bins,
                                               model.ignore_label)
            if show in idx:
                j = idx.index(show)
                if not clean_example:
                    with torch.no_grad():
                        clean = segmentation(model, x[j:j + 1])[0]
                    clean_example.update(image=x[j].cpu().numpy(),
                                         clean_prediction=clean.cpu().numpy().astype(np.int16))
                example = _example_view(
                    {"image": clean_example["image"],
                     "adversarial": x_adv[j].detach().cpu().numpy(),
                     "prediction": pred[j].cpu().numpy().astype(np.int16),
                     "clean_prediction": clean_example["clean_prediction"],
                     "label": samples[show].label}, plane, samples[show].case)
            if progress is not None:
                progress.update(len(idx))
        yield noise, NoiseResult(cases, slices, *counts, example, objects)


def evaluate_levels(model: LoadedModel, samples: List[SliceSample], noise_levels: Sequence[float],
                    settings: AttackSettings, device: torch.device,
                    progress: Optional[tqdm] = None) -> Dict[float, NoiseResult]:
    """:func:`iter_levels` as a dict ``noise -> result``."""
    return dict(iter_levels(model, samples, noise_levels, settings, device, progress))


def evaluate_noise(model: LoadedModel, samples: List[SliceSample], noise: float,
                   settings: AttackSettings, device: torch.device,
                   progress: Optional[tqdm] = None) -> NoiseResult:
    """Attack every slice at ``noise`` (0: clean) and count TP / FP / FN per slice."""
    return evaluate_levels(model, samples, [noise], settings, device, progress)[float(noise)]
