"""Evaluation speed: our 100-step PGD against torchattacks' on the same model and samples.

Classification: a CNN trained briefly on scikit-learn's digits; both tools attack the same
test images with 100-step PGD (L2: ``torchattacks.PGDL2``; Linf: ``torchattacks.PGD``), step
``eps / 10``, one random start, cross-entropy. Ours lets fooled samples leave the loop. The
script prints the robust accuracy of both (they must agree within 0.5 points) and the time
ratio. Segmentation: slices per second of ``nnunet-ima-eval``'s attack on the tiny nnU-Net plan.

    python benchmarks/eval_throughput.py
"""
from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch

from nnunet_ima.attacks import pgd
from nnunet_ima.benchmarking import evaluation_model, print_ratios, random_slices, timed
from nnunet_ima.classification.datasets import as_float, load_digits
from nnunet_ima.classification.models import digits_cnn


def train_digits(seed: int, epochs: int):
    torch.manual_seed(seed)
    data = load_digits(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = as_float(data.x_train), data.y_train
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), as_float(data.x_test), data.y_test


def ours(model, x, y, eps, norm, steps, seed):
    g = torch.Generator().manual_seed(seed)
    x_adv = pgd(model, x, y, eps, norm=norm, steps=steps, alpha=steps / 10, clamp=(0.0, 1.0),
                stop_if=lambda out, yy: out.argmax(1) != yy, generator=g)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def reference(model, x, y, eps, norm, steps, seed):
    import torchattacks
    torch.manual_seed(seed)
    cls = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD
    attack = cls(model, eps=eps, alpha=eps / 10, steps=steps, random_start=True)
    x_adv = attack(x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (both tools alike)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = train_digits(args.seed, args.epochs)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    print(f"digits CNN: clean accuracy {100 * clean:.2f}% on {len(x)} test images")
    print(f"{'norm':<6}{'eps':>6}{'ours %':>9}{'torchattacks %':>16}{'ours s':>9}{'ta s':>8}{'speed-up':>10}")
    ratios = []
    for norm, eps_list in (("l2", (0.5, 1.0, 2.0)), ("linf", (0.05, 0.1))):
        for eps in eps_list:
            run_ours = partial(ours, model, x, y, eps, norm, args.steps, args.seed)
            run_reference = partial(reference, model, x, y, eps, norm, args.steps, args.seed)
            # Alternate the order so that neither tool always runs on a warmer cache.
            (a, t_a) = timed(run_ours)
            (b, t_b) = timed(run_reference)
            (b2, t_b2) = timed(run_reference)
            (a2, t_a2) = timed(run_ours)
            t_ours, t_ref = min(t_a, t_a2), min(t_b, t_b2)
            ratios.append(t_ref / t_ours)
            print(f"{norm:<6}{eps:>6g}{100 * a:>9.2f}{100 * b:>16.2f}{t_ours:>9.2f}{t_ref:>8.2f}"
                  f"{t_ref / t_ours:>10.2f}")
            if abs(a - b) > 0.005:
                print(f"  note: robust accuracies differ by {100 * abs(a - b):.2f} points")
    seg = segmentation_slices_per_second(args.steps)
    print(f"segmentation: {seg:.2f} slices/s ({args.steps}-step PGD, tiny 48x48 nnU-Net plan, batch 16)")
    print_ratios({"eval_speedup_over_torchattacks": float(np.exp(np.mean(np.log(ratios))))})


def segmentation_slices_per_second(steps: int) -> float:
    """Slices per second of ``nnunet-ima-eval``'s PGD on 16 random slices of the tiny plan."""
    from nnunet_ima.evaluation.robustness import AttackSettings, evaluate_noise

    device = torch.device("cpu")
    model = evaluation_model("tiny", device)
    samples = random_slices("tiny", 16, seed=0)
    _, seconds = timed(lambda: evaluate_noise(model, samples, 5.0, AttackSettings(steps=steps),
                                              device))
    return len(samples) / seconds


if __name__ == "__main__":
    main()
