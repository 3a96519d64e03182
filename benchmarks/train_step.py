"""Cost of one training step: plain nnU-Net vs PGD-20 adversarial training vs IMA, side by side.

Runs the trainers' own ``train_step`` methods (``nnUNetTrainer``, ``nnUNetTrainerAdv``,
``nnUNetTrainerIMA``) on the same nnU-Net 2D network and the same batch, alternating the three
so that machine noise hits them alike, and reports the median time, peak memory (CUDA) and the
forward / backward passes each made (counted per sample). The network is first trained briefly
with plain steps so that most slices are segmented correctly (IMA only attacks those), then the
learning rate is set to 0 so that every repetition sees the same network. IMA's margins are all
set to the Adv budget, so both attacks get the same eps.

The last line is ``ima_over_adv20=<ratio> ima_over_plain=<ratio> floor_efficiency=<fraction>``;
the floor is the time of the passes IMA made at their measured per-sample price (a fwd+bwd and a
forward-only pass timed on the full batch), i.e. what IMA would cost with zero overhead.

    python benchmarks/train_step.py                       # the tiny 48x48 plan, CPU
    python benchmarks/train_step.py --plan heart --device cuda   # the paper's Heart size
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.nnunet_loss import PerSampleDiceCE, deep_supervision_weights
from nnunet_ima.synthetic import make_case
from nnunet_ima.trainer_config import settings_from_dict
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
from nnunet_ima.training_stats import EpochAccumulator

# PlainConvUNet settings of nnU-Net 2D plans: the synthetic 48x48 plan of the tests, and the
# plan nnU-Net makes for MSD Heart (Dataset002) 2D: patch 320x256, batch 40, 7 stages.
PLANS = {
    "tiny": {"patch": (48, 48), "batch": 6, "features": [32, 64, 128, 256]},
    "heart": {"patch": (320, 256), "batch": 40, "features": [32, 64, 128, 256, 512, 512, 512]},
}


def build_network(features: List[int], num_classes: int) -> torch.nn.Module:
    n = len(features)
    kwargs = {"n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv2d",
              "kernel_sizes": [[3, 3]] * n, "strides": [[1, 1]] + [[2, 2]] * (n - 1),
              "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
              "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
              "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"], 1,
                                  num_classes, deep_supervision=True)


def make_batch(patch, batch: int, num_scales: int, seed: int, device) -> dict:
    """Synthetic z-scored slices with organ / lesion labels, deep-supervision targets."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    while len(images) < batch:
        image, label = make_case(rng, (16, *patch))
        image = (image - image.mean()) / image.std()
        for z in rng.permutation(np.nonzero(label.reshape(16, -1).any(1))[0])[:2]:
            images.append(image[z][None])
            labels.append(label[z][None])
    x = torch.from_numpy(np.stack(images[:batch])).float().to(device)
    y = torch.from_numpy(np.stack(labels[:batch]).astype(np.int64)).float().to(device)
    targets = [y] + [torch.nn.functional.interpolate(y, scale_factor=0.5 ** s, mode="nearest")
                     for s in range(1, num_scales)]
    return {"data": x, "target": targets, "keys": np.array([f"case{i}" for i in range(batch)]),
            "slice_ids": np.arange(batch)}


def make_trainer(cls, network, settings, device):
    """A trainer object for ``train_step`` only: the attributes the step uses, nothing else."""
    trainer = cls.__new__(cls)
    trainer.network = network
    trainer.device = device
    trainer.grad_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    trainer.optimizer = torch.optim.SGD(network.parameters(), lr=0.0, momentum=0.99, nesterov=True)
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    trainer.loss = DeepSupervisionWrapper(loss, deep_supervision_weights(len(network.decoder.stages)))
    trainer.ima_settings = settings
    trainer.attack_loss = PerSampleDiceCE()
    trainer.is_correct = DiceThresholdCorrect(settings.dice_threshold, settings.dice_reduce)
    trainer._epoch_stats = EpochAccumulator()
    if cls is nnUNetTrainerAdv:
        trainer.clean_weight = 0.5
    if cls is nnUNetTrainerIMA:
        trainer.ima = settings.ima_config()
        trainer.clean_weight = 1 - trainer.ima.beta
        trainer.margins = trainer.ima.make_margin_store(settings.num_epochs)
        trainer.margins.initial = settings.adv_eps  # the same budget as Adv
    return trainer


class PassCounter:
    """Counts samples through the network: with a graph (fwd + bwd) and forward-only."""

    def __init__(self, network):
        self.with_grad = self.forward_only = 0
        network.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if torch.is_grad_enabled():
            self.with_grad += inputs[0].shape[0]
        else:
            self.forward_only += inputs[0].shape[0]

    def reset(self):
        self.with_grad = self.forward_only = 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="tiny", choices=sorted(PLANS))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--eps", type=float, default=4.0, help="Adv eps and IMA margin (z-score units, L2)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    plan = PLANS[args.plan]
    batch_size = args.batch_size or plan["batch"]
    network = build_network(plan["features"], 3).to(device)
    batch = make_batch(plan["patch"], batch_size, len(plan["features"]) - 1, args.seed, device)
    settings = settings_from_dict({"adv_eps": args.eps, "eps_max": max(args.eps, 1e-3) * 2,
                                   "pgd_steps": args.pgd_steps})

    # Warm-up: plain training until the network segments most slices (IMA attacks only those).
    warm = make_trainer(nnUNetTrainer, network, settings, device)
    for group in warm.optimizer.param_groups:
        group["lr"] = 0.01
    train_batches = [make_batch(plan["patch"], batch_size, len(plan["features"]) - 1, s, device)
                     for s in range(args.seed + 1, args.seed + 5)]
    for i in range(args.warmup_steps):
        nnUNetTrainer.train_step(warm, train_batches[i % len(train_batches)])
    network.eval()
    with torch.no_grad():
        correct = warm.is_correct(network(batch["data"]), batch["target"])
    print(f"plan {args.plan}: batch {batch_size} x {tuple(plan['patch'])}, device {device}, "
          f"{sum(q.numel() for q in network.parameters()) / 1e6:.1f} M parameters; "
          f"{int(correct.sum())}/{batch_size} slices correct (Dice >= 0.6) after warm-up")

    methods = {"plain": nnUNetTrainer, f"adv (PGD-{args.pgd_steps})": nnUNetTrainerAdv,
               "ima": nnUNetTrainerIMA}
    runs = {}
    for name, cls in methods.items():
        net = copy.deepcopy(network).train()
        runs[name] = (make_trainer(cls, net, settings, device), PassCounter(net))

    times: Dict[str, List[float]] = {name: [] for name in methods}
    passes: Dict[str, tuple] = {}
    memory: Dict[str, float] = {}
    for r in range(args.repeats + 1):  # the first round warms caches and is not counted
        for name, cls in methods.items():
            trainer, counter = runs[name]
            counter.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = (lambda t=trainer, c=cls: c.train_step(t, batch))
            elapsed = timed(step, device)
            if r:
                times[name].append(elapsed)
            passes[name] = (counter.with_grad, counter.forward_only)
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2 ** 30

    # Per-sample price of the two kinds of pass, on the full batch.
    net = runs["plain"][0].network
    x = batch["data"]

    def fwd_bwd():
        out = net(x.clone().requires_grad_(True))
        out[0].float().sum().backward()

    def fwd():
        with torch.no_grad():
            net(x)
    fwd_bwd(), fwd()
    t_fb = statistics.median(timed(fwd_bwd, device) for _ in range(args.repeats)) / batch_size
    t_f = statistics.median(timed(fwd, device) for _ in range(args.repeats)) / batch_size

    print(f"\n{'step':<16}{'median s':>10}{'fwd+bwd':>10}{'fwd only':>10}" +
          (f"{'peak GiB':>10}" if memory else ""))
    medians = {}
    for name in methods:
        medians[name] = statistics.median(times[name])
        line = f"{name:<16}{medians[name]:>10.3f}{passes[name][0]:>10d}{passes[name][1]:>10d}"
        print(line + (f"{memory[name]:>10.2f}" if memory else ""))
    ima_stats = runs["ima"][0]._epoch_stats
    print(f"\nIMA: {ima_stats.attacked} slices attacked, {ima_stats.crossed} crossed over "
          f"{args.repeats + 1} steps; per-sample pass price: fwd+bwd {t_fb * 1e3:.2f} ms, "
          f"fwd {t_f * 1e3:.2f} ms")
    adv_name = f"adv (PGD-{args.pgd_steps})"
    floor = passes["ima"][0] * t_fb + passes["ima"][1] * t_f
    print(f"ima_over_adv20={medians['ima'] / medians[adv_name]:.3f} "
          f"ima_over_plain={medians['ima'] / medians['plain']:.3f} "
          f"floor_efficiency={floor / medians['ima']:.3f}")


if __name__ == "__main__":
    main()
