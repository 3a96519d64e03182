"""The optimised BPGD (early stop, bisection on crossed samples only) equals a plain implementation.

The reference below runs every PGD step for every sample, classifies all iterates afterwards,
and bisects every sample's first crossing pair: the textbook reading of Algorithm 3.
"""
import pytest
import torch

from nnunet_ima.attacks import argmax_correct, bpgd
from nnunet_ima.margins import MarginStore
from nnunet_ima.norms import per_sample_norm, project, steepest_ascent_direction

from core_models import SmallCNN


def reference_bpgd(model, x, y, eps, steps, alpha, binary_steps, norm):
    model.eval()
    step = (alpha * eps / steps).view(-1, 1, 1, 1)
    iterates = [x.clone()]
    current = x.clone()
    for _ in range(steps):
        current = current.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(current), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, current)
        current = x + project(current.detach() + step * steepest_ascent_direction(grad, norm) - x, eps, norm)
        iterates.append(current)
    with torch.no_grad():
        correct = torch.stack([argmax_correct(model(it), y) for it in iterates], dim=1)  # (B, steps + 1)
    boundary, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for i in range(len(x)):
        wrong = (~correct[i]).nonzero().flatten()
        if wrong.numel() == 0:
            boundary[i] = iterates[-1][i]
            continue
        k = wrong[0].item()
        low = iterates[k - 1][i] if k > 0 else x[i]
        high = iterates[k][i]
        with torch.no_grad():
            for _ in range(binary_steps):
                mid = (low + high) / 2
                if argmax_correct(model(mid[None]), y[i:i + 1]).item():
                    low = mid
                else:
                    high = mid
        boundary[i], found[i] = low, True
    return boundary, found, per_sample_norm(boundary - x, norm)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_optimised_bpgd_matches_reference(norm):
    torch.manual_seed(4)
    model = SmallCNN().double().eval()
    x = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    scale = 1.0 if norm == "l2" else 0.1
    eps = torch.linspace(0.05, 3.0, 12, dtype=torch.float64) * scale
    ours = bpgd(model, x, y, eps, norm=norm, steps=10, alpha=4.0, binary_steps=10, random_start=False)
    boundary, found, distance = reference_bpgd(model, x, y, eps, 10, 4.0, 10, norm)
    assert 0 < found.sum() < len(x), "the fixture should mix crossed and not-crossed samples"
    assert torch.equal(ours.found, found)
    assert torch.allclose(ours.x_boundary, boundary, atol=1e-9)
    assert torch.allclose(ours.distance, distance, atol=1e-9)
    # early stopping costs fewer passes than the reference's B * steps backward passes
    assert ours.backward_samples < len(x) * 10

    # and the margins updated from both are the same
    stores = [MarginStore(eps_max=3.0, delta=0.3) for _ in range(2)]
    for store, (f, d) in zip(stores, [(ours.found, ours.distance), (found, distance)]):
        store.record(range(12), f, d, torch.ones(12, dtype=torch.bool))
        store.end_epoch()
    assert stores[0].values() == pytest.approx(stores[1].values(), abs=1e-9)
