"""Clipped policy loss and KL (docs/design.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tpgrpo.loss import clipped_policy_loss, grpo_step_loss, kl_penalty


def _logp_for_ratio(ratios, logp_old):
    return torch.tensor([math.log(r) for r in ratios], dtype=torch.float64) + logp_old


def test_ratio_one_gives_minus_clamped_advantage():
    logp = torch.tensor([-1.0, 0.3, 2.0, -0.5, 0.0], dtype=torch.float64)
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    loss, info = clipped_policy_loss(logp, logp.clone(), adv, 1e-4)
    assert loss.tolist() == pytest.approx([5.0, 1.0, 0.0, -2.0, -5.0])
    assert info["ratio"].tolist() == [1.0] * 5
    assert info["clipfrac"].item() == 0.0
    assert info["approx_kl"].item() == 0.0


@pytest.mark.parametrize(
    "adv, ratio, expected",
    [
        (1.0, 1.5, -1.2),  # A > 0, above 1+ε: clipped (no extra credit for moving further)
        (1.0, 0.5, -0.5),  # A > 0, below 1−ε: unclipped (pessimistic)
        (1.0, 1.1, -1.1),  # inside
        (-1.0, 1.5, 1.5),  # A < 0, above 1+ε: unclipped (pessimistic)
        (-1.0, 0.5, 0.8),  # A < 0, below 1−ε: clipped
        (-1.0, 0.9, 0.9),  # inside
        (2.0, 1.5, -2.4),
    ],
)
def test_clipping_hand_cases(adv, ratio, expected):
    old = torch.tensor([0.25], dtype=torch.float64)
    loss, info = clipped_policy_loss(_logp_for_ratio([ratio], old), old, torch.tensor([adv]), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert info["clipfrac"].item() == (1.0 if abs(ratio - 1) > 0.2 else 0.0)


def test_adv_clip_max():
    logp = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([-20.0, 3.0, 20.0], dtype=torch.float64)
    loss, _ = clipped_policy_loss(logp, logp, adv, 0.1, adv_clip_max=2.5)
    assert loss.tolist() == pytest.approx([2.5, -2.5, -2.5])
    loss, _ = clipped_policy_loss(logp, logp, adv, 0.1, adv_clip_max=None)
    assert loss.tolist() == pytest.approx([20.0, -3.0, -20.0])
    loss, _ = clipped_policy_loss(logp, logp, adv, 0.1)  # default 5
    assert loss.tolist() == pytest.approx([5.0, -3.0, -5.0])


def test_weights_multiply_policy_term():
    old = torch.zeros(3, dtype=torch.float64)
    logp = _logp_for_ratio([1.5, 0.5, 1.05], old)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    base, _ = clipped_policy_loss(logp, old, adv, 0.2)
    weighted, _ = clipped_policy_loss(logp, old, adv, 0.2, weights=w)
    assert torch.allclose(weighted, base * w)
    assert weighted.tolist() == pytest.approx([0.5 * -1.2, 2.0 * 0.8, 1.5 * -2.1])


def test_ppo_gradient_property():
    # Rows: (A, ρ) = (+1, 1.5) clipped, (−1, 0.5) clipped, (+1, 0.5) unclipped, (−1, 1.5) unclipped, (+1, 1.1) inside.
    old = torch.zeros(5, dtype=torch.float64)
    logp = _logp_for_ratio([1.5, 0.5, 0.5, 1.5, 1.1], old).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    loss, info = clipped_policy_loss(logp, old, adv, 0.2)
    loss.sum().backward()
    # d/dlogp of −A·ρ is −A·ρ; zero where the clipped branch is active.
    expected = [0.0, 0.0, -0.5, 1.5, -1.1]
    assert logp.grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert info["clipfrac"].item() == pytest.approx(4 / 5)
    assert not info["ratio"].requires_grad


def test_old_logp_and_advantages_carry_no_gradient():
    logp = torch.zeros(2, requires_grad=True)
    old = torch.zeros(2, requires_grad=True)
    adv = torch.ones(2, requires_grad=True)
    loss, _ = clipped_policy_loss(logp, old, adv, 0.2)
    loss.sum().backward()
    assert old.grad is None and adv.grad is None
    assert logp.grad is not None


def test_numpy_inputs():
    loss, info = clipped_policy_loss(np.zeros(2), np.zeros(2), np.array([1.0, -2.0]), 1e-4)
    assert isinstance(loss, torch.Tensor)
    assert loss.tolist() == pytest.approx([-1.0, 2.0])


def test_grpo_step_loss_kl_unweighted():
    old = torch.zeros(2, dtype=torch.float64)
    logp = old.clone()
    adv = torch.tensor([1.0, -3.0], dtype=torch.float64)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    kl = torch.tensor([0.4, 0.2], dtype=torch.float64)
    total, info = grpo_step_loss(logp, old, adv, 1e-4, kl=kl, beta=0.1, weights=w)
    policy = ((-1.0 * 2.0) + (3.0 * 0.5)) / 2  # −0.25
    assert info["policy_loss"].item() == pytest.approx(policy)
    assert info["kl_loss"].item() == pytest.approx(0.3)
    assert total.item() == pytest.approx(policy + 0.1 * 0.3)  # KL not multiplied by w
    assert kl_penalty(kl, 0.1).item() == pytest.approx(0.03)
    total0, _ = grpo_step_loss(logp, old, adv, 1e-4)
    assert total0.item() == pytest.approx((-1.0 + 3.0) / 2)
    with pytest.raises(ValueError, match="kl"):
        grpo_step_loss(logp, old, adv, 1e-4, beta=0.1)


def test_validation():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(z, z, z, 0.0)
    with pytest.raises(ValueError, match="adv_clip_max"):
        clipped_policy_loss(z, z, z, 0.1, adv_clip_max=-1.0)
