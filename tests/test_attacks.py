"""PGD and BPGD: analytic margins of a linear model, invariants (torchattacks agreement:
test_attacks_torchattacks.py)."""
import pytest
import torch

from nnunet_ima.attacks import argmax_correct, bpgd, margin_loss, pgd, run_pgd, start_offset
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.norms import per_sample_norm

from core_models import LinearBinary, SmallCNN


def _linear_problem(dtype=torch.float64):
    torch.manual_seed(1)
    w = torch.randn(5, dtype=dtype)
    model = LinearBinary(w, 0.3).to(dtype)
    x = torch.randn(8, 5, dtype=dtype) * 2
    with torch.no_grad():
        y = (model.f(x) > 0).long()
    return model, x, y


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_bpgd_distance_equals_analytic_margin(norm):
    model, x, y = _linear_problem()
    with torch.no_grad():
        dual = 2 if norm == "l2" else 1  # the dual norm of the attack's norm
        margin = model.f(x).abs() / model.w.norm(p=dual)
    # Per-sample budgets: half the samples get more than their margin, half less.
    eps = torch.where(torch.arange(8) % 2 == 0, margin * 1.7, margin * 0.6)
    steps, binary_steps, alpha = 10, 10, 4.0
    result = bpgd(model, x, y, eps, argmax_correct, norm=norm, steps=steps, alpha=alpha,
                  binary_steps=binary_steps, random_start=False)
    expected_found = torch.arange(8) % 2 == 0
    assert torch.equal(result.found, expected_found)
    tolerance = alpha * eps / steps / 2 ** binary_steps  # one PGD step halved binary_steps times
    found = result.found
    assert torch.all((result.distance[found] - margin[found]).abs() <= tolerance[found] + 1e-9)
    # the returned point is the correct end of the bracket: still classified correctly
    assert argmax_correct(model(result.x_boundary[found]), y[found]).all()
    # not-found samples stayed inside their budget
    assert torch.all(result.distance[~found] <= eps[~found] + 1e-9)


def test_bpgd_midpoint_lies_on_the_other_side_within_tolerance():
    model, x, y = _linear_problem()
    with torch.no_grad():
        margin = model.f(x).abs() / model.w.norm()
    eps = margin * 2
    r = bpgd(model, x, y, eps, norm="l2", steps=8, binary_steps=12, random_start=False,
             boundary="midpoint")
    assert r.found.all()
    assert torch.allclose(r.distance, margin, atol=float((4 * eps / 8).max()) / 2 ** 12)


def test_bpgd_batch_equals_per_sample():
    torch.manual_seed(2)
    model = SmallCNN().double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    eps = torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    batch = bpgd(model, x, y, eps, steps=6, binary_steps=5, random_start=False)
    for i in range(5):
        single = bpgd(model, x[i:i + 1], y[i:i + 1], eps[i:i + 1], steps=6, binary_steps=5,
                      random_start=False)
        assert single.found.item() == batch.found[i].item()
        assert torch.allclose(single.x_boundary[0], batch.x_boundary[i], atol=1e-10)
        assert torch.allclose(single.distance[0], batch.distance[i], atol=1e-10)


def test_crossed_samples_stop_taking_steps():
    model, x, y = _linear_problem()
    with torch.no_grad():
        margin = model.f(x).abs() / model.w.norm()
    eps = margin * 10  # every sample crosses within its first 3 steps (step = 4 * eps / 10)
    r = bpgd(model, x, y, eps, steps=10, binary_steps=0, random_start=False)
    assert r.found.all() and (r.crossed_at <= 3).all()
    # a sample crossing at iterate i took i backward passes and i + 1 forward passes
    assert r.backward_samples == int(r.crossed_at.sum())
    assert r.forward_samples == int((r.crossed_at + 1).sum())


def test_pgd_stop_if_freezes_fooled_samples():
    model, x, y = _linear_problem()
    with torch.no_grad():
        margin = model.f(x).abs() / model.w.norm()
    run = run_pgd(model, x, y, margin * 3, steps=10, random_start=False,
                  stop_if=lambda out, lab: ~argmax_correct(out, lab))
    assert (run.stopped_at >= 0).all()
    assert not argmax_correct(model(run.x_adv), y).any()
    # frozen at the first wrong iterate: never more than one step beyond the margin
    assert torch.all(per_sample_norm(run.x_adv - x, "l2") <= margin + 4 * margin * 3 / 10 + 1e-9)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("attack", ["pgd", "bpgd"])
def test_invariants(cnn_batch, norm, attack):
    model, x, y = cnn_batch
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params_before = [p.detach().clone() for p in model.parameters()]
    x_before = x.clone()
    eps = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    if attack == "pgd":
        x_adv = pgd(model, x, y, eps, norm=norm, steps=5, loss=margin_loss)
    else:
        x_adv = bpgd(model, x, y, eps, norm=norm, steps=5, binary_steps=4).x_boundary
    assert torch.equal(x, x_before)
    assert torch.all(per_sample_norm(x_adv - x, norm) <= eps + 1e-9)
    assert torch.equal(x_adv[0], x[0])  # eps = 0 returns x
    assert model.training and all(m.training for m in model.modules())
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before) and torch.equal(p.grad, torch.full_like(p, 0.5))
        assert p.requires_grad


def test_vector_eps_equals_scalar_eps(cnn_batch):
    model, x, y = cnn_batch
    for norm in ("l2", "linf"):
        a = pgd(model, x, y, 0.7, norm=norm, steps=4, generator=torch.Generator().manual_seed(3))
        b = pgd(model, x, y, torch.full((6,), 0.7, dtype=torch.float64), norm=norm, steps=4,
                generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        ra = bpgd(model, x, y, 0.7, norm=norm, steps=4, generator=torch.Generator().manual_seed(3))
        rb = bpgd(model, x, y, torch.full((6,), 0.7, dtype=torch.float64), norm=norm, steps=4,
                  generator=torch.Generator().manual_seed(3))
        assert torch.equal(ra.x_boundary, rb.x_boundary) and torch.equal(ra.found, rb.found)


def test_random_start_stays_in_ball_and_changes_result(cnn_batch):
    model, x, y = cnn_batch
    a = pgd(model, x, y, 1.0, steps=1, alpha=1e-9, generator=torch.Generator().manual_seed(0))
    b = pgd(model, x, y, 1.0, steps=1, alpha=1e-9, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    assert torch.all(per_sample_norm(a - x, "l2") <= 1.0 + 1e-9)


def test_half_precision_input_is_attacked_in_fp32():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(2, 1, 8, 8).half()
    out = pgd(model, x, torch.tensor([0, 1]), 0.5, steps=2)
    assert out.dtype == torch.float32


def test_segmentation_output_lists_are_supported():
    """Deep-supervision style: the model returns a list, the predicate looks at element 0."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).double()

    class DS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            out = self.conv(x)
            return [out, torch.nn.functional.avg_pool2d(out, 2)]

    model = DS()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        target = model(x)[0].argmax(1, keepdim=True)
    targets = [target, target[:, :, ::2, ::2]]

    def seg_loss(output, y):
        return torch.nn.functional.cross_entropy(output[0], y[0][:, 0], reduction="none").mean((1, 2))

    r = bpgd(model, x, targets, torch.tensor([0.0, 5.0, 50.0], dtype=torch.float64),
             DiceThresholdCorrect(0.6), loss=seg_loss, steps=10, binary_steps=6, random_start=False)
    assert not r.found[0]  # eps 0 can never cross
    assert r.found[2]
    assert DiceThresholdCorrect(0.6)(model(r.x_boundary[r.found]), select_first(targets, r.found)).all()


def select_first(targets, mask):
    return [t[mask] for t in targets]


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=torch.tensor([0.1, 0.2])), "eps must be a scalar or a"),
    (dict(eps=float("nan")), "eps must be finite"),
    (dict(norm="l3"), "norm must be one of"),
    (dict(steps=-1), "steps must be"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(loss="hinge"), "loss must be one of"),
])
def test_bad_input_raises_value_error(cnn_batch, kwargs, match):
    model, x, y = cnn_batch
    args = dict(eps=0.5)
    args.update(kwargs)
    eps = args.pop("eps")
    with pytest.raises(ValueError, match=match):
        pgd(model, x, y, eps, **args)


def test_nan_input_and_mismatched_labels_raise(cnn_batch):
    model, x, y = cnn_batch
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        pgd(model, bad, y, 0.5)
    with pytest.raises(ValueError, match="y has batch size 5 but x has 6"):
        bpgd(model, x, y[:5], 0.5)
    with pytest.raises(ValueError, match="boundary must be one of"):
        bpgd(model, x, y, 0.5, boundary="nearest")
    with pytest.raises(ValueError, match="dice_threshold must lie strictly between 0 and 1"):
        DiceThresholdCorrect(1.0)


# ----------------------------------------------------------------------------- start and schedule

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_given_start_is_the_random_start_drawn_outside(cnn_batch, norm):
    """``start`` (advertorch's ``delta_init``): the loop from an offset drawn by the caller gives
    the bits of the loop that draws the same offset itself."""
    model, x, y = cnn_batch
    eps = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    inside = run_pgd(model, x, y, eps, norm=norm, steps=4, clamp=(0.0, 1.0),
                     generator=torch.Generator().manual_seed(7))
    offset = start_offset(x, eps, norm, generator=torch.Generator().manual_seed(7))
    outside = run_pgd(model, x, y, eps, norm=norm, steps=4, clamp=(0.0, 1.0), start=offset)
    assert torch.equal(inside.x_adv, outside.x_adv)
    radius = torch.full((6,), 0.2, dtype=torch.float64)
    on_sphere = run_pgd(model, x, y, eps, norm=norm, steps=4, start_radius=radius,
                        generator=torch.Generator().manual_seed(7))
    drawn = start_offset(x, eps, norm, radius, torch.Generator().manual_seed(7))
    assert torch.equal(on_sphere.x_adv, run_pgd(model, x, y, eps, norm=norm, steps=4,
                                                start=drawn).x_adv)
    # steps=0 returns the start point itself.
    assert torch.equal(run_pgd(model, x, y, eps, norm=norm, steps=0, start=offset).x_adv,
                       x + offset)


def test_the_loss_schedule_gives_step_t_its_loss(cnn_batch):
    model, x, y = cnn_batch
    asked = []

    def schedule(t):
        asked.append(t)
        return margin_loss

    scheduled = run_pgd(model, x, y, 0.5, steps=3, loss_schedule=schedule,
                        generator=torch.Generator().manual_seed(0))
    assert asked == [1, 2, 3]
    plain = run_pgd(model, x, y, 0.5, steps=3, loss=margin_loss,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(scheduled.x_adv, plain.x_adv)
    # A schedule that changes the objective changes the iterates.
    switched = run_pgd(model, x, y, 0.5, steps=3, generator=torch.Generator().manual_seed(0),
                       loss_schedule=lambda t: margin_loss if t == 1 else
                       (lambda out, lab: -margin_loss(out, lab)))
    assert not torch.equal(switched.x_adv, plain.x_adv)


def test_a_start_of_another_shape_or_with_a_radius_is_refused(cnn_batch):
    model, x, y = cnn_batch
    with pytest.raises(ValueError, match="start must have the shape of x"):
        run_pgd(model, x, y, 0.5, start=torch.zeros(6, 1, 8))
    with pytest.raises(ValueError, match="pass one of them"):
        run_pgd(model, x, y, 0.5, start=torch.zeros_like(x),
                start_radius=torch.full((6,), 0.1, dtype=torch.float64))
