"""PGD's iterates against torchattacks, an independent implementation (skipped without it:
`pip install --no-deps torchattacks==3.5.1`, as .ci/run does)."""
import pytest
import torch

from nnunet_ima.attacks import pgd

torchattacks = pytest.importorskip("torchattacks")


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_iterates_equal_torchattacks(cnn_batch, norm):
    model, x, y = cnn_batch
    eps = 0.5 if norm == "l2" else 0.05
    step = eps / 4
    for k in range(1, 6):
        if norm == "l2":
            oracle = torchattacks.PGDL2(model, eps=eps, alpha=step, steps=k, random_start=False)
        else:
            oracle = torchattacks.PGD(model, eps=eps, alpha=step, steps=k, random_start=False)
        expected = oracle(x, y)
        ours = pgd(model, x, y, eps, norm=norm, steps=k, alpha=step * k / eps,
                   random_start=False, clamp=(0.0, 1.0))
        assert ours.dtype == torch.float64
        assert torch.allclose(ours, expected, atol=1e-6, rtol=0), f"iterate {k} differs"
        assert (ours - x).abs().max() > 0
