"""Peak memory and time of one 3D attack step, with and without activation checkpointing.

One step of the evaluator's attack on a whole preprocessed volume: the forward pass of the
differentiable sliding-window path (``SlidingWindowNetwork``: nnU-Net's padding, tiles, Gaussian
weights and test-time mirroring) and the gradient of the cross-entropy w.r.t. the volume, once
plain and once with ``checkpoint_tiles=True`` (``--gradient-checkpointing`` of the evaluator).
The network is nnU-Net's own ``PlainConvUNet`` with the architecture nnU-Net plans for MSD Heart
``3d_fullres`` (6 stages, 32 to 320 features, strides 1x1x1, 1x2x2, 2x2x2 (3x), 1x2x2; patch
80 x 192 x 160; median case 115 x 320 x 232), random weights. Each variant runs in a fresh
process, so that its peak is its own: on CUDA ``torch.cuda.max_memory_allocated``, on a CPU the
process's peak RSS (``resource.getrusage``), both also less what was held before the step
(weights, input). The last line is the ``name=ratio`` line of the benchmark scripts.

    python benchmarks/eval_3d_memory.py                        # small, CPU, one thread: < 1 min
    python benchmarks/eval_3d_memory.py --device cuda --heart  # Heart's network, patch, case

The small default keeps the first 4 of Heart's stages with 8 to 64 features, patch 8 x 24 x 24,
volume 12 x 36 x 36 (2 tiles on every axis, 8 in all), with Heart's 8 mirrored passes per tile.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from statistics import median

import numpy as np
import torch

# nnU-Net's plan of MSD Heart (Dataset002) 3d_fullres: architecture, patch, median case.
HEART_FEATURES = [32, 64, 128, 256, 320, 320]
HEART_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
HEART_KERNELS = [[1, 3, 3]] + [[3, 3, 3]] * 5
HEART_PATCH = (80, 192, 160)
HEART_VOLUME = (115, 320, 232)
UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
VARIANTS = ("plain", "checkpointed")


def architecture(features) -> dict:
    """The ``"architecture"`` entry of a 3d_fullres plan with Heart's strides and kernels and
    ``features`` per stage (their number: the stages, at most 6)."""
    n = len(features)
    return {"network_class_name": UNET,
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features),
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": HEART_KERNELS[:n],
                "strides": HEART_STRIDES[:n], "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def total_stride(features) -> tuple:
    return tuple(int(s) for s in np.prod(np.array(HEART_STRIDES[:len(features)]), axis=0))


def sliding_window_network(args, device: torch.device, checkpoint_tiles: bool):
    """The evaluator's ``SlidingWindowNetwork`` around nnU-Net's predictor of the plan,
    initialised as nnU-Net's trainer initialises one (``manual_initialization``)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_ima.evaluation.predictor_path import SlidingWindowNetwork

    arch = architecture(args.features)
    plans = {"dataset_name": "Dataset002_Heart", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {
                 "patch_size": list(args.patch), "data_identifier": "nnUNetPlans_3d_fullres",
                 "architecture": arch}}}
    labels = {"background": 0, **{f"class{k}": k for k in range(1, args.classes)}}
    dataset_json = {"labels": labels, "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}
    torch.manual_seed(0)
    network = get_network_from_plans(UNET, arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                     args.classes, allow_init=True, deep_supervision=False)
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=args.step_size, use_mirroring=bool(args.mirror_axes),
                                perform_everything_on_device=device.type == "cuda",
                                device=device, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager,
                                    plans_manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], dataset_json, "nnUNetTrainer",
                                    tuple(args.mirror_axes) or None)
    # Attacks differentiate w.r.t. the input only; the weights need no gradient.
    network.requires_grad_(False)
    return SlidingWindowNetwork(predictor, tiles_per_pass=args.tiles_per_pass,
                                checkpoint_tiles=checkpoint_tiles).to(device).eval()


def peak_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def limit_cpu_memory(fraction: float = 0.8) -> None:
    """Linux: cap this process's address space at what it maps now plus ``fraction`` of the
    memory available, so that a step too large for the machine fails here with an allocation
    error instead of waking the kernel's OOM killer (which may pick another process)."""
    try:
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    limit = (mapped + int(fraction * available)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_variant(args) -> dict:
    """One variant in this process: build, then ``--warmup`` untimed and ``--repeats`` timed
    attack steps; the peak memory (on a CPU: of the first step) and the median time of the
    timed steps."""
    from nnunet_ima.benchmarking import synchronize, timed

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    network = sliding_window_network(args, device, args.child == "checkpointed")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, *args.volume, generator=generator).to(device)
    y = torch.randint(0, args.classes, (1, *args.volume), generator=generator).to(device)

    def step():
        point = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(network(point), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        return grad

    # The peak RSS cannot be reset, and the step after the first one finds glibc's heap grown
    # (its mmap threshold rises as large blocks are freed) and holds more: on a CPU the memory
    # is that of the first step, the time that of the steps after the untimed ones.
    before = None if device.type == "cuda" else peak_rss_bytes()
    peak = None
    for i in range(args.warmup):
        step()  # the allocators' first blocks, oneDNN's primitives, cuDNN's algorithm choice
        if i == 0 and device.type != "cuda":
            peak = peak_rss_bytes()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(args.repeats):
        grad, seconds = timed(step, device)
        times.append(seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif peak is None:
        peak = peak_rss_bytes()
    padded = network.pad(x)[0].shape[2:]
    return {"variant": args.child, "peak": peak, "before": before, "seconds": median(times),
            "tiles": len(network.tile_slices(padded)),
            "passes": 2 ** len(args.mirror_axes),
            "grad_norm": float(grad.double().norm()), "grad_sum": float(grad.double().sum())}


def child_command(args, variant: str) -> list:
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device,
               "--volume", *map(str, args.volume), "--patch", *map(str, args.patch),
               "--features", *map(str, args.features), "--classes", str(args.classes),
               "--step-size", str(args.step_size), "--tiles-per-pass", str(args.tiles_per_pass),
               "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--threads", str(args.threads),
               "--child", variant, "--mirror-axes", *map(str, args.mirror_axes)]
    return command


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--volume", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="the preprocessed volume's size (default 12 36 36; with --heart "
                        "115 320 232)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="the patch size (default 8 24 24; with --heart 80 192 160); a multiple "
                        "of the network's total stride on each axis")
    p.add_argument("--heart", action="store_true",
                   help="MSD Heart 3d_fullres: patch 80 192 160, volume 115 320 232 unless given")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="features per stage, 1 to 6 stages (default 8 16 32 64; with --heart "
                        "Heart's 32 64 128 256 320 320)")
    p.add_argument("--classes", type=int, default=2, help="output classes (Heart: 2)")
    p.add_argument("--mirror-axes", type=int, nargs="*", default=[0, 1, 2],
                   help="test-time mirroring axes (default 0 1 2, nnU-Net's 3D default: 8 "
                        "passes per tile); none given: no mirroring")
    p.add_argument("--step-size", type=float, default=0.5, help="tile step (nnU-Net: 0.5)")
    p.add_argument("--tiles-per-pass", type=int, default=1,
                   help="tiles per network call (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before them (default 1: the first step of a process "
                        "is slow)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which steps to run (default both; the plain step of --heart needs "
                        "hundreds of GiB: on a CPU run only checkpointed)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.volume = tuple(args.volume or (HEART_VOLUME if args.heart else (12, 36, 36)))
    args.patch = tuple(args.patch or (HEART_PATCH if args.heart else (8, 24, 24)))
    args.features = args.features or (HEART_FEATURES if args.heart else [8, 16, 32, 64])
    stride = total_stride(args.features)
    if not 1 <= len(args.features) <= len(HEART_STRIDES):
        p.error(f"--features: 1 to {len(HEART_STRIDES)} stages, got {len(args.features)}")
    if any(s % d for s, d in zip(args.patch, stride)):
        p.error(f"--patch {' '.join(map(str, args.patch))} is not a multiple of the network's "
                f"total stride {stride} on every axis: pick one that is, or fewer --features")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.child:
        if args.device == "cpu" and sys.platform.startswith("linux"):
            limit_cpu_memory()
        print(json.dumps(run_variant(args)))
        return

    print(f"3d_fullres attack step: volume {args.volume}, patch {args.patch}, features "
          f"{args.features}, mirror axes {args.mirror_axes or 'none'}, tile step "
          f"{args.step_size}, {args.tiles_per_pass} tile(s) per pass, device {args.device}, "
          f"torch {torch.__version__}")
    results, failed = {}, {}
    for variant in args.variants:
        done = subprocess.run(child_command(args, variant), capture_output=True, text=True)
        if done.returncode == 0:
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            # Out of memory is a result here (the plain step of a Heart case on one GPU).
            failed[variant] = (done.stderr.strip().splitlines() or ["killed"])[-1]
    kind = "peak GPU memory (max_memory_allocated)" if args.device.startswith("cuda") \
        else "peak RSS of the process"
    if results:
        first = next(iter(results.values()))
        print(f"{first['tiles']} tiles x {first['passes']} mirrored passes; {kind}:")
    print(f"{'variant':<14}{'peak':>12}{'step adds':>12}{'seconds':>10}")
    for variant, r in results.items():
        print(f"{variant:<14}{gib(r['peak']):>12}{gib(r['peak'] - r['before']):>12}"
              f"{r['seconds']:>10.2f}")
    for variant, reason in failed.items():
        print(f"{variant:<14} failed: {reason[:200]}")
    if len(results) < 2:
        if not results:
            sys.exit("no variant ran")
        return
    plain, checkpointed = results["plain"], results["checkpointed"]
    agreement = abs(checkpointed["grad_norm"] - plain["grad_norm"]) / max(plain["grad_norm"], 1e-30)
    print(f"gradient norm: plain {plain['grad_norm']:.6g}, checkpointed "
          f"{checkpointed['grad_norm']:.6g} (relative difference {agreement:.1e})")
    if agreement > 1e-4:
        sys.exit("the checkpointed gradient differs from the plain one")
    added = lambda r: max(r["peak"] - r["before"], 1)  # noqa: E731
    print(f"checkpointed_over_plain_memory={checkpointed['peak'] / plain['peak']:.3f} "
          f"checkpointed_over_plain_step_memory={added(checkpointed) / added(plain):.3f} "
          f"checkpointed_over_plain_time={checkpointed['seconds'] / plain['seconds']:.3f} "
          f"device={args.device}")


if __name__ == "__main__":
    main()
