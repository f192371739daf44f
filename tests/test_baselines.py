"""Baselines: hand-computed advantages, the ground-truth baseline, state and resumption, errors."""

import math

import pytest
import torch

from clip_rl_trl.baselines import BASELINES, make_baseline

R = torch.tensor([1.0, 3.0, 0.0, 4.0, 2.0, 2.0])  # 3 images x G = 2


def test_group_and_loo() -> None:
    torch.testing.assert_close(make_baseline("group").advantages(R, 2), torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(make_baseline("group").per_image(R, 2), torch.tensor([2.0, 2.0, 2.0]))
    # G = 3: leave-one-out means (3+5)/2, (1+5)/2, (1+3)/2.
    torch.testing.assert_close(
        make_baseline("loo").advantages(torch.tensor([1.0, 3.0, 5.0]), 3), torch.tensor([-3.0, 0.0, 3.0])
    )
    # With G = 2 leave-one-out is twice the group advantage.
    torch.testing.assert_close(make_baseline("loo").advantages(R, 2), 2 * make_baseline("group").advantages(R, 2))
    torch.testing.assert_close(make_baseline("loo").per_image(R, 2), torch.tensor([2.0, 2.0, 2.0]))


def test_greedy_self_critical() -> None:
    greedy = torch.tensor([0.5, 4.0, 3.0])
    b = make_baseline("greedy")
    assert b.needs_greedy
    torch.testing.assert_close(b.advantages(R, 2, greedy), torch.tensor([0.5, 2.5, -4.0, 0.0, -1.0, -1.0]))
    torch.testing.assert_close(b.per_image(R, 2, greedy), greedy)
    with pytest.raises(ValueError, match="greedy_rewards"):
        b.advantages(R, 2)
    with pytest.raises(ValueError, match="one value per image"):
        b.advantages(R, 2, torch.ones(6))
    # Self-critical training works with a single sample per image.
    torch.testing.assert_close(b.advantages(torch.tensor([1.0, 2.0]), 1, torch.tensor([0.0, 3.0])), torch.tensor([1.0, -1.0]))


def test_running_mean_is_the_cumulative_mean_of_past_batches() -> None:
    b = make_baseline("running_mean")
    torch.testing.assert_close(b.advantages(R, 2), R)  # 0 before the first batch (EGG's MeanBaseline)
    b.update(R)  # batch mean 2
    batch2 = torch.tensor([5.0, 5.0])
    torch.testing.assert_close(b.advantages(batch2, 2), torch.tensor([3.0, 3.0]))
    b.update(batch2)  # mean of batch means (2 + 5) / 2
    assert b.state_dict() == {"mean": 3.5, "count": 2.0}
    torch.testing.assert_close(b.per_image(R, 2), torch.full((3,), 3.5))


def test_ema() -> None:
    b = make_baseline("ema", momentum=0.5)
    torch.testing.assert_close(b.advantages(R, 2), R - 2.0)  # first batch centred on its own mean
    b.update(R)
    b.update(torch.tensor([6.0, 6.0]))  # 0.5 * 2 + 0.5 * 6
    assert b.state_dict() == {"value": 4.0}
    torch.testing.assert_close(b.advantages(torch.tensor([4.0, 5.0]), 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="baseline_momentum"):
        make_baseline("ema", momentum=1.0)


def test_none() -> None:
    torch.testing.assert_close(make_baseline("none").advantages(R, 2), R)


@pytest.mark.parametrize("name", BASELINES)
def test_state_round_trip_resumes_exactly(name: str) -> None:
    steps = [torch.rand(6, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    greedy = torch.tensor([0.1, 0.2, 0.3])
    straight = make_baseline(name)
    resumed = make_baseline(name)
    out_a, out_b = [], []
    for i, r in enumerate(steps):
        out_a.append(straight.advantages(r, 2, greedy))
        straight.update(r)
        if i < 3:
            out_b.append(resumed.advantages(r, 2, greedy))
            resumed.update(r)
        if i == 2:
            state = resumed.state_dict()
            resumed = make_baseline(name)
            resumed.load_state_dict(state)
        elif i > 2:
            out_b.append(resumed.advantages(r, 2, greedy))
            resumed.update(r)
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown baseline 'mean'.*group, loo"):
        make_baseline("mean")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        make_baseline("group").advantages(torch.ones(3), 1)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        make_baseline("loo").advantages(torch.ones(3), 1)
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        make_baseline("none").advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match="NaN"):
        make_baseline("group").advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="stateless"):
        make_baseline("group").load_state_dict({"mean": 1.0})


def test_ground_truth_weights_by_hand() -> None:
    """Two images, G = 2; image 0's references score 0.3 and -0.2 against baseline 0.1, image 1's 0.5, 0.0 vs 0.6."""
    from clip_rl_trl.baselines import ground_truth_weights

    r = torch.tensor([0.3, -0.2, 0.5, 0.0])
    b = torch.tensor([0.1, 0.6])

    def w(name: str, **kw) -> list[float]:
        return ground_truth_weights(r, b, 2, name, **kw).tolist()

    assert w("reward") == pytest.approx([0.3, 0.0, 0.5, 0.0])
    assert w("signed_reward") == pytest.approx([0.3, -0.2, 0.5, 0.0])
    assert w("advantage") == pytest.approx([0.2, -0.3, -0.1, -0.6])  # below the baseline: negative
    assert w("positive_advantage") == pytest.approx([0.2, 0.0, 0.0, 0.0])
    e = [math.exp(x) for x in (3.0, -2.0, 5.0, 0.0)]  # r / 0.1
    assert w("softmax", temperature=0.1) == pytest.approx([e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1]),
                                                           e[2] / (e[2] + e[3]), e[3] / (e[2] + e[3])])
    assert w("uniform") == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown gt_weighting 'best'"):
        w("best")
    with pytest.raises(ValueError, match="temperature > 0"):
        w("softmax", temperature=0.0)
    with pytest.raises(ValueError, match=r"image_baseline must have shape \(2,\)"):
        ground_truth_weights(r, torch.zeros(3), 2)
