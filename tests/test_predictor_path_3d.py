"""nnU-Net's 3D configurations on both network paths: the sliding-window network of whole
volumes against nnU-Net's own predictor, activation checkpointing, and the padded whole-volume
network of ``load_model``. A tiny PlainConvUNet built by nnU-Net's get_network_from_plans
(patch 8 x 16 x 16, 3 stages) stands in for a trained 3d_fullres network: fast, CPU."""
import itertools
import json
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.models import PaddedNetwork, load_model, stride_divisor
from nnunet_ima.evaluation.predictor_path import (PredictorPathModel, SlidingWindowNetwork,
                                                  load_predictor_model, segmentation)

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = (8, 16, 16)
ALL_AXES = (0, 1, 2)
# At patch 8 x 16 x 16, step 0.5: 12 x 24 x 20 has tiles at D 0, 4; H 0, 8; W 0, 4 (8 tiles,
# larger than the patch on every axis); 5 x 10 x 12 is one tile padded on every axis;
# 8 x 30 x 9 is one tile in D, 3 tiles in H and padded in W.
SHAPES = [(12, 24, 20), (5, 10, 12), (8, 30, 9)]
DATASET_JSON = {"labels": {"background": 0, "organ": 1, "lesion": 2},
                "channel_names": {"0": "a", "1": "b"}, "file_ending": ".nii.gz"}
FP16_EPS = 2.0 ** -11  # relative rounding of one float16 operation
UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def _arch_kwargs(patch=PATCH) -> dict:
    """A 3-stage 3D PlainConvUNet as nnU-Net's planner writes it (total stride 4 per axis;
    one stage fewer for a patch of 4)."""
    stages = 3 if min(patch) >= 8 else 2
    return {"n_stages": stages, "features_per_stage": [4, 8, 16][:stages],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
            "n_conv_per_stage": [1] * stages, "n_conv_per_stage_decoder": [1] * (stages - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}


def _plans(patch=PATCH, configuration="3d_fullres") -> dict:
    return {"dataset_name": "Dataset000_Volumes", "plans_name": "nnUNetPlans",
            "configurations": {configuration: {
                "patch_size": list(patch), "data_identifier": f"nnUNetPlans_{configuration}",
                "architecture": {"network_class_name": UNET, "arch_kwargs": _arch_kwargs(patch),
                                 "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                         "nonlin"]}}}}


def _tiny_network(patch=PATCH, dtype=torch.float32) -> nn.Module:
    """nnU-Net's own network of ``_plans``: 2 channels -> 3 classes, He-initialised with a
    fixed seed, deep supervision off, eval mode. Biases are randomised too (nnU-Net's init
    zeroes them), so that the mirrored passes differ and every class wins somewhere."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    architecture = _plans(patch)["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(UNET, architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 2, 3, allow_init=True,
                                     deep_supervision=False)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    return network.to(dtype).eval()


def _predictor(network: nn.Module, use_mirroring: bool = True, patch=PATCH,
               mirror_axes=ALL_AXES, tile_step_size: float = 0.5):
    """nnU-Net's predictor around ``network`` with the 3D configuration of ``_plans``, set up
    as nnU-Net's trainer sets one up for its final validation (manual_initialization)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(_plans(patch))
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager,
                                    plans_manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], DATASET_JSON, "nnUNetTrainer",
                                    mirror_axes)
    return predictor


def _volumes(shape, batch=1, seed=1, dtype=torch.float32) -> torch.Tensor:
    return 2 * torch.randn(batch, 2, *shape, generator=torch.Generator().manual_seed(seed),
                           dtype=dtype)


class CountingNetwork(nn.Module):
    """``network`` that counts its calls and the patches it has seen."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.calls = 0
        self.patches = 0

    def forward(self, x):
        self.calls += 1
        self.patches += x.shape[0]
        return self.network(x)


def _all_mirrors_reference(network: nn.Module, x: torch.Tensor, axes=ALL_AXES) -> torch.Tensor:
    """The plain network on ``x`` ``(N, C, D, H, W)`` averaged over every subset of the
    spatial ``axes`` flipped (2 ** len(axes) passes, the empty subset included)."""
    subsets = [tuple(a + 2 for a in c) for i in range(len(axes) + 1)
               for c in itertools.combinations(axes, i)]
    passes = [torch.flip(network(torch.flip(x, s)), s) if s else network(x) for s in subsets]
    return sum(passes) / len(passes)


# ------------------------------------------------------------------ against nnU-Net's predictor

def test_tiles_are_nnunets_3d_steps():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    network = SlidingWindowNetwork(_predictor(_tiny_network()))
    assert network.spatial_dims == 3 and network.patch_size == PATCH
    steps = compute_steps_for_sliding_window((12, 24, 20), PATCH, 0.5)
    assert steps == [[0, 4], [0, 8], [0, 4]]
    assert network.tile_slices((12, 24, 20)) == [
        (slice(d, d + 8), slice(h, h + 16), slice(w, w + 16))
        for d in steps[0] for h in steps[1] for w in steps[2]]


@pytest.mark.parametrize("use_mirroring", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_mode_is_nnunets_sliding_window_bit_for_bit(shape, use_mirroring):
    """predict_like_nnunet and segment of a batch of 2 volumes: each volume's logits are, bit
    for bit, nnU-Net's predict_sliding_window_return_logits of that volume alone (C, D, H, W),
    and its labels their argmax."""
    predictor = _predictor(_tiny_network(), use_mirroring)
    network = SlidingWindowNetwork(predictor)
    x = _volumes(shape, batch=2)
    expected = torch.stack([predictor.predict_sliding_window_return_logits(v) for v in x])
    logits = network.predict_like_nnunet(x)
    assert logits.shape == (2, 3, *shape) and logits.dtype == torch.float16
    assert torch.equal(logits, expected)
    labels = network.segment(x)
    assert labels.shape == (2, *shape) and labels.dtype == torch.int64
    assert torch.equal(labels, expected.argmax(dim=1))
    # A random network that predicts one class everywhere would make the comparison empty.
    assert len(labels.unique()) > 1
    model = PredictorPathModel(name="m", folder="", network=network, num_classes=3,
                               configuration="3d_fullres", data_identifier="", dataset_name="",
                               ignore_label=None, plans={}, dataset_json={}, spatial_dims=3)
    assert torch.equal(segmentation(model, x[1:]), labels[1:])


@pytest.mark.parametrize("use_mirroring", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_mode_is_nnunets_computation_with_fp32_accumulators(shape, use_mirroring):
    """nnU-Net's own code with its float16 accumulators made float32 (its only torch.half
    use): the fp32 path agrees to fp32 rounding, so padding, 3D tiles, the order of the 8
    mirrored passes, the Gaussian, the division and the crop are nnU-Net's."""
    predictor = _predictor(_tiny_network(), use_mirroring)
    network = SlidingWindowNetwork(predictor)
    x = _volumes(shape)
    with mock.patch.object(torch, "half", torch.float32):
        expected = predictor.predict_sliding_window_return_logits(x[0])[None]
    assert expected.dtype == torch.float32
    with torch.no_grad():
        logits = network(x)
    assert logits.shape == (1, 3, *shape) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_mode_differs_from_nnunet_by_its_float16_rounding_only(shape):
    """Where the accumulated Gaussian weight is a normal float16 number, nnU-Net's float16
    logits are the fp32 ones up to float16 rounding of each tile's accumulation and of the
    division; there the labels differ only where two classes are within that rounding."""
    predictor = _predictor(_tiny_network())
    network = SlidingWindowNetwork(predictor)
    x = _volumes(shape)
    expected = predictor.predict_sliding_window_return_logits(x[0])[None].float()
    with torch.no_grad():
        logits = network(x)
    padded, revert = network.pad(x)
    tiles = network.tile_slices(padded.shape[2:])
    _, total_weight = network.tile_weights(padded.shape[2:], x.device)
    well_weighted = total_weight[revert] >= 1e-2
    assert well_weighted.float().mean() > 0.5
    difference = (logits - expected).abs().amax(dim=(0, 1))
    bound = FP16_EPS * (len(tiles) + 1) * float(expected.abs().max())
    assert float(difference[well_weighted].max()) <= bound
    top2 = logits.topk(2, dim=1).values
    decided = well_weighted & ((top2[:, 0] - top2[:, 1]) > 2 * bound)
    assert decided.float().mean() > 0.5
    assert torch.equal(logits.argmax(dim=1)[decided], network.segment(x)[decided])


def test_a_volume_smaller_than_the_patch_is_padded_centred_and_cropped_back():
    """5 x 10 x 12 at patch 8 x 16 x 16: zeros 1 before and 2 after in D (nnU-Net pads the odd
    voxel after), 3 and 3 in H, 2 and 2 in W; one tile, the plain network averaged over all 8
    mirrorings, cropped."""
    tiny = _tiny_network()
    x = _volumes((5, 10, 12))
    network = SlidingWindowNetwork(_predictor(tiny))
    padded, revert = network.pad(x)
    assert padded.shape == (1, 2, *PATCH)
    assert revert == (slice(1, 6), slice(3, 13), slice(2, 14))
    with torch.no_grad():
        expected = _all_mirrors_reference(tiny, F.pad(x, (2, 2, 3, 3, 1, 2)))[..., 1:6, 3:13, 2:14]
        torch.testing.assert_close(network(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes, passes", [(ALL_AXES, 8), ((0, 2), 4), ((1,), 2), (None, 1)])
def test_mirroring_over_the_checkpoint_axes_counts_the_passes(axes, passes):
    """One tile: 2 ** len(axes) network calls per tile on both paths (7 flipped passes plus the
    plain one over 3 axes), the fp32 one equal to the hand-mirrored average."""
    counting = CountingNetwork(_tiny_network())
    predictor = _predictor(counting, mirror_axes=axes)
    network = SlidingWindowNetwork(predictor)
    x = _volumes(PATCH)
    with torch.no_grad():
        logits = network(x)
    assert counting.calls == passes
    network.predict_like_nnunet(x)
    assert counting.calls == 2 * passes
    with torch.no_grad():
        expected = _all_mirrors_reference(counting.network, x, axes or ())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # 8 tiles of (12, 24, 20) in one pass: the same number of calls, 8 patches in each.
    counting.calls = counting.patches = 0
    with torch.no_grad():
        network(_volumes((12, 24, 20)))
    assert (counting.calls, counting.patches) == (passes, 8 * passes)


def test_gradients_flow_to_every_voxel_and_are_finite():
    network = SlidingWindowNetwork(_predictor(_tiny_network()), tiles_per_pass=3)
    x = _volumes((12, 24, 20)).requires_grad_(True)
    network(x)[:, 1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=1) > 0).float().mean() > 0.99
    # The 8 corners are covered by one tile each.
    assert all(float(x.grad[0, :, d, h, w].abs().sum()) > 0
               for d in (0, -1) for h in (0, -1) for w in (0, -1))


def test_batched_volumes_are_predicted_each_on_its_own():
    network = SlidingWindowNetwork(_predictor(_tiny_network()))
    x = _volumes((12, 24, 20), batch=2)
    with torch.no_grad():
        together = network(x)
        alone = torch.cat([network(x[i:i + 1]) for i in range(2)])
        two_at_a_time = SlidingWindowNetwork(network.predictor, tiles_per_pass=2)(x)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_at_a_time, together, rtol=1e-5, atol=1e-5)


def test_the_gradient_is_the_derivative_of_the_3d_sliding_window_function():
    """gradcheck in float64 through 3D padding, tiles, the 8 mirrorings, weights and overlap,
    with and without activation checkpointing (fast mode: random directional derivatives, a
    few seconds instead of one forward pass per input voxel)."""
    patch = (4, 4, 4)
    network = SlidingWindowNetwork(_predictor(_tiny_network(patch, torch.float64), patch=patch))
    x = _volumes((3, 7, 4), dtype=torch.float64).requires_grad_(True)  # padded in D, 3 tiles in H
    assert len(network.tile_slices(network.pad(x)[0].shape[2:])) == 3
    assert torch.autograd.gradcheck(network, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    network.checkpoint_tiles = True
    assert torch.autograd.gradcheck(network, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


# ------------------------------------------------------------------ activation checkpointing

@pytest.mark.parametrize("tiles_per_pass", [None, 2])
def test_checkpointed_tiles_give_the_plain_gradients(tiles_per_pass):
    """checkpoint_tiles: the same logits and the same gradients w.r.t. the input and the
    weights, and the network really runs again in the backward pass (each call once more)."""
    counting = CountingNetwork(_tiny_network())
    predictor = _predictor(counting)
    x = _volumes((12, 24, 20))
    results = {}
    for checkpointed in (False, True):
        network = SlidingWindowNetwork(predictor, tiles_per_pass=tiles_per_pass,
                                       checkpoint_tiles=checkpointed)
        network.zero_grad()
        counting.calls = 0
        xi = x.clone().requires_grad_(True)
        logits = network(xi)
        forward_calls = counting.calls
        (logits[:, 1].sum() - logits[:, 2].square().mean()).backward()
        results[checkpointed] = (logits.detach(), xi.grad,
                                 # Deep supervision off: the lower seg_layers get no gradient.
                                 [None if p.grad is None else p.grad.clone()
                                  for p in counting.parameters()],
                                 forward_calls, counting.calls)
    plain, checkpointed = results[False], results[True]
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-6, atol=1e-7)
    assert [g is None for g in checkpointed[2]] == [g is None for g in plain[2]]
    assert sum(g is not None for g in plain[2]) > 10
    for grad, expected in zip(checkpointed[2], plain[2]):
        if expected is not None:
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    calls = 8 * (1 if tiles_per_pass is None else 4)  # 8 mirrorings per pass of tiles
    assert plain[3:] == (calls, calls)
    assert checkpointed[3:] == (calls, 2 * calls)


def test_checkpointing_is_off_without_gradients():
    counting = CountingNetwork(_tiny_network())
    network = SlidingWindowNetwork(_predictor(counting), checkpoint_tiles=True)
    with mock.patch("nnunet_ima.evaluation.predictor_path.checkpoint") as checkpoint:
        with torch.no_grad():
            network(_volumes(PATCH))
        network.predict_like_nnunet(_volumes(PATCH))
    checkpoint.assert_not_called()
    assert counting.calls == 16


# ------------------------------------------------------------------ the whole-volume network

def test_stride_divisor_has_one_entry_per_spatial_axis():
    assert stride_divisor([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]) == (4, 8, 4)
    assert stride_divisor([1, 2, 2], spatial_dims=3) == (4, 4, 4)
    assert stride_divisor([[1, 1], [2, 2], [2, 1]]) == (4, 2)
    assert stride_divisor([1, 2, 2, 2]) == (8, 8)
    with pytest.raises(UserInputError, match="one entry per spatial axis"):
        stride_divisor([[1, 1, 1], [2, 2]])
    with pytest.raises(UserInputError, match="one entry per spatial axis"):
        stride_divisor([[1, 1], [2, 2]], spatial_dims=3)


def test_padded_network_pads_every_axis_at_its_end_and_crops_back():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["input"] = x
            return torch.cat([x, -x], dim=1)

    network = PaddedNetwork(Probe(), (2, 8, 4))
    x = torch.randn(2, 1, 5, 13, 8, requires_grad=True)
    out = network(x)
    assert seen["input"].shape == (2, 1, 6, 16, 8)
    assert torch.equal(seen["input"][:, :, :5, :13, :8], x)
    padding = torch.ones_like(seen["input"], dtype=torch.bool)
    padding[:, :, :5, :13, :8] = False
    assert seen["input"][padding].abs().sum() == 0
    assert out.shape == (2, 2, 5, 13, 8)
    assert torch.equal(out, torch.cat([x, -x], dim=1))
    out.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="3 spatial axes"):
        network(torch.zeros(1, 1, 16, 16))


def test_padded_network_runs_a_3d_unet_on_any_volume_size():
    tiny = _tiny_network()
    network = PaddedNetwork(tiny, stride_divisor(_arch_kwargs()["strides"]))
    assert network.divisor == (4, 4, 4)
    x = _volumes((6, 10, 13))
    with torch.no_grad():
        expected = tiny(F.pad(x, (0, 3, 0, 2, 0, 2)))[..., :6, :10, :13]
        logits = network(x)
    assert logits.shape == (1, 3, 6, 10, 13)
    assert torch.equal(logits, expected)


# ------------------------------------------------------------------ loading a 3D model folder

def _model_folder(root, configuration="3d_fullres", patch=PATCH, mirror_axes=ALL_AXES) -> str:
    """A model folder as nnUNetv2_train writes it, with the tiny network's weights as
    checkpoint_final.pth of fold 0 (trainer nnUNetTrainer)."""
    folder = os.path.join(str(root), f"nnUNetTrainer__nnUNetPlans__{configuration}")
    os.makedirs(os.path.join(folder, "fold_0"))
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(_plans(patch, configuration), f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(DATASET_JSON, f)
    torch.save({"network_weights": _tiny_network(patch).state_dict(),
                "trainer_name": "nnUNetTrainer", "init_args": {"configuration": configuration},
                "inference_allowed_mirroring_axes": mirror_axes},
               os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    return folder


def test_both_paths_load_a_3d_model_folder(tmp_path):
    folder = _model_folder(tmp_path)
    cpu = torch.device("cpu")
    whole = load_model(folder, 0, "final", cpu)
    assert whole.spatial_dims == 3 and whole.num_classes == 3
    assert whole.configuration == "3d_fullres" and whole.network.divisor == (4, 4, 4)
    tiled = load_predictor_model(folder, 0, "final", cpu, tiles_per_pass=2,
                                 checkpoint_tiles=True)
    assert isinstance(tiled, PredictorPathModel) and tiled.spatial_dims == 3
    assert tiled.network.mirror_axes == ALL_AXES and tiled.network.checkpoint_tiles
    assert tiled.network.tiles_per_pass == 2
    assert tiled.checkpoint_sha256 == whole.checkpoint_sha256
    # One patch-sized volume is one tile: without mirroring both paths are the same network.
    x = _volumes(PATCH)
    plain = load_predictor_model(folder, 0, "final", cpu, use_mirroring=False)
    with torch.no_grad():
        torch.testing.assert_close(plain.network(x), whole.network(x), rtol=1e-5, atol=1e-5)
    labels = segmentation(tiled, x)
    assert labels.shape == (1, *PATCH)


def test_3d_lowres_loads_and_a_cascade_stage_is_refused(tmp_path):
    cpu = torch.device("cpu")
    lowres = _model_folder(tmp_path / "a", "3d_lowres")
    assert load_model(lowres, 0, "final", cpu).spatial_dims == 3
    assert load_predictor_model(lowres, 0, "final", cpu).spatial_dims == 3
    cascade = _model_folder(tmp_path / "b", "3d_cascade_fullres")
    with open(os.path.join(cascade, "plans.json")) as f:
        plans = json.load(f)
    plans["configurations"]["3d_cascade_fullres"]["previous_stage"] = "3d_lowres"
    with open(os.path.join(cascade, "plans.json"), "w") as f:
        json.dump(plans, f)
    for loader in (load_model, load_predictor_model):
        with pytest.raises(UserInputError, match="cascade stage .* -c 3d_fullres"):
            loader(cascade, 0, "final", cpu)


def test_wrong_input_shapes_are_refused():
    network = SlidingWindowNetwork(_predictor(_tiny_network()))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) volumes"):
        network(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) volumes"):
        network.segment(torch.zeros(2, 16, 16, 16))


# ------------------------------------------------------------------ benchmarks/eval_3d_memory.py

def test_the_memory_benchmark_builds_hearts_plan_and_its_variants_agree():
    from argparse import Namespace
    from benchmark_scripts import load_benchmark_script
    bench = load_benchmark_script("eval_3d_memory")
    # nnU-Net's MSD Heart 3d_fullres network accepts its patch: total stride 8 x 32 x 32.
    assert bench.total_stride(bench.HEART_FEATURES) == (8, 32, 32)
    assert all(p % s == 0 for p, s in zip(bench.HEART_PATCH, (8, 32, 32)))
    args = Namespace(device="cpu", volume=(6, 12, 12), patch=(4, 8, 8), features=[4, 8],
                     classes=2, mirror_axes=[0, 1, 2], step_size=0.5, tiles_per_pass=1,
                     repeats=1, warmup=0, threads=1)
    plain = bench.run_variant(Namespace(**vars(args), child="plain"))
    checkpointed = bench.run_variant(Namespace(**vars(args), child="checkpointed"))
    assert plain["tiles"] == 8 and plain["passes"] == 8
    assert plain["grad_norm"] > 0
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    assert checkpointed["grad_sum"] == pytest.approx(plain["grad_sum"], rel=1e-5, abs=1e-6)
