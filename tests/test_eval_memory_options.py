"""The evaluator's memory options for 3D volumes: --tiles-per-pass and --gradient-checkpointing
reach nnU-Net's predictor path, are recorded in the run's configuration only when set (folders
written before them resume), and bad values are refused with the option's name."""
import pytest

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation import run as run_module
from nnunet_ima.evaluation.cli import build_parser, options_from_args
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.run_config import run_config


def _options(tmp_path, *extra):
    args = build_parser().parse_args(["-m", str(tmp_path / "model"), "-o", str(tmp_path / "out"),
                                      "--device", "cpu", *extra])
    return options_from_args(args)


def test_the_options_are_parsed_and_default_to_off(tmp_path):
    plain = _options(tmp_path, "--inference", "predictor")
    assert (plain.tiles_per_pass, plain.gradient_checkpointing) == (None, False)
    low = _options(tmp_path, "--inference", "predictor", "--tiles-per-pass", "1",
                   "--gradient-checkpointing")
    assert (low.tiles_per_pass, low.gradient_checkpointing) == (1, True)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_tile_count_below_one_is_refused(tmp_path, value):
    with pytest.raises(UserInputError, match="--tiles-per-pass.*>= 1"):
        _options(tmp_path, "--tiles-per-pass", value)


def test_the_predictor_loader_receives_them(tmp_path, monkeypatch):
    seen = {}

    def fake_loader(folder, fold, checkpoint, device, **kwargs):
        seen.update(kwargs)
        raise UserInputError("stop here")

    monkeypatch.setattr(run_module, "load_predictor_model", fake_loader)
    monkeypatch.setattr(run_module, "model_folders", lambda options: [str(tmp_path / "model")])

    def load_models(folders, folds, checkpoint, device, loader):
        return [loader(folders[0], folds[0], checkpoint, device)]

    monkeypatch.setattr(run_module, "load_models", load_models)
    options = _options(tmp_path, "--inference", "predictor", "--tiles-per-pass", "2",
                       "--gradient-checkpointing", "--disable-tta")
    with pytest.raises(UserInputError, match="stop here"):
        run_module._prepare(options)
    assert seen == {"use_mirroring": False, "tile_step_size": 0.5, "tiles_per_pass": 2,
                    "checkpoint_tiles": True}


def test_the_configuration_records_them_only_when_set(tmp_path):
    def inference(options):
        return run_config(options, [], {}, {})["inference"]

    base = dict(output=str(tmp_path / "o"), model_folders=(str(tmp_path / "m"),), device="cpu",
                inference="predictor")
    assert inference(EvalOptions(**base)) == {"path": "predictor", "tile_step_size": 0.5,
                                              "mirroring": True}
    assert inference(EvalOptions(**base, tiles_per_pass=1, gradient_checkpointing=True)) == {
        "path": "predictor", "tile_step_size": 0.5, "mirroring": True, "tiles_per_pass": 1,
        "gradient_checkpointing": True}
