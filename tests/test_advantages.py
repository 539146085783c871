"""Group-normalised advantages (docs/design.md §3.1, §3.2, §3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tpgrpo.advantages import combine_advantages, group_advantages, nonzero_advantage_mask

EPS = 1e-4
REWARDS = [1.0, 3.0, 10.0, 11.0, 12.0]
GROUPS = [0, 0, 1, 1, 1]


def test_per_group_std_hand_case():
    adv = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    # group 0: mean 2, population std 1;  group 1: mean 11, population std sqrt(2/3).
    s1 = math.sqrt(2 / 3)
    expected = [-1 / (1 + EPS), 1 / (1 + EPS), -1 / (s1 + EPS), 0.0, 1 / (s1 + EPS)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_global_std_hand_case():
    adv = group_advantages(np.array(REWARDS), np.array(GROUPS), std="global")
    # Batch mean 7.4; squared deviations 40.96 + 19.36 + 6.76 + 12.96 + 21.16 = 101.2; population var 20.24.
    s = math.sqrt(20.24)
    expected = [-1 / (s + EPS), 1 / (s + EPS), -1 / (s + EPS), 0.0, 1 / (s + EPS)]  # group means, global std
    assert isinstance(adv, torch.Tensor)
    assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_group_order_and_ids_arbitrary():
    # Interleaved, non-contiguous ids give the same per-sample result.
    perm = [3, 0, 4, 2, 1]
    r = torch.tensor(REWARDS, dtype=torch.float64)
    g = torch.tensor([7, 7, -2, -2, -2])
    a = group_advantages(r, g)
    b = group_advantages(r[perm], g[perm])
    torch.testing.assert_close(a[perm], b, atol=1e-15, rtol=1e-15)  # group sums in another order: last-bit rounding


@pytest.mark.parametrize("std", ["group", "global"])
def test_columns_normalised_independently(std):
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(12, 3)))
    gid = torch.arange(12) // 4
    a = group_advantages(x, gid, std=std)
    assert a.shape == (12, 3)
    for s in range(3):
        assert torch.allclose(a[:, s], group_advantages(x[:, s], gid, std=std), rtol=0, atol=1e-15)
    # Changing one column leaves the others untouched.
    y = x.clone()
    y[:, 2] = y[:, 2] * 100 + 5
    b = group_advantages(y, gid, std=std)
    assert torch.equal(a[:, :2], b[:, :2])


def test_size_one_group_is_zero():
    r = torch.tensor([1.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 1])
    for std in ("group", "global"):
        adv = group_advantages(r, g, std=std)
        assert adv[2].item() == 0.0
        assert adv[0].item() < 0 < adv[1].item()


def test_constant_group_is_zero_and_eps_zero_safe():
    r = torch.tensor([0.5, 0.5, 0.5, 1.0, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    adv = group_advantages(r, g, eps=0.0)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].tolist() == pytest.approx([-1.0, 1.0])


def test_clip():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    g = torch.zeros(8, dtype=torch.long)
    unclipped = group_advantages(r, g)
    assert unclipped.max().item() > 2.5
    clipped = group_advantages(r, g, clip=1.5)
    assert clipped.max().item() == pytest.approx(1.5)
    assert torch.allclose(clipped[:7], unclipped[:7])  # within range: unchanged


def test_dtype_preserved():
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.float32), torch.tensor([0, 0])).dtype == torch.float32
    assert group_advantages(np.array([1, 2]), np.array([0, 0])).dtype == torch.get_default_dtype()


def test_validation():
    r = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, torch.tensor([0, 0]), std="batch")
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="clip"):
        group_advantages(r, torch.tensor([0, 0]), clip=0)


def test_nonzero_mask():
    adv = torch.tensor([[0.0, 0.0], [0.0, -0.3], [1.0, 0.0], [0.0, 0.0]])
    assert nonzero_advantage_mask(adv).tolist() == [False, True, True, False]
    assert nonzero_advantage_mask(np.array([0.0, 2.0, -1.0])).tolist() == [False, True, True]
    # Constant groups give all-zero advantages → droppable.
    a = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert nonzero_advantage_mask(a).tolist() == [False, False, True, True]


def test_combine_advantages_hand_case_and_differs_from_reward_sum():
    # One group of two. Reward "a" has a large scale, "b" a small one pointing the other way.
    a = torch.tensor([0.0, 100.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gid = torch.tensor([0, 0])
    comb = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, gid)
    # a: mean 50, std 50 → ∓50/(50+eps); b: mean .5, std .5 → ±.5/(.5+eps).
    expected = [-50 / (50 + EPS) + 0.5 / (0.5 + EPS), 50 / (50 + EPS) - 0.5 / (0.5 + EPS)]
    assert comb.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert abs(comb[0].item()) < 1e-3
    # Reward-level aggregation: (a + b) = [1, 100] → about [−1, +1]: different.
    reward_level = group_advantages(a + b, gid)
    assert reward_level.tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    assert not torch.allclose(comb, reward_level, atol=0.5)


def test_combine_advantages_weights():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=8), rng.normal(size=8)
    gid = np.arange(8) // 4
    comb = combine_advantages({"a": a, "b": b}, {"a": 0.7, "b": -0.2}, gid, std="global")
    expected = 0.7 * group_advantages(a, gid, std="global") - 0.2 * group_advantages(b, gid, std="global")
    assert torch.allclose(comb, expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="keys"):
        combine_advantages({"a": a, "b": b}, {"a": 1.0}, gid)
    with pytest.raises(ValueError, match="empty"):
        combine_advantages({}, {}, gid)
