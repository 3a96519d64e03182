"""Segmentation evaluation speed: one noise level per batch against several levels in one batch.

``nnunet-ima-eval --level-batching on`` (the default on GPUs) attacks a batch of slices smaller
than ``--batch-size`` at several noise levels at once (4 slices x 4 levels = 16) when a 1-step
probe shows that the packed batch gives the same bits. This script attacks the same slices of
an nnU-Net 2D network (the tiny 48 x 48 plan or the Heart plan of
``nnunet_ima.benchmarking``; random weights) both ways, side by side in one run, checks that the TP / FP / FN counts agree, and
prints attacked slices per second (slices x levels / s).

    python benchmarks/eval_seg_throughput.py --steps 10 --threads 2
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from nnunet_ima.benchmarking import PLANS, evaluation_model, print_ratios, random_slices, timed
from nnunet_ima.devices import add_device_argument
from nnunet_ima.evaluation.attacks import ATTACKS
from nnunet_ima.evaluation.robustness import AttackSettings, evaluate_levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="tiny", choices=sorted(PLANS))
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--noise", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0],
                   help="attacked levels (> 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--attack", default="pgd", choices=ATTACKS)
    p.add_argument("--repeats", type=int, default=2, help="timings per way; the fastest counts")
    add_device_argument(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = evaluation_model(args.plan, device)
    samples = random_slices(args.plan, args.slices, args.seed)
    levels = sorted(set(args.noise))
    settings = {mode: AttackSettings(attack=args.attack, steps=args.steps,
                                     batch_size=args.batch_size, seed=args.seed,
                                     level_batching=mode) for mode in ("off", "on")}

    def one_at_a_time():
        return evaluate_levels(model, samples, levels, settings["off"], device)

    packing = Counter()

    def batched():
        packing.clear()
        return evaluate_levels(model, samples, levels, settings["on"], device, packing=packing)

    times = {"one level per batch": [], "levels batched": []}
    for r in range(args.repeats):
        # Alternate the order so that neither way always runs on a warmer cache.
        order = [("one level per batch", one_at_a_time), ("levels batched", batched)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            result, seconds = timed(fn, device)
            times[name].append(seconds)
            if name == "one level per batch":
                single = result
            else:
                packed = result
    same = all(np.array_equal(getattr(single[n], f), getattr(packed[n], f))
               for n in levels for f in ("tp", "fp", "fn"))
    work = len(samples) * len(levels)
    print(f"{args.plan} plan {PLANS[args.plan]['patch']}, {len(samples)} slices x {len(levels)} "
          f"levels, {args.steps}-step {args.attack}, batch size {args.batch_size}, "
          f"{args.device} ({args.threads} thread{'s' * (args.threads != 1)})")
    print(f"packing: {dict(packing) or 'none'}; counts identical: {same}")
    rates = {}
    for name, seconds in times.items():
        rates[name] = work / min(seconds)
        print(f"{name:<22}{min(seconds):>8.2f} s {rates[name]:>8.2f} slices/s")
    speedup = rates["levels batched"] / rates["one level per batch"]
    print_ratios({"seg_level_batching_speedup": speedup})


if __name__ == "__main__":
    main()
