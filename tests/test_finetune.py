"""Fine-tuning settings: ``finetune_from`` loads every weight of a checkpoint (heads included)
into the wrapped network at the end of ``initialize()``, not when a checkpoint of the run's own
is loaded (``--c``), and refuses a checkpoint that does not fit; ``lr_warmup_epochs`` ramps the
learning rate up linearly, and 0 keeps nnU-Net's rates bit for bit.

The trainers run on nnU-Net faked down to the attributes they use (as in
test_settings_strict.py); the real pipeline is tests/test_finetune_e2e.py.
"""
import json
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_ima.commands.check_config import trainer_class
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.finetune import (first_changed_weight, inner_module,
                                        load_finetune_weights)
from nnunet_ima.nnunet.lr_schedule import WarmupLRScheduler, warmup_learning_rate
from nnunet_ima.nnunet.settings import CONFIG_ENV, FAMILIES, READ_BY, settings_from_dict
from test_settings_strict import _TinyNet, _new_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = {"background": 0, "organ": 1, "lesion": 2}
# Every trainer family, the baselines, and named variants of each kind.
TRAINER_NAMES = ["nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA",
                 "nnUNetTrainerTRADES", "nnUNetTrainerNFGSM", "nnUNetTrainerAdv_eps15",
                 "nnUNetTrainerIMA_eps15", "nnUNetTrainerNFGSM_eps8"]


class _SegNet(nn.Module):
    """An encoder convolution and nnU-Net's naming of the segmentation heads
    (``decoder.seg_layers.N``), which ``-pretrained_weights`` leaves out."""

    def __init__(self, classes=3):
        super().__init__()
        self.encoder = nn.Conv2d(1, 4, 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.seg_layers = nn.ModuleList([nn.Conv2d(4, classes, 1)])

    def forward(self, x):
        return self.decoder.seg_layers[0](self.encoder(x))


def _net(seed, classes=3):
    torch.manual_seed(seed)
    return _SegNet(classes)


def _checkpoint(path, weights, labels=LABELS, **extra):
    """An nnU-Net checkpoint as ``save_checkpoint`` writes it (the keys read here)."""
    torch.save({"network_weights": weights, "init_args": {"dataset_json": {"labels": labels}},
                "current_epoch": 8, **extra}, path)
    return str(path)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- loading the weights
def test_every_weight_is_loaded_heads_included(tmp_path):
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "checkpoint_final.pth", source)
    network = _net(1)
    assert not torch.equal(network.decoder.seg_layers[0].weight, source[
        "decoder.seg_layers.0.weight"])
    loaded = load_finetune_weights(network, path, LABELS)
    assert _equal(network.state_dict(), source) and _equal(loaded, source)
    assert first_changed_weight(network, loaded) is None


def test_minus_pretrained_weights_leaves_the_heads_out_as_documented(tmp_path):
    """The difference docs/settings.md describes, with nnU-Net's own function."""
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "checkpoint_final.pth", source)
    network = _net(1)
    fresh_head = network.decoder.seg_layers[0].weight.clone()
    load_pretrained_weights(network, path)
    assert torch.equal(network.encoder.weight, source["encoder.weight"])
    assert torch.equal(network.decoder.seg_layers[0].weight, fresh_head)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_keys_saved_from_a_wrapped_network_load(tmp_path, prefix):
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "c.pth", {prefix + k: v for k, v in source.items()})
    network = _net(1)
    load_finetune_weights(network, path)
    assert _equal(network.state_dict(), source)


def test_a_compiled_network_is_loaded_inside_its_wrapper(tmp_path):
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "c.pth", source)
    network = _net(1)
    compiled = torch.compile(network)  # the wrapper only; nothing is compiled before a call
    assert inner_module(compiled) is network
    load_finetune_weights(compiled, path)
    assert _equal(network.state_dict(), source)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ddp_network_is_loaded_inside_its_wrapper(tmp_path):
    """nnU-Net wraps the (compiled) network in DDP in initialize(): one gloo rank on CPU."""
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "c.pth", source)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        network = _net(1)
        wrapped = DistributedDataParallel(torch.compile(network))
        assert inner_module(wrapped) is network
        load_finetune_weights(wrapped, path)
        assert _equal(network.state_dict(), source)
    finally:
        dist.destroy_process_group()


def _refusal(network, path, labels=LABELS):
    with pytest.raises(UserInputError) as e:
        load_finetune_weights(network, path, labels)
    message = str(e.value)
    assert message.startswith("finetune_from: ") and path in message
    assert "Set finetune_from to the checkpoint_final.pth" in message  # the fix
    return message


def test_a_missing_file_a_folder_or_another_file_is_refused(tmp_path):
    assert "does not exist" in _refusal(_net(1), str(tmp_path / "nope.pth"))
    assert "is a folder" in _refusal(_net(1), str(tmp_path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "cannot read" in _refusal(_net(1), str(garbage))
    torch.save([1, 2], tmp_path / "list.pth")
    assert "has no 'network_weights'" in _refusal(_net(1), str(tmp_path / "list.pth"))


def test_other_heads_are_refused_naming_the_key_and_both_shapes(tmp_path):
    """A model of another label set: 4 classes there, 3 here."""
    path = _checkpoint(tmp_path / "c.pth", _net(0, classes=4).state_dict(),
                       labels=dict(LABELS, tumour=3))
    message = _refusal(_net(1), path, labels=None)  # labels unknown: the shapes decide
    assert "parameter 'decoder.seg_layers.0.weight' has the shape (4, 4, 1, 1) in the " \
           "checkpoint but (3, 4, 1, 1) in this network" in message
    assert "-pretrained_weights CHECKPOINT instead" in message


def test_missing_and_extra_keys_are_refused_by_name(tmp_path):
    source = _net(0).state_dict()
    path = _checkpoint(tmp_path / "less.pth", {k: v for k, v in source.items()
                                               if k != "encoder.bias"})
    assert "the network's parameter 'encoder.bias' (4,) is not in the checkpoint" in \
        _refusal(_net(1), path)
    path = _checkpoint(tmp_path / "more.pth", {**source, "decoder.extra": torch.zeros(2)})
    assert "the checkpoint's parameter 'decoder.extra' (2,) is not in this network" in \
        _refusal(_net(1), path)


def test_other_labels_with_heads_of_the_same_shape_are_refused(tmp_path):
    other = {"background": 0, "liver": 1, "spleen": 2}
    path = _checkpoint(tmp_path / "c.pth", _net(0).state_dict(), labels=other)
    network = _net(1)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    message = _refusal(network, path)
    assert f"it was trained on the labels {other}, this run's dataset.json has {LABELS}" in \
        message
    assert _equal(network.state_dict(), before)  # nothing was loaded


# ------------------------------------------------------------------------ the settings
def test_both_keys_are_read_by_every_family_and_default_to_nothing():
    assert READ_BY["finetune_from"] == READ_BY["lr_warmup_epochs"] == FAMILIES
    s = settings_from_dict({})
    assert (s.finetune_from, s.lr_warmup_epochs) == (None, 0)


@pytest.mark.parametrize("values, message", [
    ({"lr_warmup_epochs": -1}, "f.json: lr_warmup_epochs must be an integer >= 0, got -1"),
    ({"lr_warmup_epochs": 1.5}, "f.json: lr_warmup_epochs must be an integer >= 0, got 1.5"),
    ({"finetune_from": "fold_0/checkpoint_final.pth"},
     "f.json: finetune_from must be an absolute path (such as /data/nnUNet_results/"),
    ({"finetune_from": 3}, "f.json: finetune_from must be an absolute path"),
])
def test_bad_values_are_refused_by_key(values, message):
    with pytest.raises(UserInputError) as e:
        settings_from_dict(values, source="f.json")
    assert str(e.value).startswith(message)


# ------------------------------------------------------------------ the learning rate
def _trainer(monkeypatch, tmp_path, name, values):
    """``name`` as nnUNetv2_train constructs it with ``values`` as NNUNET_IMA_CONFIG (nnU-Net
    faked), its dataset's labels set."""
    config = tmp_path / "ima.json"
    config.write_text(json.dumps(values))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    trainer = _new_trainer(monkeypatch, tmp_path, trainer_class(name))
    trainer.dataset_json = {"labels": LABELS}
    return trainer


def _rates(trainer):
    """The learning rate of every epoch, as nnU-Net sets it (``step(epoch)`` at its start)."""
    rates = []
    for epoch in range(trainer.num_epochs):
        trainer.lr_scheduler.step(epoch)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("schedule, exponent", [("poly", 0.9), ("constant", 0.0)])
def test_without_warmup_the_rates_are_nnunets_bit_for_bit(monkeypatch, tmp_path, schedule,
                                                          exponent):
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerClean",
                 {"num_epochs": 7, "lr_schedule": schedule, "initial_lr": 0.02})
    t.initialize()
    assert type(t.lr_scheduler) is PolyLRScheduler  # nnU-Net's own object, as before
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], 0.02)
    reference = PolyLRScheduler(optimizer, 0.02, 7, exponent=exponent)
    expected = []
    for epoch in range(7):
        reference.step(epoch)
        expected.append(optimizer.param_groups[0]["lr"])
    assert _rates(t) == expected == [0.02 * (1 - e / 7) ** exponent for e in range(7)]


@pytest.mark.parametrize("schedule, expected", [
    # Epochs 0, 1 ramp to 1/3 and 2/3 of initial_lr; epoch 2 is the first of poly over 4 epochs.
    ("poly", [0.01 / 3, 0.02 / 3, 0.01, 0.01 * 0.75 ** 0.9, 0.01 * 0.5 ** 0.9,
              0.01 * 0.25 ** 0.9]),
    ("constant", [0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01, 0.01]),
])
def test_warmup_ramps_up_then_follows_the_schedule(monkeypatch, tmp_path, schedule, expected):
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerIMA",
                 {"num_epochs": 6, "lr_schedule": schedule, "lr_warmup_epochs": 2})
    t.initialize()
    assert isinstance(t.lr_scheduler, WarmupLRScheduler)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(expected[0])  # before any step
    assert _rates(t) == pytest.approx(expected, rel=1e-12)
    # A resumed run (--c) sets the rate from the epoch alone.
    t.lr_scheduler.step(4)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(expected[4], rel=1e-12)


def test_one_warmup_epoch_halves_the_first_epochs_rate():
    """nnU-Net's nnUNetTrainer_warmup (initial_lr * (e + 1) / N) would start at initial_lr."""
    assert warmup_learning_rate(0, 0.01, 5, 1) == pytest.approx(0.005)
    assert warmup_learning_rate(1, 0.01, 5, 1) == 0.01


def test_a_warmup_as_long_as_the_run_only_ramps_up():
    assert [warmup_learning_rate(e, 0.01, 2, 3) for e in range(2)] == \
        pytest.approx([0.0025, 0.005])


# -------------------------------------------------------------- finetune_from in the trainers
@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A checkpoint of the faked nnU-Net's network (test_settings_strict._TinyNet), and its
    weights, which no fresh network has."""
    torch.manual_seed(123)
    weights = {k: v + 1.0 for k, v in _TinyNet().state_dict().items()}
    (tmp_path / "source").mkdir()
    return _checkpoint(tmp_path / "source" / "checkpoint_final.pth", weights), weights


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_every_trainer_starts_from_every_weight_of_finetune_from(monkeypatch, tmp_path, name,
                                                                 tiny_checkpoint):
    path, weights = tiny_checkpoint
    t = _trainer(monkeypatch, tmp_path, name, {"finetune_from": path, "num_epochs": 3})
    assert t.ima_settings.finetune_from == path
    t.initialize()
    assert _equal(t.network.state_dict(), weights)
    assert t.optimizer.state == {}  # fresh: nnU-Net's SGD with no momentum yet


def test_without_finetune_from_the_initialisation_is_nnunets(monkeypatch, tmp_path,
                                                             tiny_checkpoint):
    _, weights = tiny_checkpoint
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerIMA", {"num_epochs": 3})
    t.initialize()
    assert not torch.equal(t.network.state_dict()["conv.weight"], weights["conv.weight"])
    assert t._finetune_weights is None


def _fake_load_checkpoint(monkeypatch):
    """nnU-Net's load_checkpoint as far as the weights go: it initialises the trainer first
    where it is not, then loads the checkpoint's weights."""
    def load(self, checkpoint):
        if not getattr(self, "was_initialized", False):
            self.initialize()
            self.was_initialized = True
        self.network.load_state_dict(checkpoint["network_weights"])
    monkeypatch.setattr(nnUNetTrainer, "load_checkpoint", load)


def test_continuing_does_not_load_finetune_from_again(monkeypatch, tmp_path, tiny_checkpoint):
    """--c: load_checkpoint initialises the trainer; the run's own checkpoint holds the
    fine-tuned weights, and the source may be gone by then."""
    path, _ = tiny_checkpoint
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerIMA", {"finetune_from": path,
                                                             "num_epochs": 3})
    os.remove(path)  # loading it would refuse the run
    _fake_load_checkpoint(monkeypatch)
    own = {k: v * 3 for k, v in _TinyNet().state_dict().items()}
    t.load_checkpoint({"network_weights": own})
    assert _equal(t.network.state_dict(), own)
    assert t._finetune_weights is None and not t._restoring


def test_a_missing_source_stops_a_new_run(monkeypatch, tmp_path, capsys):
    missing = str(tmp_path / "gone" / "checkpoint_final.pth")
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerAdv", {"finetune_from": missing})
    with pytest.raises(SystemExit) as e:
        t.initialize()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"finetune_from: {missing} does not exist" in err and "cannot start" in err


def test_pretrained_weights_beside_finetune_from_is_refused(monkeypatch, tmp_path, capsys,
                                                            tiny_checkpoint):
    """nnUNetv2_train -pretrained_weights loads its file after initialize(): on_train_start
    finds the weights finetune_from loaded replaced, and stops."""
    path, weights = tiny_checkpoint
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerIMA", {"finetune_from": path})
    t.initialize()
    t.was_initialized = True
    other = _checkpoint(tmp_path / "other.pth", {k: -v for k, v in weights.items()})
    load_pretrained_weights(t.network, other)  # what run_training does with the option
    with pytest.raises(SystemExit):
        t.on_train_start()
    err = capsys.readouterr().err
    assert re.search(r"finetune_from \(.*\) and nnUNetv2_train -pretrained_weights were both "
                     r"given: -pretrained_weights replaced the weights finetune_from loaded "
                     r"\('conv.weight' first\)", err)


def test_the_same_file_or_nothing_after_finetune_from_is_accepted(monkeypatch, tmp_path,
                                                                  tiny_checkpoint):
    path, weights = tiny_checkpoint
    t = _trainer(monkeypatch, tmp_path, "nnUNetTrainerClean", {"finetune_from": path})
    t.initialize()
    load_pretrained_weights(t.network, path)  # the same values: nothing is mixed
    t._refuse_replaced_finetune_weights()
    assert t._finetune_weights is None  # checked once, then freed
