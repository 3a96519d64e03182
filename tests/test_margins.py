"""MarginStore: IMA's update rules on hand-made records, clipping, duplicates, persistence."""
import json

import pytest
import torch

from nnunet_ima.margins import MarginStore


def store(**kw):
    settings = dict(eps_max=1.0, delta=0.1)
    settings.update(kw)
    return MarginStore(**settings)


def test_unseen_keys_get_the_initial_margin():
    s = store()
    assert torch.allclose(s.get([("case_000", 3), ("case_001", 0)]), torch.tensor([0.1, 0.1]))
    assert store(initial=0.4).margin(7) == 0.4
    assert len(s) == 0


def test_average_shrink_variant_hand_computed():
    s = store()  # average shrink, shrink on clean-wrong, clip [0, eps_max]
    s.record(["a", "b", "c"], crossed=[True, False, False], distance=[0.04, 0.0, 0.0],
             clean_correct=[True, True, False])
    stats = s.end_epoch()
    assert s.margin("a") == pytest.approx((0.04 + 0.1) / 2)   # shrink
    assert s.margin("b") == pytest.approx(0.2)                # expand by delta
    assert s.margin("c") == pytest.approx(0.05)               # clean-wrong: shrink with distance 0
    assert stats.keys_updated == 3 and stats.records == 3
    assert stats.fraction_expanded == pytest.approx(1 / 3)
    assert stats.fraction_shrunk == pytest.approx(2 / 3)
    assert stats.fraction_crossed_records == pytest.approx(1 / 3)
    assert stats.margin_mean == pytest.approx((0.07 + 0.2 + 0.05) / 3)
    assert stats.margin_median == pytest.approx(0.07)


def test_replace_reset_variant_with_delta_clip():
    s = store(shrink="replace", on_clean_wrong="reset", clip_min="delta")
    s.record(["a", "b", "c", "d"], crossed=[True, True, False, False],
             distance=[0.04, 0.35, 0.0, 0.0], clean_correct=[True, True, True, False])
    s.end_epoch()
    assert s.margin("a") == pytest.approx(0.1)   # replaced by 0.04, clipped up to delta
    assert s.margin("b") == pytest.approx(0.35)  # replaced
    assert s.margin("c") == pytest.approx(0.2)   # expanded
    assert s.margin("d") == pytest.approx(0.1)   # reset to delta
    # a reset of a grown margin goes back to delta
    for _ in range(3):
        s.record(["d"], [False], [0.0], [True])
        s.end_epoch()
    assert s.margin("d") == pytest.approx(0.4)
    s.record(["d"], [False], [0.0], [False])
    assert s.end_epoch().fraction_reset == 1.0
    assert s.margin("d") == pytest.approx(0.1)


def test_clip_to_eps_max_and_zero():
    s = store(eps_max=0.25, delta=0.1)
    for _ in range(5):
        s.record(["a"], [False], [0.0], [True])
        s.end_epoch()
    assert s.margin("a") == pytest.approx(0.25)
    # a second key still growing: one of the two margins sits at eps_max
    s.record(["b"], [False], [0.0], [True])
    assert s.end_epoch().fraction_saturated == pytest.approx(1 / 2)
    s.record(["a"], [True], [0.05], [True])
    assert s.end_epoch().fraction_saturated == 0.0  # a shrank to 0.15, b is at 0.2
    s2 = store(shrink="replace")
    s2.record(["z"], [True], [0.0], [True])
    s2.end_epoch()
    assert s2.margin("z") == 0.0


def test_duplicates_within_an_epoch():
    s = store()
    # crossed twice: the mean distance is used once
    s.record(["a", "a"], [True, True], [0.02, 0.06], [True, True])
    # crossed once and not crossed once: crossing wins, with its distance
    s.record(["b", "b"], [True, False], [0.08, 0.0], [True, True])
    # never crossed in three visits: one expansion, not three
    s.record(["c", "c", "c"], [False] * 3, [0.0] * 3, [True] * 3)
    # one clean-wrong visit and one crossing: mean of distances (0, 0.06)
    s.record(["d", "d"], [False, True], [0.0, 0.06], [False, True])
    stats = s.end_epoch()
    assert s.margin("a") == pytest.approx((0.04 + 0.1) / 2)
    assert s.margin("b") == pytest.approx((0.08 + 0.1) / 2)
    assert s.margin("c") == pytest.approx(0.2)
    assert s.margin("d") == pytest.approx((0.03 + 0.1) / 2)
    assert stats.records == 9 and stats.keys_updated == 4


def test_unrecorded_keys_keep_their_margin():
    s = store()
    s.record([1, 2], [False, False], [0, 0], [True, True])
    s.end_epoch()
    s.record([1], [True], [0.1], [True])
    s.end_epoch()
    assert s.margin(2) == pytest.approx(0.2)
    assert s.margin(1) == pytest.approx(0.15)


def test_crossed_flag_of_a_clean_wrong_sample_is_ignored():
    s = store()
    s.record(["a"], [True], [0.09], [False])
    s.end_epoch()
    assert s.margin("a") == pytest.approx(0.05)  # shrunk with distance 0, not 0.09


def test_tensor_inputs_and_key_normalisation():
    s = store()
    keys = [("case", torch.tensor(3)), ("case", 4)]
    s.record(keys, torch.tensor([True, False]), torch.tensor([0.02, 0.0]),
             torch.tensor([True, True]))
    s.end_epoch()
    assert ("case", 3) in s
    assert torch.allclose(s.get([("case", 3), ("case", 4)]), torch.tensor([0.06, 0.2]))


def test_state_round_trip_through_json():
    s = store(shrink="replace", on_clean_wrong="reset", clip_min="delta")
    s.record([("case_000", 3), ("case_001", 12)], [True, False], [0.123456789012345, 0.0], [True, True])
    s.end_epoch()
    s.record([("case_000", 3)], [False], [0.0], [True])  # pending records survive too
    text = json.dumps(s.state_dict())
    restored = MarginStore.from_state_dict(json.loads(text))
    assert restored.state_dict() == s.state_dict()
    assert restored.margin(("case_000", 3)) == s.margin(("case_000", 3))
    assert restored.epoch == 1
    restored.end_epoch()
    s.end_epoch()
    assert restored.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="not a MarginStore state"):
        MarginStore.from_state_dict({"margins": []})


def test_values():
    s = store()
    s.record(list(range(4)), [True, True, False, False], [0.0, 0.02, 0, 0], [True] * 4)
    s.end_epoch()
    assert sorted(s.values().tolist()) == pytest.approx([0.05, 0.06, 0.2, 0.2])


@pytest.mark.parametrize("kw, match", [
    (dict(eps_max=0), "eps_max must be a finite number > 0"),
    (dict(delta=0), "delta must be in"),
    (dict(delta=2.0), "delta must be in"),
    (dict(shrink="min"), "shrink must be one of"),
    (dict(on_clean_wrong="drop"), "on_clean_wrong must be one of"),
    (dict(clip_min="one"), "clip_min must be one of"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        store(**kw)


def test_bad_records():
    s = store()
    with pytest.raises(ValueError, match="crossed has 1 entries but 2 keys"):
        s.record(["a", "b"], [True], [0.1, 0.1], [True, True])
    with pytest.raises(ValueError, match="distance of crossed sample"):
        s.record(["a"], [True], [float("nan")], [True])
