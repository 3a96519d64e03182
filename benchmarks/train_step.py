"""Cost of one training step: plain nnU-Net vs PGD-20 adversarial training vs IMA, side by side.

Times the training steps of ``nnUNetTrainer``, ``nnUNetTrainerAdv`` and ``nnUNetTrainerIMA`` as
``nnUNetv2_train DATASET 2d 0 -tr <trainer>`` builds them: nnU-Net finds each class by name and
constructs it from a plans file and a dataset.json (a 2D configuration of the chosen plan's
network, written to a temporary nnUNet_preprocessed; nnUNet_results is temporary too), then
``initialize()`` and ``on_train_epoch_start()``; only nnU-Net's data loaders are left out, every
step gets the same synthetic batch. Each trainer runs with its class's own settings (IMA: the
``authors`` recipe it ships), except the budget, which the benchmark makes equal: IMA's margins
are all set to Adv's eps (``--eps``, default Adv's own), and ``--pgd-steps`` goes to both. The
network is first trained briefly by nnU-Net's plain step so that most slices are segmented
correctly, then every trainer gets those weights and learning rate 0, so that every repetition
sees the same network. The three steps alternate so that machine noise hits them alike; the
table gives the median time, peak memory (CUDA) and the forward / backward passes each made
(counted per sample). The baselines ``nnUNetTrainerTRADES`` and ``nnUNetTrainerNFGSM`` run in the
same rounds, each with its class's own settings and Adv's eps and PGD steps (N-FGSM takes one
step whatever ``pgd_steps`` says).

The last line is ``ima_over_adv20=<ratio> ima_over_plain=<ratio> floor_efficiency=<fraction>
recipe=<IMA's recipe> trades_over_adv20=<ratio> nfgsm_over_adv20=<ratio>`` (the baselines' keys
come last so that the first four stay where readers of the line find them); the floor is the time of the network passes IMA made, each priced at the
measured time of a pass of its kind (training fwd+bwd, attack fwd+bwd for the input gradient,
forward-only) and its batch size, run the way the trainers run it: what IMA would cost with zero
overhead around its passes.

``--classification fashion-mnist`` (or ``digits``) does the same for ``nnunet-ima-classify``'s
ce / adv / ima steps with the paper's CNN on real images (warm-up: plain cross-entropy).

    python benchmarks/train_step.py                       # the tiny 48x48 plan, CPU
    python benchmarks/train_step.py --plan heart --batch-size 2 --repeats 2 --warmup-steps 30
    python benchmarks/train_step.py --plan heart --device cuda --epoch-iterations 50
    python benchmarks/train_step.py --classification fashion-mnist --warmup-steps 300
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import tempfile
from collections import Counter
from contextlib import contextmanager, redirect_stdout
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ima.attacks import select
from nnunet_ima.benchmarking import PLANS, nnunet_plans, print_ratios, synchronize, timed
from nnunet_ima.devices import add_device_argument
from nnunet_ima.io import write_json
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.nnunet.paths import trainer_dir
from nnunet_ima.nnunet.settings import CONFIG_ENV
from nnunet_ima.nnunet.synthetic import LABELS, make_case

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


# The dataset of the step benchmark, and the trainers it times by their nnUNetv2_train names.
DATASET = "Dataset990_TrainStepBenchmark"
TRAINERS = {"plain": "nnUNetTrainer", "adv": "nnUNetTrainerAdv", "ima": "nnUNetTrainerIMA"}
# Baselines timed beside them; they take Adv's settings (adv_eps, pgd_steps, ...).
BASELINES = {"trades": "nnUNetTrainerTRADES", "nfgsm": "nnUNetTrainerNFGSM"}


@contextmanager
def nnunet_environment(root: str) -> Iterator[None]:
    """nnU-Net's three folders under ``root``, this package's trainers on nnU-Net's search path,
    ``torch.compile`` off for all three trainers (nnunet-ima's trainers leave it off unless asked;
    nnU-Net's own would compile on CUDA) and no settings file; the environment as it was after."""
    values = {"nnUNet_raw": os.path.join(root, "raw"),
              "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
              "nnUNet_results": os.path.join(root, "results"),
              "nnUNet_extTrainer": trainer_dir(), "nnUNet_compile": "f", CONFIG_ENV: None}
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set_variable(name, value)
            if value is not None and name != "nnUNet_extTrainer" and name != "nnUNet_compile":
                os.makedirs(value, exist_ok=True)
        yield
    finally:
        for name, value in saved.items():
            _set_variable(name, value)


def _set_variable(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def write_preprocessed(plan: str, batch_size: int, batch: dict) -> None:
    """``$nnUNet_preprocessed/DATASET``: ``nnUNetPlans.json`` with the ``2d`` configuration of
    ``PLANS[plan]`` at ``batch_size``, ``dataset.json``, and the ``batch`` as one preprocessed
    case (``initialize()`` infers nnU-Net's dataset format from the files it finds)."""
    folder = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
    plans, dataset_json = nnunet_plans(plan, DATASET, batch_size, LABELS)
    write_json(os.path.join(folder, "nnUNetPlans.json"), plans)
    write_json(os.path.join(folder, "dataset.json"), dataset_json)
    data = os.path.join(folder, plans["configurations"]["2d"]["data_identifier"])
    os.makedirs(data, exist_ok=True)
    np.savez_compressed(os.path.join(data, "case0.npz"),
                        data=batch["data"].cpu().numpy().transpose(1, 0, 2, 3),
                        seg=batch["target"][0].cpu().numpy().transpose(1, 0, 2, 3))


def new_trainer(name: str, settings: Dict[str, object], device: torch.device):
    """``nnUNetv2_train DATASET 2d 0 -tr <name>``'s trainer, initialised: nnU-Net finds the class
    by name and constructs it from the plans and dataset.json; ``settings`` (flat keys, may be
    empty) is the file of ``NNUNET_IMA_CONFIG``, unset when empty. nnU-Net's console messages
    (banner, device, trainer search) are not shown."""
    from nnunetv2.run.run_training import get_trainer_from_args

    path = os.path.join(os.environ["nnUNet_results"], f"{name}.json")
    if settings:
        write_json(path, settings)
        os.environ[CONFIG_ENV] = path
    try:
        with redirect_stdout(io.StringIO()):
            trainer = get_trainer_from_args(DATASET, "2d", 0, name, device=device)
            trainer.initialize()
    finally:
        os.environ.pop(CONFIG_ENV, None)
    return trainer


def start_epoch(trainer, lr: float) -> None:
    """nnU-Net's start of an epoch (train mode, the learning rate of epoch 0, the epoch's
    statistics reset), then the learning rate set to ``lr``."""
    with redirect_stdout(io.StringIO()):
        trainer.on_train_epoch_start()
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr


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


def print_step_ratios(medians: Dict[str, float], plain: str, adv: str,
                      baselines: Iterable[str] = (), **labels: str) -> None:
    """The last line; each of ``baselines`` (names in ``medians``) adds ``<name>_over_adv20``
    after the labels, so the existing keys keep their places."""
    for name in baselines:  # formatted as print_ratios formats a ratio
        labels[f"{name}_over_adv20"] = f"{medians[name] / medians[adv]:.3f}"
    print_ratios({"ima_over_adv20": medians["ima"] / medians[adv],
                  "ima_over_plain": medians["ima"] / medians[plain],
                  "floor_efficiency": medians["ima floor"]}, **labels)


def benchmark_settings(args) -> Dict[str, Dict[str, object]]:
    """Per trainer, the settings the benchmark changes from the class's own defaults (its
    ``NNUNET_IMA_CONFIG`` file; empty: none). Adv and IMA get the same: ``--pgd-steps`` where
    it is not their default, and Adv's ``--eps``; IMA's margins are set to Adv's eps after
    construction (:func:`time_steps`). The baselines get Adv's changes (they read Adv's keys)."""
    settings: Dict[str, Dict[str, object]] = {name: {} for name in {**TRAINERS, **BASELINES}}
    if args.pgd_steps is not None:
        settings["adv"]["pgd_steps"] = settings["ima"]["pgd_steps"] = args.pgd_steps
    if args.eps is not None:
        settings["adv"]["adv_eps"] = args.eps
    for name in BASELINES:
        settings[name].update(settings["adv"])
    return settings


def segmentation_benchmark(args, device) -> None:
    """The steps of nnU-Net's trainer, ``nnUNetTrainerAdv`` and ``nnUNetTrainerIMA`` on a 2D
    configuration of ``args.plan``, each built as ``nnUNetv2_train`` builds it."""
    plan = PLANS[args.plan]
    batch_size = args.batch_size or plan["batch"]
    num_scales = len(plan["features"]) - 1  # deep-supervision outputs nnU-Net trains on
    batch = make_batch(plan["patch"], batch_size, num_scales, args.seed, device)
    train_batches = [make_batch(plan["patch"], batch_size, num_scales, s, device)
                     for s in range(args.seed + 1, args.seed + 5)]

    # The trainers' folders stay until the end: nnU-Net's hooks write to the log file there.
    with tempfile.TemporaryDirectory() as root, nnunet_environment(root):
        write_preprocessed(args.plan, batch_size, batch)
        settings = benchmark_settings(args)
        trainers = {name: new_trainer(cls, settings[name], device)
                    for name, cls in {**TRAINERS, **BASELINES}.items()}
        time_steps(args, device, trainers, batch, train_batches)


def time_steps(args, device, trainers: Dict[str, object], batch: dict, train_batches) -> None:
    """Warm up, then time and report the ``trainers``' steps on ``batch``
    (:func:`segmentation_benchmark`)."""
    plan = PLANS[args.plan]
    batch_size = batch["data"].shape[0]
    adv_settings, ima = trainers["adv"].ima_settings, trainers["ima"]
    eps = adv_settings.adv_eps
    if eps > ima.ima_settings.ima.eps_max:
        raise SystemExit(f"--eps {eps:g} is above IMA's eps_max "
                         f"({ima.ima_settings.ima.eps_max:g}), which IMA's margins cannot "
                         f"exceed; give an --eps of at most that")
    ima.margins.initial = eps  # the same budget as Adv: every slice's margin is Adv's eps
    steps = adv_settings.attack.steps
    recipe = ima.ima_settings.recipe
    for name in BASELINES:  # their class defaults could differ from Adv's; the run compares at one
        b = trainers[name].ima_settings
        if (b.adv_eps, b.attack.steps) != (eps, steps):
            raise SystemExit(f"{BASELINES[name]} has eps {b.adv_eps:g} and {b.attack.steps} PGD "
                             f"steps against Adv's {eps:g} and {steps}; give --eps and "
                             f"--pgd-steps to run them at one budget")

    # Warm-up: nnU-Net's plain training at its own learning rate until the network segments
    # most slices; then every trainer starts from these weights, at learning rate 0, so that
    # every repetition sees the same network.
    plain = trainers["plain"]
    start_epoch(plain, plain.optimizer.param_groups[0]["lr"])
    for i in range(args.warmup_steps):
        plain.train_step(train_batches[i % len(train_batches)])
    weights = copy.deepcopy(plain.network.state_dict())
    for trainer in trainers.values():
        trainer.network.load_state_dict(weights)
        start_epoch(trainer, 0.0)
    network = plain.network
    s = ima.ima_settings
    network.eval()
    with torch.no_grad():
        correct = DiceThresholdCorrect(s.dice_threshold, s.dice_reduce, s.dice_absent_class)(
            network(batch["data"]), batch["target"])
    network.train()
    print(f"plan {args.plan}: batch {batch_size} x {tuple(plan['patch'])}, device {device}, "
          f"{sum(q.numel() for q in network.parameters()) / 1e6:.1f} M parameters; "
          f"{int(correct.sum())}/{batch_size} slices correct by IMA's rule (Dice "
          f"{s.dice_reduce} >= {s.dice_threshold:g}) after warm-up")
    print(f"trainers: {', '.join(TRAINERS.values())} with their class defaults; IMA recipe "
          f"{recipe!r}; Adv eps {eps:g} and IMA margins {eps:g} (L2), {steps} PGD steps each")
    print(f"baselines: {', '.join(BASELINES.values())} with their class defaults at Adv's eps "
          f"{eps:g}; TRADES {steps} PGD steps on the KL, N-FGSM one step")

    adv = f"adv (PGD-{steps})"
    # TRADES keeps its clean graph through the attack and back-propagates once through the clean
    # and the adversarial forward: the hook still sees two training forwards and, under
    # attack_mode's frozen parameters, the PGD passes; its floor prices them as two training
    # passes and Dice + CE attack passes (its attack differentiates a KL), close but not exact.
    names = {"plain": "plain", "adv": adv, "ima": "ima", "trades": "trades", "nfgsm": "nfgsm"}
    counters = {names[n]: PassCounter(t.network) for n, t in trainers.items()}
    step_fns = {names[n]: (lambda t=t: t.train_step(batch)) for n, t in trainers.items()}
    # The attacks' objective: nnU-Net's Dice + CE per slice (over the outputs Adv attacks).
    attack_loss = PerSampleDiceCE(
        full_resolution_only=adv_settings.attack_outputs == "full_resolution")
    make_pass = pass_factory(network, batch["data"], batch["target"], plain.loss, attack_loss,
                             autocast=device.type == "cuda")
    medians, prices = measure_and_report(step_fns, counters, make_pass, device, args.repeats)
    # The margins' evidence of this epoch: per slice and step (crossed, distance, clean-correct).
    records = [r for rs in ima.margins.pending_records().values() for r in rs]
    print(f"\nIMA: {len(records)} slices attacked over {args.repeats + 1} steps, "
          f"{sum(r[2] for r in records)} clean-correct, of which {sum(r[0] for r in records)} "
          f"crossed within their margin. Floor: each pass at its measured "
          f"time for its kind and batch size (full batch of {batch_size}: " +
          ", ".join(f"{k} {prices[(k, batch_size)] * 1e3:.1f} ms" for k in PassCounter.KINDS
                    if (k, batch_size) in prices) + ")")
    if args.profile:
        for name in (adv, "ima"):
            print_profile(name, step_fns[name], device)
    if args.epoch_iterations:
        # IMA steps back to back, as in an epoch: the margins change only at the epoch's end
        # (Algorithm 2), so every step attacks at the same margins (same batch, lr 0, no data
        # loading: this is the GPU/CPU cost of the steps alone).
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, elapsed = timed(lambda: [step_fns["ima"]() for _ in range(args.epoch_iterations)],
                           device)
        peak = (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
                if device.type == "cuda" else "")
        print(f"IMA epoch of {args.epoch_iterations} train steps (batch {batch_size} x "
              f"{tuple(plan['patch'])}): {elapsed:.1f} s{peak}")
    print_step_ratios(medians, "plain", adv, BASELINES, recipe=recipe)


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

    pgd_steps = {} if args.pgd_steps is None else {"pgd_steps": args.pgd_steps}
    methods = {"ce": "ce", "adv": "adv", "ima": "ima"}
    trainers, counters, steps = {}, {}, {}
    for name, method in methods.items():
        # lr 0: every repetition sees the same network (Adam then leaves the weights alone).
        config = TrainConfig.from_flat(dict(
            dataset=args.classification, model=CLASSIFICATION_MODELS[args.classification],
            method=method, epochs=1, batch_size=batch_size, lr=0.0, **pgd_steps,
            eps=eps if method == "adv" else None, eps_max=2 * eps if method == "ima" else None))
        if method == "adv":
            name = f"adv (PGD-{config.attack.steps})"
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
    adv = next(name for name in steps if name.startswith("adv"))
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
                   help="Adv eps and IMA margin, L2 (default: nnUNetTrainerAdv's adv_eps, in "
                        "z-score units, at most IMA's eps_max; 2 for classification)")
    p.add_argument("--pgd-steps", type=int,
                   help="PGD steps of Adv and IMA (default: the trainers' own, 20)")
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
