"""``nnunet-ima-classify``: IMA and its baselines for image classification.

    nnunet-ima-classify train --dataset moons --method ima -o runs/moons_ima
    nnunet-ima-classify eval runs/moons_ce runs/moons_ima --norm linf
    nnunet-ima-classify margins runs/moons_ima
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from nnunet_ima.classification.datasets import DATASETS, MOONS_NOISE, load_dataset
from nnunet_ima.classification.models import DEFAULT_MODEL, MODELS, build_model
from nnunet_ima.classification.robust_eval import ATTACK_LOSSES, auc_of, robust_accuracy
from nnunet_ima.classification.training import (METHODS, PAPER_DEFAULTS, TrainConfig, Trainer,
                                                write_json, write_text)
from nnunet_ima.errors import UserInputError
from nnunet_ima.margins import MarginStore


SMALL_MODELS = ("mlp", "digits-cnn")


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked but no CUDA device is available; use --device cpu")
    return torch.device(name)


def _limit_threads(model_name: str, device: torch.device) -> None:
    # The tiny networks run thousands of small ops per step: on a CPU, intra-op threads only add
    # synchronisation (and oversubscribe the cores when several runs share a machine).
    if device.type == "cpu" and model_name in SMALL_MODELS:
        torch.set_num_threads(1)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier (ce, adv or ima)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", help="dataset folder (fashion-mnist, svhn, cifar10, covid-ct)")
    p.add_argument("--method", default="ima", choices=METHODS)
    p.add_argument("--model", choices=sorted(MODELS), help="default: the paper's model of the dataset")
    p.add_argument("-o", "--output", required=True, help="run folder (resumed if it holds a checkpoint)")
    p.add_argument("--epochs", type=int, help="default: the paper's")
    p.add_argument("--batch-size", type=int, help="default: 128 (covid-ct 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", default="l2", choices=("l2", "linf"))
    p.add_argument("--eps", type=float, help="adv: the fixed budget")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--eps-max", type=float, help="ima: the largest margin (default: the paper's)")
    p.add_argument("--delta", type=float, help="ima: expansion step (default eps_max / epochs)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--binary-steps", type=int, default=10)
    p.add_argument("--margin-update", default="average", choices=("average", "replace"))
    p.add_argument("--on-clean-wrong", default="shrink", choices=("shrink", "reset"))
    p.add_argument("--clip-min", default="zero", choices=("zero", "delta"))
    p.add_argument("--max-train", type=int, help="use only the first N training samples")
    p.add_argument("--moons-noise", type=float, default=MOONS_NOISE,
                   help="noise of scikit-learn's make_moons")
    p.add_argument("--save-every", type=int, default=0, help="also keep checkpoint_epoch_N.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")


def run_train(args) -> int:
    defaults = PAPER_DEFAULTS[args.dataset]
    config = TrainConfig(
        dataset=args.dataset, model=args.model or DEFAULT_MODEL[args.dataset], method=args.method,
        epochs=args.epochs or defaults["epochs"], batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr, seed=args.seed, norm=args.norm, eps=args.eps, pgd_steps=args.pgd_steps,
        eps_max=args.eps_max if args.eps_max is not None else defaults["eps_max"],
        delta=args.delta, beta=args.beta, binary_steps=args.binary_steps,
        margin_update=args.margin_update, on_clean_wrong=args.on_clean_wrong,
        clip_min=args.clip_min, max_train=args.max_train, data_root=args.data_root,
        moons_noise=args.moons_noise)
    config.validate()
    device = _device(args.device)
    _limit_threads(config.model, device)
    split_path = os.path.join(args.output, "covid_split.json") if args.dataset == "covid-ct" else None
    if split_path:
        os.makedirs(args.output, exist_ok=True)
    data = load_dataset(args.dataset, args.data_root, args.seed, split_path, args.moons_noise)
    torch.manual_seed(args.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    trainer = Trainer(config, data, model, args.output, device, args.save_every,
                      progress=not args.no_progress)
    history = trainer.run()
    print(f"final: train_acc {history[-1]['train_acc']:.4f} val_acc {history[-1]['val_acc']:.4f} "
          f"-> {args.output}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="robust accuracy under 100-PGD (CE and margin loss, worst case)")
    p.add_argument("runs", nargs="+", help="run folders written by `train`")
    p.add_argument("--norm", default="l2", choices=("l2", "linf"))
    p.add_argument("--noise", type=float, nargs="+", help="default: the paper's levels")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_LOSSES), choices=ATTACK_LOSSES)
    p.add_argument("--max-samples", type=int, help="evaluate the first N test samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-o", "--table", help="write the markdown table here (it is always printed)")


def _load_run(folder: str, device: torch.device):
    path = os.path.join(folder, "model_final.pt")
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: train the run first (`nnunet-ima-classify "
                             f"train -o {folder}`)")
    state = torch.load(path, map_location=device, weights_only=False)
    config = TrainConfig(**state["config"])
    split_path = os.path.join(folder, "covid_split.json") if config.dataset == "covid-ct" else None
    data = load_dataset(config.dataset, config.data_root, config.seed, split_path, config.moons_noise)
    model = build_model(config.model, data.num_classes, data.input_shape)
    model.load_state_dict(state["model"])
    _limit_threads(config.model, device)
    return config, data, model.to(device).eval()


def run_eval(args) -> int:
    device = _device(args.device)
    if args.noise is not None and any(n < 0 for n in args.noise):
        raise UserInputError(f"noise levels must be >= 0, got {args.noise}")
    rows = []
    for folder in args.runs:
        config, data, model = _load_run(folder, device)
        noise = sorted(set(args.noise if args.noise is not None else PAPER_DEFAULTS[config.dataset]["noise"]))
        x, y = data.x_test, data.y_test
        if args.max_samples:
            x, y = x[:args.max_samples], y[:args.max_samples]
        result = robust_accuracy(model, x, y, noise, args.norm, args.steps, args.attacks,
                                 data.clamp, args.batch_size, args.seed, device)
        worst = result["worst"]
        report = {"noise": {f"{n:g}": worst[n] for n in noise}, "auc": auc_of(worst),
                  "attacks": list(args.attacks), "steps": args.steps, "n": len(x),
                  "per_attack": {a: {f"{n:g}": result[a][n] for n in noise} for a in args.attacks}}
        write_json(os.path.join(folder, f"eval_{args.norm}.json"), report)
        rows.append((f"{os.path.basename(os.path.normpath(folder))}", noise, report))
    levels = sorted({n for _, noise, _ in rows for n in noise})
    header = "| run | " + " | ".join(f"{args.norm.upper()} {n:g}" for n in levels) + " | AUC |"
    lines = [f"Robust accuracy (%), {args.steps}-PGD, worst of {'+'.join(args.attacks)}", "",
             header, "|" + "---|" * (len(levels) + 2)]
    for name, noise, report in rows:
        cells = [f"{100 * report['noise'][f'{n:g}']:.2f}" if f"{n:g}" in report["noise"] else ""
                 for n in levels]
        auc = f"{100 * report['auc']:.2f}" if report["auc"] is not None else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {auc} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.table:
        write_text(args.table, table)
    return 0


def add_margins_parser(sub) -> None:
    p = sub.add_parser("margins", help="the margin distribution of an IMA run and the eps it suggests")
    p.add_argument("run", help="an IMA run folder")
    p.add_argument("--quantile", type=float, default=0.1,
                   help="suggested eps = this quantile of the margins of samples that reached the "
                        "boundary (default 0.1)")


def suggest_eps(margins: np.ndarray, eps_max: float, quantile: float) -> float:
    """The paper's Appendix C.3 rule, made concrete: an eps just below the bulk of the margins.

    Margins clipped at ``eps_max`` belong to samples whose boundary was never found; the
    ``quantile`` (default 10 %) of the others is a budget that most samples can be pushed to
    without crossing their boundary, so vanilla training at it does not train on
    adversarial examples that are really of another class.
    """
    inner = margins[margins < eps_max * (1 - 1e-9)]
    values = inner if inner.size else margins
    return float(np.quantile(values, quantile))


def run_margins(args) -> int:
    path = os.path.join(args.run, "margins.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: margins are written by IMA runs "
                             f"(--method ima)")
    if not 0 < args.quantile < 1:
        raise UserInputError(f"--quantile must be in (0, 1), got {args.quantile}")
    with open(path) as f:
        store = MarginStore.from_state_dict(json.load(f))
    values = store.values()
    if values.size == 0:
        raise UserInputError(f"{path} holds no margins yet")
    print(f"{values.size} samples, eps_max {store.eps_max:g}")
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        print(f"  {int(q * 100):>3d}% quantile: {np.quantile(values, q):.4g}")
    counts, edges = np.histogram(values, bins=10, range=(0, store.eps_max))
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        print(f"  [{lo:7.3g}, {hi:7.3g}) {'#' * int(round(50 * c / max(counts.max(), 1)))} {c}")
    eps = suggest_eps(values, store.eps_max, args.quantile)
    print(f"suggested eps for vanilla adversarial training: {eps:.4g} "
          f"({int(args.quantile * 100)}% quantile of the margins below eps_max)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ima-classify",
                                     description="IMA, vanilla adversarial and clean training "
                                                 "for image classification")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_margins_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": run_train, "eval": run_eval, "margins": run_margins}[args.command](args)
    except UserInputError as e:
        print(f"nnunet-ima-classify {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
