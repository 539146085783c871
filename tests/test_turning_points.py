"""TP-GRPO credit assignment, tested from the definitions in docs/design.md §3.4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpgrpo.credit import (
    balance_turning_points,
    incremental_and_aggregated,
    turning_point_rewards,
    turning_point_stats,
)

# docs/design.md §3.4 worked example, W = 9.
EXAMPLE_R = [0.80, 0.78, 0.83, 0.85, 0.84, 0.86, 0.87, 0.87, 0.88, 0.90]
EXAMPLE_r = [-0.02, 0.05, 0.02, -0.01, 0.02, 0.01, 0.0, 0.01, 0.02]


def _brute_force(R_row, *, consistent, first_step):
    """Loop-by-loop reading of docs/design.md §3.4 for one trajectory (float64)."""
    R_row = [float(v) for v in R_row]
    W = len(R_row) - 1
    sgn = lambda v: (v > 0) - (v < 0)  # noqa: E731
    r = [R_row[t] - R_row[t - 1] for t in range(1, W + 1)]
    g = [R_row[W] - R_row[t - 1] for t in range(1, W + 1)]
    D = sgn(R_row[W] - R_row[0])
    tp = []
    for t in range(1, W + 1):
        if t == 1:
            ok = first_step and sgn(r[0]) * D > 0
        else:
            ok = sgn(r[t - 2]) * D < 0 and sgn(r[t - 1]) * D > 0
        if ok and consistent:
            ok = sgn(r[t - 1]) != 0 and sgn(r[t - 1]) == sgn(R_row[W] - R_row[t])
        tp.append(bool(ok))
    rewards = [g[i] if tp[i] else r[i] for i in range(W)]
    return rewards, tp


# ----------------------------------------------------------------------------------------------- worked example
def test_worked_example_consistent():
    R = torch.tensor([EXAMPLE_R], dtype=torch.float64)
    r, g = incremental_and_aggregated(R)
    assert torch.allclose(r[0], torch.tensor(EXAMPLE_r, dtype=torch.float64), atol=1e-12)
    assert r[0, 6].item() == 0.0  # .87 − .87 is an exact zero
    sr, tp = turning_point_rewards(R, consistent=True)
    expected = [-0.02, 0.12, 0.02, -0.01, 0.06, 0.01, 0.0, 0.01, 0.02]
    assert torch.allclose(sr[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert tp[0].tolist() == [False, True, False, False, True, False, False, False, False]
    # Steps 2 and 5 get .90 − .78 and .90 − .84.
    assert sr[0, 1].item() == pytest.approx(0.12, abs=1e-12)
    assert sr[0, 4].item() == pytest.approx(0.06, abs=1e-12)


def test_worked_example_definition_4_1():
    # By hand, D = +1, signs of r_1 … r_9 = [−, +, +, −, +, +, 0, +, +]:
    #   step 1: first-step rule needs sign(r_1)·D > 0; r_1 < 0 → no.
    #   step 2: r_1 < 0, r_2 > 0 → yes.      step 3: r_2 > 0 → no.     step 4: r_4 < 0 → no.
    #   step 5: r_4 < 0, r_5 > 0 → yes.      step 6: r_5 > 0 → no.     step 7: r_7 = 0 → no.
    #   step 8: r_7 = 0 (sign 0 fails "< 0") → no.                     step 9: r_8 > 0 → no.
    # So Definition 4.1 picks exactly the same steps {2, 5} here, with the same rewards.
    sr, tp = turning_point_rewards(np.array([EXAMPLE_R]), consistent=False)
    assert tp[0].tolist() == [False, True, False, False, True, False, False, False, False]
    assert sr[0, 1].item() == pytest.approx(0.12, abs=1e-12)
    assert sr[0, 4].item() == pytest.approx(0.06, abs=1e-12)


def test_worked_example_float32_input_keeps_exact_zero():
    sr, tp = turning_point_rewards(torch.tensor([EXAMPLE_R], dtype=torch.float32))
    assert sr.dtype == torch.float32
    assert sr[0, 6].item() == 0.0
    assert tp[0].tolist() == [False, True, False, False, True, False, False, False, False]


# ------------------------------------------------------------------------------------------------- hand cases
def test_definition_4_1_vs_consistent_differ():
    # r = [−1, 2, −.5], D = +1. Step 2 turns with D (Def. 4.1) but what follows goes down (R_3 − R_2 < 0),
    # so it is not consistent. g_2 = .5 − (−1) = 1.5.
    R = torch.tensor([[0.0, -1.0, 1.0, 0.5]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R, consistent=False)
    assert tp[0].tolist() == [False, True, False]
    assert sr[0].tolist() == pytest.approx([-1.0, 1.5, -0.5])
    sr, tp = turning_point_rewards(R, consistent=True)
    assert tp[0].tolist() == [False, False, False]
    assert sr[0].tolist() == pytest.approx([-1.0, 2.0, -0.5])


def test_last_step_definition_4_1_only():
    # r = [1, −.5, 1.5], D = +1: step 3 is a Def. 4.1 turning point (g_3 = r_3), never a consistent one.
    R = torch.tensor([[0.0, 1.0, 0.5, 2.0]], dtype=torch.float64)
    _, tp41 = turning_point_rewards(R, consistent=False, first_step=False)
    _, tpc = turning_point_rewards(R, consistent=True, first_step=False)
    assert tp41[0].tolist() == [False, False, True]
    assert tpc[0].tolist() == [False, False, False]


@pytest.mark.parametrize("consistent", [True, False])
def test_zeros_never_qualify(consistent):
    # r = [0, 1, 1]: step 1 has sign 0 (fails first-step rule), step 2's predecessor has sign 0.
    R = torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    # Row 1: r = [−1, 0, 2]: step 2 has r_2 = 0 → no; step 3's predecessor r_2 = 0 → no.
    sr, tp = turning_point_rewards(R, consistent=consistent)
    assert not tp.any()
    r, _ = incremental_and_aggregated(R)
    assert torch.equal(sr, r)


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("first_step", [True, False])
def test_no_direction_no_turning_points(consistent, first_step):
    # R_W == R_0 → D = 0 → no turning points; rewards are the incremental ones.
    R = torch.tensor([[0.3, 0.1, 0.5, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R, consistent=consistent, first_step=first_step)
    assert not tp.any()
    r, _ = incremental_and_aggregated(R)
    assert torch.equal(sr, r)


def test_first_step_rule_on_off():
    # r = [.1, .1, .1], D = +1, R_W − R_1 = .2 > 0: step 1 qualifies with g_1 = R_W − R_0 = .3.
    R = torch.tensor([[0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R, first_step=True)
    assert tp[0].tolist() == [True, False, False]
    assert sr[0].tolist() == pytest.approx([0.3, 0.1, 0.1])
    sr, tp = turning_point_rewards(R, first_step=False)
    assert tp[0].tolist() == [False, False, False]
    assert sr[0].tolist() == pytest.approx([0.1, 0.1, 0.1])
    # Consistent variant: step 1 with D but followed by a fall to R_W < R_1 → not consistent, Def. 4.1 yes.
    R = torch.tensor([[0.0, 0.5, 0.2]], dtype=torch.float64)
    _, tpc = turning_point_rewards(R, consistent=True)
    _, tp41 = turning_point_rewards(R, consistent=False)
    assert tpc[0].tolist() == [False, False]
    assert tp41[0].tolist() == [True, False]


def test_single_step_window():
    R = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R, consistent=True)
    assert not tp.any()  # the only step is the last step
    sr, tp = turning_point_rewards(R, consistent=False)
    assert tp[:, 0].tolist() == [True, True, False]
    assert sr[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0])  # g_1 = r_1 when W = 1


def test_negative_direction():
    # Mirror of the worked example: D = −1, steps 2 and 5 turn downwards.
    R = -torch.tensor([EXAMPLE_R], dtype=torch.float64)
    sr, tp = turning_point_rewards(R)
    assert tp[0].tolist() == [False, True, False, False, True, False, False, False, False]
    assert sr[0, 1].item() == pytest.approx(-0.12, abs=1e-12)
    assert sr[0, 4].item() == pytest.approx(-0.06, abs=1e-12)


# -------------------------------------------------------------------------------------------------- properties
def _random_R(seed, n=3000, w=9, quantise=True):
    rng = np.random.default_rng(seed)
    R = rng.random((n, w + 1))
    if quantise:  # coarse values make ties, zeros and D = 0 common
        R = np.round(R * 4) / 4
    return R


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("first_step", [True, False])
def test_matches_brute_force_reading(seed, consistent, first_step):
    R = _random_R(seed, n=400, w=6, quantise=seed != 2)
    sr, tp = turning_point_rewards(R, consistent=consistent, first_step=first_step)
    for n in range(R.shape[0]):
        rewards, mask = _brute_force(R[n], consistent=consistent, first_step=first_step)
        assert tp[n].tolist() == mask
        assert sr[n].tolist() == pytest.approx(rewards, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("quantise", [True, False])
def test_random_properties(seed, quantise):
    R = _random_R(seed, quantise=quantise)
    r, g = incremental_and_aggregated(R)
    sr_c, tp_c = turning_point_rewards(R, consistent=True)
    sr_d, tp_d = turning_point_rewards(R, consistent=False)
    assert sr_c.shape == tp_c.shape == r.shape == (R.shape[0], R.shape[1] - 1)
    assert tp_c.any()  # the property is not vacuous
    # The last window step never turns under the consistent rule.
    assert not tp_c[:, -1].any()
    # Every consistent turning point has sign(g) = sign(r) and |g| > |r|.
    assert torch.equal(torch.sign(g[tp_c]), torch.sign(r[tp_c]))
    assert bool((g[tp_c].abs() > r[tp_c].abs()).all())
    # Consistent ⊂ Definition 4.1 (t ≥ 2), and the first-step rule likewise.
    assert not (tp_c & ~tp_d).any()
    # Assignment: turning points get g_t, the rest keep r_t.
    assert torch.equal(sr_c, torch.where(tp_c, g, r))
    assert torch.equal(sr_d, torch.where(tp_d, g, r))
    # D = 0 rows have no turning points.
    flat = torch.as_tensor(R[:, -1] == R[:, 0])
    assert not tp_d[flat].any()


def test_numpy_input_and_shapes():
    R = np.array([EXAMPLE_R, EXAMPLE_R[::-1]])
    sr, tp = turning_point_rewards(R)
    assert isinstance(sr, torch.Tensor) and isinstance(tp, torch.Tensor)
    assert sr.shape == (2, 9) and tp.shape == (2, 9)
    assert sr.dtype == torch.float64 and tp.dtype == torch.bool
    r, g = incremental_and_aggregated(R.tolist())
    assert r.shape == g.shape == (2, 9)
    assert g[0, 0].item() == pytest.approx(0.10)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((3, 1)), np.zeros((2, 3, 4)), np.array([[0.0, np.nan]])])
def test_bad_R_rejected(bad):
    with pytest.raises(ValueError):
        turning_point_rewards(bad)


# -------------------------------------------------------------------------------------------------- balancing
def _balancing_case():
    """Two positive turning points and one negative, W = 4, first_step=False.

    A: R = [0, −1, .5, .8, 1]   r = [−1, 1.5, .3, .2]   step 2 TP, g = 2.0,   |R_W − R_0| = 1
    B: R = [0, 2, 1.5, 2.8, 3]  r = [2, −.5, 1.3, .2]   step 3 TP, g = 1.5,   |R_W − R_0| = 3
    C: R = [0, 1, −1, −1.5, −2] r = [1, −2, −.5, −.5]   step 2 TP, g = −3.0,  |R_W − R_0| = 2
    """
    R = torch.tensor(
        [[0, -1, 0.5, 0.8, 1.0], [0, 2, 1.5, 2.8, 3.0], [0, 1, -1, -1.5, -2.0]], dtype=torch.float64
    )
    sr, tp = turning_point_rewards(R, first_step=False)
    assert tp.tolist() == [
        [False, True, False, False],
        [False, False, True, False],
        [False, True, False, False],
    ]
    assert sr[0, 1].item() == pytest.approx(2.0)
    assert sr[1, 2].item() == pytest.approx(1.5)
    assert sr[2, 1].item() == pytest.approx(-3.0)
    r, _ = incremental_and_aggregated(R)
    return R, sr, tp, r


def test_balancing_rank_by_trajectory_vs_aggregated():
    R, sr, tp, r = _balancing_case()
    scope = torch.zeros(3, dtype=torch.long)
    # k = min(2, 1) = 1. By |R_W − R_0|: B (3) beats A (1) → A reverts.
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=scope, rank_by="trajectory")
    assert mask.tolist() == [[False] * 4, [False, False, True, False], [False, True, False, False]]
    assert bal[0, 1].item() == pytest.approx(1.5)  # back to r_2
    assert bal[1, 2].item() == pytest.approx(1.5)
    assert bal[2, 1].item() == pytest.approx(-3.0)
    # By |g_t|: A (2.0) beats B (1.5) → B reverts.
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=scope, rank_by="aggregated")
    assert mask.tolist() == [[False, True, False, False], [False] * 4, [False, True, False, False]]
    assert bal[0, 1].item() == pytest.approx(2.0)
    assert bal[1, 2].item() == pytest.approx(1.3)  # back to r_3
    # Non-turning-point entries never change.
    assert torch.equal(bal[~tp], sr[~tp])


def test_balancing_default_is_reference_rule():
    R, sr, tp, r = _balancing_case()
    scope = np.zeros(3, dtype=np.int64)
    a = balance_turning_points(sr, tp, r, R, scope_ids=scope)
    b = balance_turning_points(sr, tp, r, R, scope_ids=scope, rank_by="trajectory")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_balancing_scopes_are_independent():
    R, sr, tp, r = _balancing_case()
    # {A, B} only positive and {C} only negative: each scope has one sign → all kept.
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.tensor([0, 0, 1]))
    assert torch.equal(mask, tp) and torch.equal(bal, sr)
    # {A, C} mixed (k = 1, both kept), {B} alone → all kept.
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.tensor([0, 1, 0]))
    assert torch.equal(mask, tp) and torch.equal(bal, sr)
    # Results for a scope do not depend on other scopes' contents.
    R2 = torch.cat([R, R])
    sr2, tp2, r2 = torch.cat([sr, sr]), torch.cat([tp, tp]), torch.cat([r, r])
    bal2, mask2 = balance_turning_points(sr2, tp2, r2, R2, scope_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    bal1, mask1 = balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3, dtype=torch.long))
    assert torch.equal(bal2, torch.cat([bal1, bal1])) and torch.equal(mask2, torch.cat([mask1, mask1]))
    # One scope over all six: k = min(4, 2) = 2 → both copies of B kept, both copies of A reverted.
    bal6, mask6 = balance_turning_points(sr2, tp2, r2, R2, scope_ids=torch.zeros(6, dtype=torch.long))
    assert torch.equal(mask6, mask2)


def test_balancing_all_same_sign_keeps_all():
    R = torch.tensor([EXAMPLE_R, EXAMPLE_R, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R)
    r, _ = incremental_and_aggregated(R)
    assert int(tp.sum()) == 5
    for rank_by in ("trajectory", "aggregated"):
        bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3, dtype=torch.long), rank_by=rank_by)
        assert torch.equal(mask, tp) and torch.equal(bal, sr)


def test_balancing_ties_are_deterministic():
    # Two identical positive trajectories and one negative: k = 1, the earlier one wins under both rules.
    R = torch.tensor([EXAMPLE_R, EXAMPLE_R, [-v for v in EXAMPLE_R]], dtype=torch.float64)
    sr, tp = turning_point_rewards(R, first_step=False)
    r, _ = incremental_and_aggregated(R)
    # Per trajectory: steps 2 (g = ±.12) and 5 (g = ±.06) → 4 positive, 2 negative, k = 2.
    for rank_by, kept_pos in (("trajectory", [(0, 1), (0, 4)]), ("aggregated", [(0, 1), (1, 1)])):
        bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3, dtype=torch.long), rank_by=rank_by)
        pos_kept = [tuple(ix) for ix in torch.nonzero(mask[:2]).tolist()]
        assert pos_kept == kept_pos, rank_by
        assert mask[2].tolist() == tp[2].tolist()
        assert torch.equal(bal, torch.where(tp & ~mask, r, sr))


def test_balancing_zero_aggregated_turning_point_untouched():
    # Def. 4.1: R = [0, 3, 2, 2.5, 2], r = [3, −1, .5, −.5], D = +1, step 3 turns with g_3 = 2 − 2 = 0.
    R = torch.tensor([[0.0, 3.0, 2.0, 2.5, 2.0], [0.0, 1.0, -1.0, -1.5, -2.0], [0.0, -1.0, 0.5, 0.8, 1.0]],
                     dtype=torch.float64)
    sr, tp = turning_point_rewards(R, consistent=False, first_step=False)
    assert tp[0].tolist() == [False, False, True, False] and sr[0, 2].item() == 0.0
    r, _ = incremental_and_aggregated(R)
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3, dtype=torch.long))
    assert torch.equal(mask, tp) and torch.equal(bal, sr)  # one positive, one negative, zero untouched


def test_balancing_balances_counts_random():
    R = _random_R(5, n=240)
    sr, tp = turning_point_rewards(R)
    r, _ = incremental_and_aggregated(R)
    scope = torch.arange(240) // 24
    for rank_by in ("trajectory", "aggregated"):
        bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=scope, rank_by=rank_by)
        assert not (mask & ~tp).any()
        assert torch.equal(bal, torch.where(tp & ~mask, r, sr))
        for s in range(10):
            rows = scope == s
            npos_b = int((tp[rows] & (sr[rows] > 0)).sum())
            nneg_b = int((tp[rows] & (sr[rows] < 0)).sum())
            npos = int((mask[rows] & (sr[rows] > 0)).sum())
            nneg = int((mask[rows] & (sr[rows] < 0)).sum())
            if npos_b and nneg_b:
                assert npos == nneg == min(npos_b, nneg_b)
            else:
                assert (npos, nneg) == (npos_b, nneg_b)


def test_balancing_validation():
    R, sr, tp, r = _balancing_case()
    scope = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="rank_by"):
        balance_turning_points(sr, tp, r, R, scope_ids=scope, rank_by="magnitude")
    with pytest.raises(ValueError, match="scope_ids"):
        balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="scope_ids"):
        balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="bool"):
        balance_turning_points(sr, tp.long(), r, R, scope_ids=scope)
    with pytest.raises(ValueError, match="R must have shape"):
        balance_turning_points(sr, tp, r, R[:, :-1], scope_ids=scope)
    with pytest.raises(ValueError, match="r must have shape"):
        balance_turning_points(sr, tp, r[:2], R, scope_ids=scope)


# ------------------------------------------------------------------------------------------------------ stats
def test_turning_point_stats():
    R, sr, tp, r = _balancing_case()
    _, g = incremental_and_aggregated(R)
    bal, mask = balance_turning_points(sr, tp, r, R, scope_ids=torch.zeros(3, dtype=torch.long))
    st = turning_point_stats(tp, mask, sr, r, g)
    assert st["tp_rate_per_step"] == pytest.approx([0.0, 2 / 3, 1 / 3, 0.0])
    assert st["tp_rate_per_step_after"] == pytest.approx([0.0, 1 / 3, 1 / 3, 0.0])
    assert (st["num_pos_before"], st["num_neg_before"]) == (2, 1)
    assert (st["num_pos_after"], st["num_neg_after"]) == (1, 1)
    assert st["mean_abs_r_per_step"][0] == pytest.approx((1 + 2 + 1) / 3)
    assert st["mean_abs_g_per_step"][0] == pytest.approx((1 + 3 + 2) / 3)
    assert st["tp_rate"] == pytest.approx(3 / 12)
