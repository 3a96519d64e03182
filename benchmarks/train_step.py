"""Cost of one training step: plain nnU-Net vs PGD-20 adversarial training vs IMA, side by side.

Runs the trainers' own ``train_step`` methods (``nnUNetTrainer``, ``nnUNetTrainerAdv``,
``nnUNetTrainerIMA``) on the same nnU-Net 2D network and the same batch, alternating the three
so that machine noise hits them alike, and reports the median time, peak memory (CUDA) and the
forward / backward passes each made (counted per sample). The network is first trained briefly
with plain steps so that most slices are segmented correctly (IMA only attacks those), then the
learning rate is set to 0 so that every repetition sees the same network. IMA's margins are all
set to the Adv budget, so both attacks get the same eps.

The last line is ``ima_over_adv20=<ratio> ima_over_plain=<ratio> floor_efficiency=<fraction>``;
the floor is the time of the network passes IMA made, each priced at the measured time of a pass
of its kind (training fwd+bwd, attack fwd+bwd for the input gradient, forward-only) and its batch
size, run the way the trainers run it: what IMA would cost with zero overhead around its passes.

``--classification fashion-mnist`` (or ``digits``) does the same for ``nnunet-ima-classify``'s
ce / adv / ima steps with the paper's CNN on real images (warm-up: plain cross-entropy).

    python benchmarks/train_step.py                       # the tiny 48x48 plan, CPU
    python benchmarks/train_step.py --plan heart --device cuda --epoch-iterations 50
    python benchmarks/train_step.py --classification fashion-mnist --warmup-steps 300
"""
from __future__ import annotations

import argparse
import copy
import statistics
from collections import Counter
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ima.attacks import select
from nnunet_ima.benchmarking import PLANS, build_network, print_ratios, synchronize, timed
from nnunet_ima.devices import add_device_argument
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.nnunet.loss import PerSampleDiceCE, deep_supervision_weights
from nnunet_ima.nnunet.synthetic import make_case
from nnunet_ima.nnunet.settings import settings_from_dict
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
from nnunet_ima.nnunet.training_stats import EpochAccumulator

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
    trainer.is_ddp, trainer.local_rank = False, 0
    trainer.grad_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    trainer.optimizer = torch.optim.SGD(network.parameters(), lr=0.0, momentum=0.99, nesterov=True)
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    trainer.loss = DeepSupervisionWrapper(loss, deep_supervision_weights(len(network.decoder.stages)))
    trainer.adversarial_loss = trainer.loss
    trainer.ima_settings = settings
    trainer.attack_loss = PerSampleDiceCE()
    trainer.is_correct = DiceThresholdCorrect(settings.dice_threshold, settings.dice_reduce)
    trainer._epoch_stats = EpochAccumulator()
    if cls is nnUNetTrainerAdv:
        trainer.clean_weight = 0.5
    if cls is nnUNetTrainerIMA:
        trainer.ima = settings.ima
        trainer.clean_weight = 1 - trainer.ima.beta
        trainer.margins = trainer.ima.make_margin_store(settings.num_epochs)
        trainer.margins.initial = settings.adv_eps  # the same budget as Adv
    return trainer


class PassCounter:
    """Counts the network's passes per step, by kind and batch size.

    ``train``: forward + backward with parameter gradients (the training losses); ``attack``:
    forward + backward for the input gradient only, parameters frozen (PGD steps); ``forward``:
    forward-only (IMA's crossing check of the last iterate and its bisection). ``passes`` maps
    ``(kind, batch size)`` to the number of such passes.
    """

    KINDS = ("train", "attack", "forward")

    def __init__(self, network):
        self.passes: Counter = Counter()
        network.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if not torch.is_grad_enabled():
            kind = "forward"
        else:
            kind = "train" if next(module.parameters()).requires_grad else "attack"
        self.passes[(kind, inputs[0].shape[0])] += 1

    def reset(self):
        self.passes = Counter()


def samples(passes: Counter, kind: str) -> int:
    """Samples that went through the network in passes of ``kind``."""
    return sum(n * count for (k, n), count in passes.items() if k == kind)


def pass_factory(network, x: torch.Tensor, target, train_loss, attack_loss, autocast: bool):
    """``make(kind, n)``: one pass of ``kind`` on the first ``n`` samples, run the way the trainers
    run it: a training pass is ``train_loss(output, target)`` (under CUDA autocast when
    ``autocast``) and its backward; an attack pass is the per-sample ``attack_loss`` and the input
    gradient under :func:`attack_mode` (eval mode, frozen parameters, fp32); a forward-only pass
    is the network under :func:`attack_mode` without gradients. ``target`` is a tensor or a list
    of tensors (nnU-Net's deep-supervision targets)."""
    def make(kind, n):
        index = torch.arange(n)
        xs, ts = x[:n], select(target, index)
        if kind == "train":
            def run():
                with torch.autocast(x.device.type, enabled=autocast):
                    loss = train_loss(network(xs), ts)
                loss.backward()
                network.zero_grad(set_to_none=True)
        elif kind == "attack":
            def run():
                with attack_mode(network):
                    x_in = xs.clone().requires_grad_(True)
                    torch.autograd.grad(attack_loss(network(x_in), ts).sum(), x_in)
        else:
            def run():
                with attack_mode(network), torch.no_grad():
                    network(xs)
        return run
    return make


def pass_prices(make, shapes, device, repeats: int) -> Dict[tuple, float]:
    """Median seconds of one pass of each ``(kind, batch size)`` in ``shapes``."""
    prices = {}
    for kind, n in sorted(shapes):
        run = make(kind, n)
        run()  # warm-up (allocator, cuDNN algorithm choice for this shape)
        prices[(kind, n)] = statistics.median(timed(run, device)[1] for _ in range(repeats))
    return prices


def print_profile(name: str, step, device) -> None:
    """The operators that took the most time in one step (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one {name} step, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


def measure(steps: Dict[str, object], counters: Dict[str, PassCounter], device, repeats: int):
    """Run the ``steps`` in turn, ``repeats + 1`` rounds (the first warms up and is not
    counted). Returns per step the counted times, the passes summed over the counted rounds and
    the peak CUDA memory (GiB) of its last round."""
    times = {name: [] for name in steps}
    passes = {name: Counter() for name in steps}
    memory = {}
    for r in range(repeats + 1):
        for name, step in steps.items():
            counters[name].reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, elapsed = timed(step, device)
            if r:
                times[name].append(elapsed)
                passes[name] += counters[name].passes
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2 ** 30
    return times, passes, memory


def report(times, passes, prices, memory, counted: int) -> Dict[str, float]:
    """Print the table (median time, samples per pass kind, floor, peak memory); returns the
    medians and, under ``"ima floor"``, IMA's floor efficiency over the counted rounds."""
    kinds = PassCounter.KINDS
    print("\nsamples through the network per step: train = fwd+bwd with parameter gradients, "
          "attack = fwd+bwd for the input gradient, forward = forward only")
    print(f"{'step':<16}{'median s':>10}" + "".join(f"{k:>9}" for k in kinds) +
          f"{'floor s':>9}" + (f"{'peak GiB':>10}" if memory else ""))
    medians = {}
    for name in times:
        medians[name] = statistics.median(times[name])
        floor = sum(count * prices[shape] for shape, count in passes[name].items()) / counted
        line = (f"{name:<16}{medians[name]:>10.3f}" +
                "".join(f"{samples(passes[name], k) // counted:>9d}" for k in kinds) +
                f"{floor:>9.3f}")
        print(line + (f"{memory[name]:>10.2f}" if memory else ""))
        if name == "ima":  # floor time / measured time, both summed over the counted rounds
            medians["ima floor"] = floor * counted / sum(times[name])
    return medians


def measure_and_report(steps, counters, make_pass, device, repeats: int):
    """:func:`measure` the steps, price every ``(kind, batch size)`` of pass they made with
    ``make_pass`` and print the table; returns ``(medians, prices)`` (see :func:`report`)."""
    times, passes, memory = measure(steps, counters, device, repeats)
    shapes = set().union(*(set(p) for p in passes.values()))
    prices = pass_prices(make_pass, shapes, device, repeats)
    return report(times, passes, prices, memory, repeats), prices


def print_step_ratios(medians: Dict[str, float], plain: str, adv: str) -> None:
    print_ratios({"ima_over_adv20": medians["ima"] / medians[adv],
                  "ima_over_plain": medians["ima"] / medians[plain],
                  "floor_efficiency": medians["ima floor"]})


def segmentation_benchmark(args, device) -> None:
    """The nnU-Net trainers' steps on a 2D network of ``args.plan``."""
    plan = PLANS[args.plan]
    batch_size = args.batch_size or plan["batch"]
    eps = 4.0 if args.eps is None else args.eps
    network = build_network(plan["features"], 3).to(device)
    batch = make_batch(plan["patch"], batch_size, len(plan["features"]) - 1, args.seed, device)
    settings = settings_from_dict({"adv_eps": eps, "eps_max": max(eps, 1e-3) * 2,
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

    adv = f"adv (PGD-{args.pgd_steps})"
    classes = {"plain": nnUNetTrainer, adv: nnUNetTrainerAdv, "ima": nnUNetTrainerIMA}
    trainers, counters, steps = {}, {}, {}
    for name, cls in classes.items():
        net = copy.deepcopy(network).train()
        trainers[name], counters[name] = make_trainer(cls, net, settings, device), PassCounter(net)
        steps[name] = (lambda t=trainers[name], c=cls: c.train_step(t, batch))
    plain = trainers["plain"]
    make_pass = pass_factory(plain.network, batch["data"], batch["target"], plain.loss,
                             plain.attack_loss, autocast=device.type == "cuda")
    medians, prices = measure_and_report(steps, counters, make_pass, device, args.repeats)
    ima_stats = trainers["ima"]._epoch_stats
    print(f"\nIMA: {ima_stats.attacked} slices attacked, {ima_stats.crossed} crossed over "
          f"{args.repeats + 1} steps. Floor: each pass at its measured time for its kind and batch "
          f"size (full batch of {batch_size}: " +
          ", ".join(f"{k} {prices[(k, batch_size)] * 1e3:.1f} ms" for k in PassCounter.KINDS
                    if (k, batch_size) in prices) + ")")
    if args.profile:
        for name in (adv, "ima"):
            print_profile(name, steps[name], device)
    if args.epoch_iterations:
        # One IMA epoch of steps, back to back: margins evolve as in training (same batch, lr 0,
        # no data loading, so this is the GPU/CPU cost of the steps alone).
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, elapsed = timed(lambda: [steps["ima"]() for _ in range(args.epoch_iterations)], device)
        peak = (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
                if device.type == "cuda" else "")
        print(f"IMA epoch of {args.epoch_iterations} train steps (batch {batch_size} x "
              f"{tuple(plan['patch'])}): {elapsed:.1f} s{peak}")
    print_step_ratios(medians, "plain", adv)


CLASSIFICATION_MODELS = {"digits": "digits-cnn", "fashion-mnist": "fashion-cnn"}


def classification_benchmark(args, device) -> None:
    """nnunet-ima-classify's ce / adv / ima steps with the paper's CNN on real images."""
    from nnunet_ima.classification.datasets import as_float, load_dataset
    from nnunet_ima.classification.models import build_model
    from nnunet_ima.classification.settings import TrainConfig
    from nnunet_ima.classification.training import Trainer

    data = load_dataset(args.classification, args.data_root, args.seed)
    batch_size = args.batch_size or 128
    eps = 2.0 if args.eps is None else args.eps
    x_all, y_all = as_float(data.x_train), data.y_train
    model = build_model(CLASSIFICATION_MODELS[args.classification], data.num_classes,
                        tuple(x_all.shape[1:])).to(device)
    torch.manual_seed(args.seed)
    # Warm-up: plain cross-entropy training so that most samples are classified correctly.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x_all))
    for i in range(args.warmup_steps):
        idx = order[(i * batch_size) % len(x_all):][:batch_size]
        loss = F.cross_entropy(model(x_all[idx].to(device)), y_all[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    x, y = x_all[:batch_size].to(device), y_all[:batch_size].to(device)
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    print(f"classification {args.classification}: {CLASSIFICATION_MODELS[args.classification]}, "
          f"batch {batch_size} x {tuple(x.shape[1:])}, device {device}, "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters; "
          f"{correct}/{batch_size} correct after warm-up; L2 eps {eps:g}")

    adv = f"adv (PGD-{args.pgd_steps})"
    methods = {"ce": "ce", adv: "adv", "ima": "ima"}
    trainers, counters, steps = {}, {}, {}
    for name, method in methods.items():
        # lr 0: every repetition sees the same network (Adam then leaves the weights alone).
        config = TrainConfig.from_flat(dict(
            dataset=args.classification, model=CLASSIFICATION_MODELS[args.classification],
            method=method, epochs=1, batch_size=batch_size, lr=0.0, pgd_steps=args.pgd_steps,
            eps=eps if method == "adv" else None, eps_max=2 * eps if method == "ima" else None))
        net = copy.deepcopy(model).train()
        trainer = Trainer(config, data, net, out="", device=device, progress=False)
        if trainer.margins is not None:
            trainer.margins.initial = eps  # the same budget as Adv
        generator = torch.Generator(device=device).manual_seed(args.seed)
        keys = list(range(batch_size))
        trainers[name], counters[name] = trainer, PassCounter(net)
        steps[name] = (lambda t=trainer, g=generator: t.train_step(x, y, keys, g))
    # The classification trainer runs in fp32 (no autocast); its attacks use per-sample CE.
    make_pass = pass_factory(trainers["ce"].model, x, y, F.cross_entropy,
                             lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"),
                             autocast=False)
    medians, _ = measure_and_report(steps, counters, make_pass, device, args.repeats)
    if args.profile:
        for name in (adv, "ima"):
            print_profile(name, steps[name], device)
    print_step_ratios(medians, "ce", adv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="tiny", choices=sorted(PLANS))
    p.add_argument("--classification", choices=sorted(CLASSIFICATION_MODELS),
                   help="benchmark nnunet-ima-classify's steps on this dataset instead of nnU-Net's")
    p.add_argument("--data-root", help="folder of the classification dataset (fashion-mnist)")
    p.add_argument("--batch-size", type=int)
    add_device_argument(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--eps", type=float,
                   help="Adv eps and IMA margin, L2 (default 4 z-score units for nnU-Net, 2 for "
                        "classification)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="print the operators that took the most time in one Adv and one IMA step")
    p.add_argument("--epoch-iterations", type=int, default=0,
                   help="also time this many consecutive IMA steps (nnU-Net's epoch: 50 in the "
                        "paper's schedule) and report their total and peak memory")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.classification:
        classification_benchmark(args, device)
    else:
        segmentation_benchmark(args, device)


if __name__ == "__main__":
    main()
