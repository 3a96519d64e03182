"""The deployed inference path of a 2D or 3D nnU-Net model as an attackable network.

``nnUNetv2_predict`` does not run the network on a whole slice (2D) or volume (3D): it pads the
input to at least
the patch size (``pad_nd_image``), cuts it into overlapping patch-sized tiles at the steps of
``compute_steps_for_sliding_window`` (``tile_step_size``, 0.5 by default), runs every tile
through the network and, with test-time augmentation (the default, off with ``--disable_tta``),
through its mirrored copies along the checkpoint's ``inference_allowed_mirroring_axes``,
averaged; weights each tile's logits by a Gaussian (``compute_gaussian``), accumulates them,
divides by the accumulated weights and crops the padding. :class:`SlidingWindowNetwork` computes
that function of the slice or volume

* differentiably in fp32 (:meth:`SlidingWindowNetwork.forward`), for the attack's gradients, and
* exactly as nnU-Net does (:meth:`SlidingWindowNetwork.predict_like_nnunet`,
  :meth:`SlidingWindowNetwork.segment`), for scoring: nnU-Net accumulates the weighted logits and
  the weights in float16, so its argmax can differ from the fp32 one where two classes are close.

nnU-Net's predictor methods run under ``@torch.inference_mode()`` and cannot be differentiated;
the fp32 path reuses every helper of nnU-Net that autograd can run through (``pad_nd_image``,
the predictor's tile slicers built on ``compute_steps_for_sliding_window``, ``compute_gaussian``,
the predictor's configuration, label manager and mirroring axes) and writes only the mirroring
average and the accumulation again. The exact path *is* nnU-Net's: it calls the predictor's
``predict_logits_from_preprocessed_data``, the call ``nnUNetv2_predict`` makes for each case.

A 3D volume at a ``3d_fullres`` patch holds many large tiles whose activations the backward
pass needs; ``checkpoint_tiles`` (activation checkpointing) keeps only each network call's
input and recomputes its activations during the backward pass, trading a second forward pass
for memory.

:func:`load_predictor_model` returns a :class:`~nnunet_ima.evaluation.models.LoadedModel` whose
``network`` is a :class:`SlidingWindowNetwork`; :func:`segmentation` is the argmax the evaluator
should score with (nnU-Net's exact one for such a model, the network's argmax otherwise).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.paths import trainer_dir

from nnunet_ima.evaluation.models import (CHECKPOINTS, LoadedModel, check_configuration,
                                          checked_model_folder, checkpoint_choice,
                                          configuration_of, fold_number)
from nnunet_ima.evaluation.provenance import check_unchanged, checkpoint_identity

# nnU-Net's Gaussian for tile weights (_internal_predict_sliding_window_return_logits).
GAUSSIAN_SIGMA_SCALE = 1. / 8
GAUSSIAN_VALUE_SCALING = 10

# The spatial slices of one tile: (H, W) in 2D, (D, H, W) in 3D.
TileSlices = Tuple[slice, ...]


class SlidingWindowNetwork(nn.Module):
    """nnU-Net's sliding-window prediction of whole 2D slices, ``(B, C, H, W) -> (B, K, H, W)``,
    or of whole 3D volumes, ``(B, C, D, H, W) -> (B, K, D, H, W)``, by the configuration's patch
    size (2 or 3 entries: :attr:`spatial_dims`).

    Every setting is read from ``predictor`` (an initialised ``nnUNetPredictor`` with one set of
    weights) when the network is called, so that both paths always follow it:
    ``configuration_manager.patch_size``, ``tile_step_size``, ``use_gaussian``,
    ``use_mirroring`` and ``allowed_mirroring_axes``, ``label_manager.num_segmentation_heads``
    (``K``). The tile network is ``predictor.network`` itself (registered here as ``network``,
    so ``.eval()`` and ``.to()`` reach it).

    The spatial size is the preprocessed one, any size: an input smaller than the patch is
    padded as nnU-Net pads it and the logits are cropped back.

    Args:
        predictor: the initialised ``nnUNetPredictor``.
        tiles_per_pass: at most this many tiles of the batch (each ``B`` patches) go through the
            network in one call, to bound memory; ``None``: all tiles of the batch at once. With
            ``checkpoint_tiles`` the peak memory of a backward pass is about that of one such
            call, so a 3D volume wants a small number here (1 for a ``3d_fullres`` patch).
        checkpoint_tiles: activation checkpointing (``torch.utils.checkpoint``, non-reentrant)
            of every network call of the differentiable path, when gradients are recorded: the
            forward pass keeps only each call's input patches, the backward pass recomputes the
            call's activations. Same logits and gradients, about one more forward pass of time,
            and the activations of only one call alive at a time instead of those of every tile
            and mirrored pass of the input (what lets a Heart-size ``3d_fullres`` volume be
            attacked in one GPU). No effect on :meth:`predict_like_nnunet` / :meth:`segment` or
            under ``torch.no_grad()``. An attribute: it can be changed after construction.
    """

    def __init__(self, predictor, tiles_per_pass: Optional[int] = None,
                 checkpoint_tiles: bool = False):
        super().__init__()
        if predictor.network is None or predictor.configuration_manager is None:
            raise ValueError("the nnUNetPredictor is not initialised (initialize_from_trained_"
                             "model_folder or manual_initialization first)")
        if len(predictor.configuration_manager.patch_size) not in (2, 3):
            raise ValueError(f"a 2D or 3D configuration is needed, the predictor's patch size is "
                             f"{list(predictor.configuration_manager.patch_size)}")
        parameters = predictor.list_of_parameters
        if parameters is None or len(parameters) != 1:
            # The exact path runs predict_logits_from_preprocessed_data, which loads each set in
            # turn into the one network and averages; the fp32 path has a single network.
            raise ValueError(f"the predictor must hold exactly one set of weights (one fold), it "
                             f"holds {0 if parameters is None else len(parameters)}")
        if tiles_per_pass is not None and tiles_per_pass < 1:
            raise ValueError(f"tiles_per_pass must be >= 1 or None, got {tiles_per_pass}")
        self.predictor = predictor
        self.network = predictor.network
        self.tiles_per_pass = tiles_per_pass
        self.checkpoint_tiles = bool(checkpoint_tiles)
        # (padded size, patch size, tile step, use_gaussian, device) -> (tile weight, sum of weights)
        self._weights: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    # -- geometry, all of it nnU-Net's ------------------------------------------------------

    @property
    def patch_size(self) -> Tuple[int, ...]:
        """``(ph, pw)`` or ``(pd, ph, pw)``."""
        return tuple(int(p) for p in self.predictor.configuration_manager.patch_size)

    @property
    def spatial_dims(self) -> int:
        """2 (inputs ``(B, C, H, W)``) or 3 (inputs ``(B, C, D, H, W)``)."""
        return len(self.patch_size)

    @property
    def num_classes(self) -> int:
        """``K``, background included."""
        return int(self.predictor.label_manager.num_segmentation_heads)

    @property
    def mirror_axes(self) -> Optional[Tuple[int, ...]]:
        """The spatial axes mirrored at test time (2D: 0 is H, 1 is W; 3D: 0 is D, 1 is H, 2 is
        W), ``None`` without mirroring."""
        if not self.predictor.use_mirroring or self.predictor.allowed_mirroring_axes is None:
            return None
        return tuple(int(a) for a in self.predictor.allowed_mirroring_axes)

    def pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, TileSlices]:
        """``x`` ``(B, C, *spatial)`` zero-padded to at least the patch size, centred, with
        nnU-Net's ``pad_nd_image`` (``F.pad`` for tensors: differentiable); and the spatial
        slices that crop the padding off again."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        # The arguments of predict_sliding_window_return_logits; new_shape has the spatial
        # entries only, so B and C are left alone.
        padded, revert = pad_nd_image(x, self.patch_size, "constant", {"value": 0}, True, None)
        return padded, tuple(revert[-self.spatial_dims:])

    def tile_slices(self, padded_size: Sequence[int]) -> List[TileSlices]:
        """The spatial slices of the tiles of a padded input of spatial size ``padded_size``,
        in nnU-Net's order: its own ``_internal_get_sliding_window_slicers``, for a one-slice
        volume in 2D, for the volume in 3D."""
        if self.spatial_dims == 2:
            slicers = self.predictor._internal_get_sliding_window_slicers((1, *padded_size))
            # Each is (slice(None) for channels, slice index 0, H slice, W slice).
            return [tuple(s[2:]) for s in slicers]
        slicers = self.predictor._internal_get_sliding_window_slicers(tuple(padded_size))
        # Each is (slice(None) for channels, D slice, H slice, W slice).
        return [tuple(s[1:]) for s in slicers]

    def tile_weights(self, padded_size: Sequence[int], device: torch.device
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The weight of one tile (patch-sized) and the sum of the weights over all tiles
        (``padded_size``), fp32, constant (no autograd).

        The tile weight is nnU-Net's float16 Gaussian widened to fp32, so both paths weight by
        the same numbers; only the accumulation precision differs. Without ``use_gaussian``
        nnU-Net weights every tile by 1.
        """
        device = torch.device(device)
        key = (tuple(int(s) for s in padded_size), self.patch_size,
               float(self.predictor.tile_step_size), bool(self.predictor.use_gaussian), str(device))
        if key not in self._weights:
            from nnunetv2.inference.sliding_window_prediction import compute_gaussian
            if self.predictor.use_gaussian:
                # compute_gaussian is cached by nnU-Net (lru_cache); .float() copies, so the
                # shared tensor is never modified.
                weight = compute_gaussian(self.patch_size, sigma_scale=GAUSSIAN_SIGMA_SCALE,
                                          value_scaling_factor=GAUSSIAN_VALUE_SCALING,
                                          device=device).float()
            else:
                weight = torch.ones(self.patch_size, dtype=torch.float32, device=device)
            total = torch.zeros(tuple(int(s) for s in padded_size), dtype=torch.float32,
                                device=device)
            for tile in self.tile_slices(padded_size):
                total[tile] += weight
            self._weights[key] = (weight, total)
        return self._weights[key]

    # -- the differentiable fp32 path --------------------------------------------------------

    def tile_network(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C, *patch) -> (N, K, *patch)``: one call of the tile network, under activation
        checkpointing where :attr:`checkpoint_tiles` asks for it and gradients are recorded."""
        if self.checkpoint_tiles and torch.is_grad_enabled():
            # Non-reentrant: gradients reach the parameters and the input whether or not the
            # input requires them, and the recomputation is triggered by autograd itself.
            return checkpoint(self.network, patches, use_reentrant=False)
        return self.network(patches)

    def mirrored_average(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C, *patch) -> (N, K, *patch)``: the network's logits averaged over the mirrored
        passes, in the order and arithmetic of nnU-Net's ``_internal_maybe_mirror_and_predict``
        (written again because that method runs under ``inference_mode``): the plain pass,
        plus each non-empty combination of the mirror axes (flip, predict, flip back), divided by
        the number of passes (up to 4 in 2D, up to 8 in 3D)."""
        prediction = self.tile_network(patches)
        mirror_axes = self.mirror_axes
        if mirror_axes is None:
            return prediction
        if max(mirror_axes) > patches.ndim - 3:
            raise ValueError(f"mirror axes {mirror_axes} do not fit {patches.ndim - 2}D patches "
                             f"{tuple(patches.shape)}")
        axes = [a + 2 for a in mirror_axes]
        combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for flip in combinations:
            prediction = prediction + torch.flip(self.tile_network(torch.flip(patches, flip)), flip)
        return prediction / (len(combinations) + 1)

    def check_input(self, x: torch.Tensor) -> None:
        """A ``ValueError`` unless ``x`` is ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D)."""
        if x.ndim != self.spatial_dims + 2:
            expected = ("(B, C, H, W) slices" if self.spatial_dims == 2
                        else "(B, C, D, H, W) volumes")
            raise ValueError(f"expected {expected} for patch size {list(self.patch_size)}, got "
                             f"shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 sliding-window logits, differentiable w.r.t. ``x``.

        Args:
            x: ``(B, C, *spatial)`` float32 preprocessed slices ``(H, W)`` or volumes
                ``(D, H, W)``, on the network's device.

        Returns:
            ``(B, K, *spatial)`` float32: ``sum_t G * avg_mirrors(net(tile_t)) / sum_t G`` over
            the tiles ``t`` of the padded input, cropped to ``spatial``. The tiles of all ``B``
            inputs go through the network together (``tiles_per_pass`` tiles at a time).
        """
        self.check_input(x)
        batch = x.shape[0]
        padded, revert = self.pad(x)
        padded_size = padded.shape[2:]
        tiles = self.tile_slices(padded_size)
        weight, total = self.tile_weights(padded_size, x.device)
        logits = padded.new_zeros((batch, self.num_classes, *padded_size))
        per_pass = len(tiles) if self.tiles_per_pass is None else self.tiles_per_pass
        for start in range(0, len(tiles), per_pass):
            chunk = tiles[start:start + per_pass]
            # (len(chunk) * B, C, *patch), tile-major.
            patches = torch.cat([padded[(slice(None), slice(None), *tile)] for tile in chunk])
            weighted = self.mirrored_average(patches) * weight
            for i, tile in enumerate(chunk):
                # In place on a fresh tensor: autograd records it (CopySlices), and the
                # overlapping tiles add up without a (B, K, *padded) buffer per tile.
                logits[(slice(None), slice(None), *tile)] += weighted[i * batch:(i + 1) * batch]
        logits = logits / total
        return logits[(slice(None), slice(None), *revert)]

    # -- nnU-Net's exact arithmetic, for scoring ---------------------------------------------

    @torch.no_grad()
    def _predict_volume(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (K, B, H, W)`` float16 CPU logits of 2D slices, from nnU-Net's own
        call."""
        if x.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) slices, got shape {tuple(x.shape)}")
        # A 2D configuration's case is (C, D, H, W) with the slices on axis 1; nnU-Net predicts
        # each slice on its own (its tiles index one slice and accumulate into that slice only),
        # so a batch of slices stacked this way gets the logits each gets in its own case.
        volume = x.detach().permute(1, 0, 2, 3).contiguous()
        return self.predictor.predict_logits_from_preprocessed_data(volume)

    @torch.no_grad()
    def _predict_volumes(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(B, C, D, H, W)`` -> ``B`` float16 CPU logits ``(K, D, H, W)`` of 3D volumes, one
        ``predict_logits_from_preprocessed_data`` call per volume, as ``nnUNetv2_predict``
        predicts each case."""
        self.check_input(x)
        return [self.predictor.predict_logits_from_preprocessed_data(volume.detach().contiguous())
                for volume in x]

    def predict_like_nnunet(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's logits, bit for bit: tiles one at a time, float16 accumulation, autocast on
        CUDA, its thread setting; no gradients.

        Args:
            x: ``(B, C, *spatial)`` float32 preprocessed slices or volumes.

        Returns:
            ``(B, K, *spatial)`` float16 (nnU-Net's accumulation dtype) on ``x.device``.

        On a CPU the result equals ``nnUNetv2_predict``'s bit for bit. On CUDA the arithmetic is
        the same, but ``nnUNetv2_predict`` lets cuDNN pick convolution algorithms by timing
        (``cudnn.benchmark``), so even two of its own runs need not agree in the last bit.
        """
        if self.spatial_dims == 3:
            # clone() via stack: a normal tensor, not one of inference mode.
            return torch.stack(self._predict_volumes(x)).to(x.device)
        # clone(): a normal tensor, not one of inference mode (those refuse later in-place use).
        return self._predict_volume(x).permute(1, 0, 2, 3).clone().to(x.device)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, *spatial)`` int64 labels: nnU-Net's segmentation of the
        slices or volumes, its logits converted by its label manager
        (``convert_logits_to_segmentation``, the step of ``nnUNetv2_predict``'s export; first
        class on ties), on ``x.device``."""
        convert = self.predictor.label_manager.convert_logits_to_segmentation
        if self.spatial_dims == 3:
            return torch.stack([torch.as_tensor(convert(logits)).long()
                                for logits in self._predict_volumes(x)]).to(x.device)
        labels = convert(self._predict_volume(x))
        return torch.as_tensor(labels).long().clone().to(x.device)


@dataclass
class PredictorPathModel(LoadedModel):
    """A :class:`LoadedModel` whose ``network`` is a :class:`SlidingWindowNetwork`: attacks
    differentiate ``network(x)`` (fp32); :meth:`segment` scores with nnU-Net's exact arithmetic.

    ``tile_step_size`` and ``use_mirroring`` are the inference settings (part of what a resumed
    evaluation must match, like the checkpoint digest).
    """

    tile_step_size: float = 0.5
    use_mirroring: bool = True

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, *spatial)``: see :meth:`SlidingWindowNetwork.segment`."""
        return self.network.segment(x)


def segmentation(model: LoadedModel, x: torch.Tensor,
                 logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The labels the evaluator scores, ``(B, C, *spatial) -> (B, *spatial)`` int64 (spatial:
    ``(H, W)`` of 2D slices or ``(D, H, W)`` of 3D volumes).

    A :class:`PredictorPathModel` segments as ``nnUNetv2_predict`` does (float16 accumulation);
    any other model by the argmax of ``model.network(x)``, as the evaluator does today, taken
    from ``logits`` (``(B, K, *spatial)``) when the caller has them already.
    """
    segment = getattr(model, "segment", None)
    if segment is not None:
        return segment(x)
    if logits is not None:
        return logits.argmax(dim=1)
    with torch.no_grad():
        return model.network(x).argmax(dim=1)


@contextlib.contextmanager
def package_trainers_findable():
    """nnU-Net's predictor finds a model's trainer class by name, outside its own trainers only
    in ``nnUNet_extTrainer``. Unset, it is set to this package's trainers (what ``nnunet-ima
    trainer-dir`` prints) while the block runs, so that models of this package's trainers load
    without the user exporting it; a value the user set is left as it is."""
    before = os.environ.get("nnUNet_extTrainer")
    if before:
        yield
        return
    os.environ["nnUNet_extTrainer"] = trainer_dir()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = before


def load_predictor_network(model_folder: str, fold, checkpoint: str, device: torch.device,
                           use_mirroring: bool = True, tile_step_size: float = 0.5,
                           tiles_per_pass: Optional[int] = None,
                           checkpoint_tiles: bool = False) -> SlidingWindowNetwork:
    """The :class:`SlidingWindowNetwork` of a trained model folder, loaded by nnU-Net's own
    ``nnUNetPredictor.initialize_from_trained_model_folder`` exactly as ``nnUNetv2_predict``
    loads it (so the trainer class must be found: nnU-Net's, or one in ``nnUNet_extTrainer``,
    which is this package's trainers when unset: :func:`package_trainers_findable`).

    Args:
        model_folder: ``.../Trainer__Plans__CONFIGURATION``, a 2D or 3D configuration
            (``2d``, ``3d_lowres``, ``3d_fullres``; not a cascade stage).
        fold: a number or ``"all"``.
        checkpoint: ``final``, ``best``, ``latest`` or the file name (``checkpoint_final.pth``).
        device: where the network runs; on CUDA the results stay there as with
            ``nnUNetv2_predict``'s default (``perform_everything_on_device``), elsewhere they are
            accumulated on the CPU (nnU-Net allows nothing else).
        use_mirroring: test-time mirroring (``nnUNetv2_predict`` without ``--disable_tta``).
        tile_step_size: ``nnUNetv2_predict -step_size``.
        tiles_per_pass, checkpoint_tiles: see :class:`SlidingWindowNetwork`
            (``checkpoint_tiles``: activation checkpointing of the tile network in the
            differentiable path, for 3D volumes that would not fit otherwise).

    Raises:
        UserInputError: a missing folder, plans, checkpoint, a configuration that is neither
            2D nor 3D or a cascade stage, a trainer class nnU-Net cannot find, an unreadable
            checkpoint.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if not 0 < tile_step_size <= 1:
        raise UserInputError(f"the tile step size must be in (0, 1], got {tile_step_size}")
    fold = fold_number(fold)
    configuration = checked_model_folder(model_folder, fold, checkpoint)[1]
    checkpoint = checkpoint_choice(checkpoint)
    device = torch.device(device)
    # nnUNetPredictor sets cudnn.benchmark for CUDA devices; the evaluator chooses its own
    # cuDNN settings (full_precision), so loading must not change them.
    benchmark = torch.backends.cudnn.benchmark
    try:
        # On a CPU it prints that perform_everything_on_device is off, which we ask for anyway.
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                        use_mirroring=use_mirroring,
                                        perform_everything_on_device=device.type == "cuda",
                                        device=device, verbose=False, allow_tqdm=False)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    try:
        with package_trainers_findable():
            predictor.initialize_from_trained_model_folder(model_folder, (fold,),
                                                           CHECKPOINTS[checkpoint])
    except RuntimeError as e:
        if "Could not find requested nnunet trainer" in str(e):
            raise UserInputError(f"nnU-Net cannot find the trainer class of {model_folder}; for "
                                 f"this package's trainers: export nnUNet_extTrainer=$(nnunet-ima "
                                 f"trainer-dir)\n{e}") from None
        raise UserInputError(f"nnU-Net's predictor cannot load {model_folder} fold {fold} "
                             f"({CHECKPOINTS[checkpoint]}): {e}") from None
    except Exception as e:  # a truncated or foreign checkpoint: torch raises many types
        raise UserInputError(f"nnU-Net's predictor cannot load {model_folder} fold {fold} "
                             f"({CHECKPOINTS[checkpoint]}; is the file complete?): "
                             f"{type(e).__name__}: {e}") from None
    # The checkpoint names its configuration, which can differ from the folder's name.
    check_configuration(f"the checkpoint of {model_folder}", configuration,
                        predictor.configuration_manager)
    if predictor.label_manager.has_regions:
        raise UserInputError(f"{model_folder} was trained on regions; only label-based models "
                             f"are supported")
    network = SlidingWindowNetwork(predictor, tiles_per_pass=tiles_per_pass,
                                   checkpoint_tiles=checkpoint_tiles)
    return network.to(device=device, dtype=torch.float32).eval()


def load_predictor_model(model_folder: str, fold, checkpoint: str, device: torch.device,
                         name: Optional[str] = None, use_mirroring: bool = True,
                         tile_step_size: float = 0.5,
                         tiles_per_pass: Optional[int] = None,
                         checkpoint_tiles: bool = False) -> PredictorPathModel:
    """:func:`load_predictor_network` wrapped as the evaluator's model: the same fields as
    :func:`nnunet_ima.evaluation.models.load_model` fills (name, classes, ignore label, plans,
    checkpoint digest, ``spatial_dims``, ...), with ``network`` the sliding-window network
    (``tiles_per_pass``, ``checkpoint_tiles``: see :class:`SlidingWindowNetwork`)."""
    fold = fold_number(fold)
    path = checked_model_folder(model_folder, fold, checkpoint)[0]
    identity = checkpoint_identity(path)
    network = load_predictor_network(model_folder, fold, checkpoint, device,
                                     use_mirroring=use_mirroring, tile_step_size=tile_step_size,
                                     tiles_per_pass=tiles_per_pass,
                                     checkpoint_tiles=checkpoint_tiles)
    check_unchanged(identity, "nnU-Net's predictor")
    predictor = network.predictor
    return PredictorPathModel(
        name=name or predictor.trainer_name or os.path.basename(os.path.normpath(model_folder)),
        folder=model_folder, network=network, num_classes=network.num_classes,
        configuration=configuration_of(model_folder),
        data_identifier=predictor.configuration_manager.data_identifier,
        dataset_name=predictor.plans_manager.dataset_name,
        ignore_label=predictor.label_manager.ignore_label, plans=predictor.plans_manager.plans,
        dataset_json=predictor.dataset_json, checkpoint_path=path,
        checkpoint_sha256=identity["sha256"], fold=fold, checkpoint=identity,
        spatial_dims=network.spatial_dims, tile_step_size=tile_step_size,
        use_mirroring=use_mirroring)
