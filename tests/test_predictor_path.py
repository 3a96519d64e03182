"""The deployed nnU-Net inference path as an attackable network: the sliding-window network
against nnU-Net's own predictor (a random network with a hand-built configuration, fast), and
against nnUNetv2_predict with a really trained model (slow)."""
import json
import os
import shutil
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.attacks import run_attack
from nnunet_ima.evaluation.predictor_path import (PredictorPathModel, SlidingWindowNetwork,
                                                  load_predictor_model, load_predictor_network,
                                                  segmentation)
from nnunet_ima.evaluation.robustness import attack_loss

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = (32, 32)
# 40 x 52 at patch 32, step 0.5: tiles at H 0, 8 and W 0, 10, 20 (6 overlapping tiles);
# 24 x 52 is padded to 32 in H only; 32 x 32 is one tile; 20 x 28 is one padded tile.
SHAPES = [(40, 52), (24, 52), (32, 32), (20, 28)]
DATASET_JSON = {"labels": {"background": 0, "organ": 1, "lesion": 2},
                "channel_names": {"0": "a", "1": "b"}, "file_ending": ".nii.gz"}
FP16_EPS = 2.0 ** -11  # relative rounding of one float16 operation


def _tiny_network(dtype=torch.float32) -> nn.Module:
    """2 channels -> 3 classes; instance norm makes a tile's logits depend on the whole tile,
    as in nnU-Net's networks, and random weights make the mirrored passes differ."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.01),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.01),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.LeakyReLU(0.01),
        nn.Conv2d(8, 3, 3, padding=1)).to(dtype).eval()


def _predictor(network: nn.Module, use_mirroring: bool = True, patch=PATCH,
               tile_step_size: float = 0.5, mirror_axes=(0, 1)):
    """nnU-Net's predictor around ``network`` with a minimal 2D configuration, the way
    nnU-Net's trainer sets one up for its final validation (manual_initialization)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {"dataset_name": "Dataset000_Tiles", "plans_name": "nnUNetPlans",
             "configurations": {"2d": {
                 "patch_size": list(patch), "data_identifier": "nnUNetPlans_2d",
                 "architecture": {"network_class_name": "unused", "arch_kwargs": {},
                                  "_kw_requires_import": []}}}}
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("2d"),
                                    [network.state_dict()], DATASET_JSON, "nnUNetTrainer",
                                    mirror_axes)
    return predictor


def _nnunet_logits(predictor, x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's sliding-window logits of the slices ``x`` ``(B, C, H, W)`` as one case
    ``(C, B, H, W)``, back as ``(B, K, H, W)`` float16."""
    return predictor.predict_sliding_window_return_logits(x.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)


def _slices(shape, batch=3, seed=1) -> torch.Tensor:
    return 2 * torch.randn(batch, 2, *shape, generator=torch.Generator().manual_seed(seed))


def _mirrored_reference(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain network on ``x`` averaged over H, W and both flips."""
    passes = [network(x)] + [torch.flip(network(torch.flip(x, axes)), axes)
                             for axes in ((2,), (3,), (2, 3))]
    return sum(passes) / 4


# ------------------------------------------------------------------ against nnU-Net's predictor

@pytest.mark.parametrize("use_mirroring", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_mode_equals_nnunet_bit_for_bit(shape, use_mirroring):
    predictor = _predictor(_tiny_network(), use_mirroring)
    network = SlidingWindowNetwork(predictor)
    x = _slices(shape)
    expected = _nnunet_logits(predictor, x)
    logits = network.predict_like_nnunet(x)
    assert logits.shape == (3, 3, *shape) and logits.dtype == torch.float16
    assert torch.equal(logits, expected)
    # Each slice alone (its own case) gets the same bits: slices do not interact.
    assert torch.equal(network.predict_like_nnunet(x[1:2]), expected[1:2])
    labels = network.segment(x)
    assert labels.shape == (3, *shape)
    assert int((labels != expected.argmax(dim=1)).sum()) == 0


@pytest.mark.parametrize("use_mirroring", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_mode_is_nnunets_computation_with_fp32_accumulators(shape, use_mirroring):
    """nnU-Net's own code with its float16 accumulators made float32 (its only torch.half
    use): the fp32 path then agrees to fp32 rounding, so the algorithm (padding, tiles, order
    of the mirrored passes, Gaussian, division, crop) is nnU-Net's."""
    predictor = _predictor(_tiny_network(), use_mirroring)
    network = SlidingWindowNetwork(predictor)
    x = _slices(shape)
    with mock.patch.object(torch, "half", torch.float32):
        expected = _nnunet_logits(predictor, x)
    assert expected.dtype == torch.float32
    logits = network(x)
    assert logits.shape == (3, 3, *shape) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_mirroring", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_mode_differs_from_nnunet_by_its_float16_rounding_only(shape, use_mirroring):
    """Where the accumulated Gaussian weight is a normal float16 number, nnU-Net's logits are
    the fp32 ones up to float16 rounding of each accumulation and of the division. Where it is
    subnormal (corners far from every tile centre) nnU-Net's own logits are coarse: the exact
    mode exists for those pixels."""
    predictor = _predictor(_tiny_network(), use_mirroring)
    network = SlidingWindowNetwork(predictor)
    x = _slices(shape)
    expected = _nnunet_logits(predictor, x).float()
    with torch.no_grad():
        logits = network(x)
    padded, revert = network.pad(x)
    tiles = network.tile_slices(padded.shape[-2:])
    _, total_weight = network.tile_weights(padded.shape[-2:], x.device)
    well_weighted = total_weight[revert] >= 1e-2
    difference = (logits - expected).abs().amax(dim=(0, 1))
    bound = FP16_EPS * (len(tiles) + 1) * float(expected.abs().max())
    assert float(difference[well_weighted].max()) <= bound
    assert float(difference.max()) < 0.2 * float(expected.abs().max())


def test_tiles_are_nnunets_steps():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    network = SlidingWindowNetwork(_predictor(_tiny_network()))
    steps = compute_steps_for_sliding_window((40, 52), PATCH, 0.5)
    assert steps == [[0, 8], [0, 10, 20]]
    assert network.tile_slices((40, 52)) == [(slice(h, h + 32), slice(w, w + 32))
                                             for h in steps[0] for w in steps[1]]


def test_a_one_tile_slice_is_the_plain_network_with_mirroring():
    tiny = _tiny_network()
    x = _slices(PATCH)
    with torch.no_grad():
        plain = tiny(x)
        mirrored = _mirrored_reference(tiny, x)
        without = SlidingWindowNetwork(_predictor(tiny, use_mirroring=False))(x)
        with_mirroring = SlidingWindowNetwork(_predictor(tiny, use_mirroring=True))(x)
    torch.testing.assert_close(without, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_mirroring, mirrored, rtol=1e-5, atol=1e-6)
    # A slice smaller than the patch: padded centred with zeros (20 -> 32: 6 above, 6 below;
    # 28 -> 32: 2 left, 2 right), the padding cropped off the logits.
    small = _slices((20, 28))
    with torch.no_grad():
        expected = _mirrored_reference(tiny, F.pad(small, (2, 2, 6, 6)))[..., 6:26, 2:30]
        logits = SlidingWindowNetwork(_predictor(tiny, use_mirroring=True))(small)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_mirroring_follows_the_checkpoint_axes():
    tiny = _tiny_network()
    x = _slices(PATCH)
    network = SlidingWindowNetwork(_predictor(tiny, mirror_axes=(1,)))
    assert network.mirror_axes == (1,)
    with torch.no_grad():
        expected = (tiny(x) + torch.flip(tiny(torch.flip(x, (3,))), (3,))) / 2
        torch.testing.assert_close(network(x), expected, rtol=1e-5, atol=1e-6)
    assert SlidingWindowNetwork(_predictor(tiny, mirror_axes=None)).mirror_axes is None


def test_tiles_per_pass_changes_memory_not_the_result():
    predictor = _predictor(_tiny_network())
    x = _slices((40, 52))
    with torch.no_grad():
        together = SlidingWindowNetwork(predictor)(x)
        two_at_a_time = SlidingWindowNetwork(predictor, tiles_per_pass=2)(x)
    torch.testing.assert_close(two_at_a_time, together, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tiles_per_pass"):
        SlidingWindowNetwork(predictor, tiles_per_pass=0)


def test_gradients_flow_to_every_pixel_and_are_finite():
    network = SlidingWindowNetwork(_predictor(_tiny_network()))
    x = _slices((40, 52)).requires_grad_(True)
    network(x)[:, 1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Corners are covered by one tile each, the centre by several: all reach the input.
    assert (x.grad.abs().sum(dim=1) > 0).float().mean() > 0.99
    assert all(float(x.grad[:, :, h, w].abs().sum()) > 0 for h in (0, -1) for w in (0, -1))


def test_the_gradient_is_the_derivative_of_the_sliding_window_function():
    """gradcheck in float64 through padding, tiles, mirroring, weights and overlap."""
    network = SlidingWindowNetwork(_predictor(_tiny_network(torch.float64), patch=(8, 8)))
    x = torch.randn(1, 2, 6, 14, dtype=torch.float64, requires_grad=True)  # padded in H, 3 tiles in W
    assert len(network.tile_slices(network.pad(x)[0].shape[-2:])) == 3
    assert torch.autograd.gradcheck(network, (x,), eps=1e-6, atol=1e-5)


def test_the_evaluators_attack_runs_on_the_sliding_window_network():
    predictor = _predictor(_tiny_network())
    network = SlidingWindowNetwork(predictor)
    x = _slices((40, 52), batch=2)
    with torch.no_grad():
        y = network(x).argmax(dim=1, keepdim=True)
    eps = torch.full((2,), 2.0)
    adv = run_attack("pgd", network, x, y, eps, None, norm="l2", steps=3, alpha=5.0,
                     loss=attack_loss("dc_ce", None))
    assert adv.shape == x.shape and not torch.equal(adv, x)
    assert torch.linalg.vector_norm((adv - x).flatten(1), dim=1).max() <= 2.0 + 1e-4
    model = SimpleNamespace(network=network, segment=network.segment)
    clean, attacked = segmentation(model, x), segmentation(model, adv)
    assert torch.equal(clean, _nnunet_logits(predictor, x).argmax(dim=1))
    assert (attacked != clean).any()
    # A model without segment(): the argmax of its network, as the evaluator scores today.
    plain = SimpleNamespace(network=network)
    with torch.no_grad():
        assert torch.equal(segmentation(plain, x), network(x).argmax(dim=1))


def test_a_predictor_with_several_folds_is_refused():
    predictor = _predictor(_tiny_network())
    predictor.list_of_parameters = predictor.list_of_parameters * 2
    with pytest.raises(ValueError, match="one set of weights"):
        SlidingWindowNetwork(predictor)


# ---------------------------------------------------------------- loading and its errors

def _fake_model_folder(root, configuration: str, patch) -> str:
    folder = os.path.join(str(root), f"nnUNetTrainer__nnUNetPlans__{configuration}")
    os.makedirs(os.path.join(folder, "fold_0"))
    plans = {"dataset_name": "Dataset000_Tiles", "plans_name": "nnUNetPlans",
             "configurations": {configuration: {
                 "patch_size": list(patch), "data_identifier": f"nnUNetPlans_{configuration}",
                 "architecture": {"network_class_name": "unused", "arch_kwargs": {},
                                  "_kw_requires_import": []}}}}
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(DATASET_JSON, f)
    return folder


def test_loading_errors_are_user_input_errors(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(UserInputError, match="does not exist"):
        load_predictor_network(str(tmp_path / "absent"), 0, "final", cpu)
    folder = _fake_model_folder(tmp_path, "2d", PATCH)
    with pytest.raises(UserInputError, match="checkpoint_final.pth does not exist"):
        load_predictor_network(folder, 0, "final", cpu)
    with pytest.raises(UserInputError, match="fold_3 does not exist"):
        load_predictor_network(folder, 3, "final", cpu)
    with pytest.raises(UserInputError, match="a checkpoint is one of"):
        load_predictor_network(folder, 0, "newest", cpu)
    with open(os.path.join(folder, "fold_0", "checkpoint_final.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserInputError, match="is the file complete"):
        load_predictor_network(folder, 0, "checkpoint_final.pth", cpu)
    # A 3D configuration is attacked too (tests/test_predictor_path_3d.py); a 1D patch or a
    # cascade stage is refused before the checkpoint is read.
    folder_1d = _fake_model_folder(tmp_path, "1d", (32,))
    with open(os.path.join(folder_1d, "fold_0", "checkpoint_final.pth"), "wb") as f:
        f.write(b"never read")
    with pytest.raises(UserInputError, match="attacks 2D and 3D configurations"):
        load_predictor_network(folder_1d, 0, "final", cpu)


# ------------------------------------------------------- a really trained model (slow tier)

def _test_cases(ws):
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "test_cases.json")) as f:
        return json.load(f)["test"]


def _preprocessed_case(ws, data_identifier, case):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = os.path.join(ws.preprocessed, ws.dataset_name, data_identifier)
    data, _, _, properties = infer_dataset_class(folder)(folder, [case]).load_case(case)
    return np.asarray(data, dtype=np.float32), properties


def _batched(samples, size=4):
    for start in range(0, len(samples), size):
        part = samples[start:start + size]
        yield part, torch.from_numpy(np.stack([s.image for s in part]))


def test_predictor_path_segments_preprocessed_slices_as_nnunet(nnunet_workspace,
                                                               trained_clean_model):
    """No noise: the exact mode's segmentation of the evaluator's slices is, pixel for pixel,
    the argmax of nnU-Net's predict_logits_from_preprocessed_data on the whole case."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_ima.evaluation.samples import load_preprocessed_slices

    ws = nnunet_workspace
    model = load_predictor_model(trained_clean_model, 0, "final", torch.device("cpu"))
    assert isinstance(model, PredictorPathModel) and isinstance(model.network, SlidingWindowNetwork)
    assert model.network.mirror_axes == (0, 1) and model.num_classes == 3
    reference = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    reference.initialize_from_trained_model_folder(trained_clean_model, (0,), "checkpoint_final.pth")
    cases = _test_cases(ws)
    samples = load_preprocessed_slices(os.path.join(ws.preprocessed, ws.dataset_name),
                                       model.data_identifier, cases, include_empty=True)
    differing, largest_difference, pixels = 0, 0.0, 0
    for case in cases:
        data, _ = _preprocessed_case(ws, model.data_identifier, case)
        logits = reference.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        expected = logits.argmax(dim=0)  # (D, H, W)
        of_case = [s for s in samples if s.case == case]
        assert [s.index for s in of_case] == list(range(data.shape[1]))
        for part, x in _batched(of_case):
            index = [s.index for s in part]
            labels = segmentation(model, x)
            differing += int((labels != expected[index]).sum())
            pixels += labels.numel()
            assert torch.equal(model.network.predict_like_nnunet(x), logits[:, index].transpose(0, 1))
            with torch.no_grad():
                fp32 = model.network(x)
            largest_difference = max(largest_difference,
                                     float((fp32 - logits[:, index].transpose(0, 1).float()).abs().max()))
    print(f"\nexact mode: {differing} of {pixels} pixels differ; fp32 mode max |diff| "
          f"{largest_difference:.3g}")
    assert differing == 0
    assert largest_difference < 0.05


def test_a_tiled_trained_network_is_nnunets_bit_for_bit(trained_clean_model):
    """The trained network with a patch smaller than its slices (tiles overlap) under a
    hand-set configuration: exact mode equals nnU-Net's sliding window."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = load_predictor_model(trained_clean_model, 0, "final", torch.device("cpu"))
    plans = json.loads(json.dumps(model.plans))
    configuration = plans["configurations"][model.configuration]
    strides = np.prod(np.array(configuration["architecture"]["arch_kwargs"]["strides"]), axis=0)
    patch = [int(s) * max(1, 32 // int(s)) for s in strides]  # 32 or the next stride multiple
    configuration["patch_size"] = patch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    source = model.network.predictor
    predictor.manual_initialization(source.network, plans_manager,
                                    plans_manager.get_configuration(model.configuration),
                                    source.list_of_parameters, source.dataset_json,
                                    source.trainer_name, source.allowed_mirroring_axes)
    network = SlidingWindowNetwork(predictor)
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    assert len(network.tile_slices((48, 48))) > 1
    expected = _nnunet_logits(predictor, x)
    assert torch.equal(network.predict_like_nnunet(x), expected)
    assert torch.equal(network.segment(x), expected.argmax(dim=1))


def test_predictor_path_segments_as_the_files_of_nnunetv2_predict(nnunet_workspace,
                                                                  trained_clean_model, tmp_path):
    """nnUNetv2_predict (mirroring on, its default) on the raw test images writes, slice for
    slice, the exact mode's segmentation of the preprocessed slices. This holds because the
    synthetic data's preprocessing changes no geometry (checked first): spacing 1 in plane, no
    cropping, no transpose."""
    import SimpleITK as sitk
    from conftest import _bin
    from nnunet_ima.evaluation.samples import load_preprocessed_slices

    ws = nnunet_workspace
    model = load_predictor_model(trained_clean_model, 0, "final", torch.device("cpu"))
    cases = _test_cases(ws)
    images, out = tmp_path / "imagesTs", tmp_path / "predicted"
    images.mkdir()
    raw = os.path.join(ws.raw, ws.dataset_name, "imagesTr")
    for case in cases:
        shutil.copy(os.path.join(raw, f"{case}_0000.nii.gz"), images)
    ws.run([_bin("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(ws.dataset_id),
            "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean", "-chk", "checkpoint_final.pth",
            "-npp", "0", "-nps", "0", "-device", "cpu"])
    assert model.plans["transpose_forward"] == [0, 1, 2]
    samples = load_preprocessed_slices(os.path.join(ws.preprocessed, ws.dataset_name),
                                       model.data_identifier, cases, include_empty=True)
    differing = 0
    for case in cases:
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        raw_shape = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, f"{case}_0000.nii.gz"))).shape
        data, properties = _preprocessed_case(ws, model.data_identifier, case)
        assert written.shape == raw_shape == data.shape[1:]
        assert list(properties["shape_before_cropping"]) == list(raw_shape)
        assert list(properties["shape_after_cropping_and_before_resampling"]) == list(raw_shape)
        for part, x in _batched([s for s in samples if s.case == case]):
            labels = segmentation(model, x).numpy()
            differing += int((labels != written[[s.index for s in part]]).sum())
    assert differing == 0
