"""The paper's classification networks: shapes, the documented layer stacks, clear errors."""
import pytest
import torch
from torch import nn

from nnunet_ima.classification.models import DEFAULT_MODEL, build_model, fashion_cnn, moons_mlp
from nnunet_ima.errors import UserInputError

# COVID-19 CT images are 224x224; ResNet-18 pools adaptively, 64x64 keeps the test fast.
INPUTS = {"moons": (2,), "digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "svhn": (3, 32, 32),
          "cifar10": (3, 32, 32), "covid-ct": (1, 64, 64)}
CLASSES = {"moons": 2, "covid-ct": 2}


@pytest.mark.parametrize("dataset", sorted(DEFAULT_MODEL))
def test_default_model_of_each_dataset_gives_logits(dataset):
    torch.manual_seed(0)
    shape = INPUTS[dataset]
    # The dataset's class count, and 3, which no constructor has as its default: the head must
    # follow num_classes.
    for num_classes in (CLASSES.get(dataset, 10), 3):
        model = build_model(DEFAULT_MODEL[dataset], num_classes, shape)
        assert model.training  # the dry forward pass ran in eval mode; training starts in train
        out = model.eval()(torch.rand(3, *shape))
        assert out.shape == (3, num_classes) and torch.isfinite(out).all()
    # Training needs a gradient in every parameter, the attacks one in the input.
    model.train()
    x = torch.rand(3, *shape, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    without = [name for name, p in model.named_parameters()
               if not p.requires_grad or p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without, f"parameters without a gradient: {without}"
    assert x.grad is not None and x.grad.abs().sum() > 0
    # No batch statistics: a sample's logits do not depend on the rest of its batch.
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        x = torch.rand(4, *shape)
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_documented_layer_stacks():
    # METHOD section 7, parameters counted by hand (norm layers with affine weights and biases).
    mlp = (2 * 32 + 32) + (32 * 64 + 64) + 2 * 64 + (64 * 128 + 128) + 2 * 128 + (128 * 2 + 2)
    assert sum(p.numel() for p in moons_mlp().parameters()) == mlp
    cnn = ((1 * 64 * 25 + 64) + (64 * 128 * 25 + 128) + 2 * 128 + (128 * 256 * 25 + 256) + 2 * 256
           + (256 * 512 * 16 + 512) + 2 * 512 + (512 * 10 + 10))
    assert sum(p.numel() for p in fashion_cnn().parameters()) == cnn
    resnet = build_model("resnet18-in", 2, (1, 64, 64))
    assert resnet.conv1.in_channels == 1 and resnet.fc.out_features == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in build_model("resnet18", 2, (1, 64, 64)).modules())


def test_model_dataset_mismatch_is_a_clear_error():
    with pytest.raises(UserInputError, match="does not accept inputs of shape"):
        build_model("mlp", 10, (1, 28, 28))
    with pytest.raises(UserInputError, match="unknown model"):
        build_model("vgg16", 10, (3, 32, 32))
