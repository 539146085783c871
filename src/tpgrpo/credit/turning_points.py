"""TP-GRPO credit assignment: incremental rewards, turning points, balancing (docs/design.md §3.4).

Notation (one trajectory, SDE window of W steps): ``R_k`` is the reward of the ODE completion of the state after
k window steps, k = 0 … W (``R_W`` is the trajectory's own final reward). For window step t = 1 … W:

- incremental reward  ``r_t = R_t − R_{t−1}``;
- aggregated reward   ``g_t = R_W − R_{t−1}``;
- overall direction   ``D = sign(R_W − R_0)``.

All tensors here are batched over N trajectories: ``R`` has shape ``[N, W+1]`` and every per-step output has shape
``[N, W]``, column ``t−1`` holding window step ``t``. Functions are pure; they accept torch tensors or numpy
arrays and return torch tensors. Sign tests are done in float64 so that equal rewards give exact zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "incremental_and_aggregated",
    "turning_point_rewards",
    "balance_turning_points",
    "turning_point_stats",
    "RANK_BY",
]

#: Ranking rules accepted by :func:`balance_turning_points`.
RANK_BY = ("trajectory", "aggregated")


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # pragma: no cover - defensive
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to a tensor") from exc


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _check_rewards(R: Any) -> torch.Tensor:
    R = _as_tensor(R, "R")
    if R.dim() != 2 or R.shape[1] < 2:
        raise ValueError(
            f"R must have shape [N, W+1] with W >= 1 (rewards R_0 … R_W per trajectory), got {tuple(R.shape)}"
        )
    if R.is_complex() or R.dtype == torch.bool:
        raise ValueError(f"R must be a real-valued tensor, got dtype {R.dtype}")
    if R.is_floating_point() and not bool(torch.isfinite(R).all()):
        raise ValueError("R contains non-finite values (nan/inf)")
    return R


def incremental_and_aggregated(R: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Incremental and aggregated step rewards (docs/design.md §3.4).

    Args:
        R: ``[N, W+1]`` rewards ``R_0 … R_W`` of the ODE completions after 0 … W window steps.

    Returns:
        ``(r, g)``, both ``[N, W]``: ``r[:, t−1] = R_t − R_{t−1}`` and ``g[:, t−1] = R_W − R_{t−1}``.
        Floating inputs keep their dtype; integer inputs give the default float dtype.
    """
    R = _check_rewards(R)
    out_dtype = _float_dtype(R)
    R64 = R.to(torch.float64)
    r = R64[:, 1:] - R64[:, :-1]
    g = R64[:, -1:] - R64[:, :-1]
    return r.to(out_dtype), g.to(out_dtype)


def turning_point_rewards(
    R: Any, *, consistent: bool = True, first_step: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step TP-GRPO rewards and the turning-point mask (docs/design.md §3.4).

    Turning point (Definition 4.1), t ≥ 2: ``sign(r_{t−1})·D < 0`` and ``sign(r_t)·D > 0``. A zero never
    qualifies (sign 0 fails both strict inequalities), and ``D = 0`` (``R_W = R_0``) means no turning points.

    ``consistent=True`` (the paper's main rule) additionally requires ``sign(r_t) = sign(R_W − R_t)``,
    equivalently ``sign(g_t) = sign(r_t)`` and ``|g_t| > |r_t|``; the last window step therefore never
    qualifies (``R_W − R_W = 0``).

    ``first_step=True`` applies the first-step rule: step 1 qualifies if ``sign(r_1)·D > 0`` (consistent
    variant: also ``sign(r_1) = sign(R_W − R_1)``); its aggregated reward is ``g_1 = R_W − R_0``.

    Assignment: a turning point's per-step reward is ``g_t`` (replacing ``r_t``); all other steps keep ``r_t``.

    Args:
        R: ``[N, W+1]`` rewards ``R_0 … R_W``.
        consistent: use the consistent-turning-point rule (default) instead of plain Definition 4.1.
        first_step: apply the first-step rule (default); if False step 1 is never a turning point.

    Returns:
        ``(step_rewards [N, W], is_turning_point [N, W] bool)``.
    """
    R = _check_rewards(R)
    out_dtype = _float_dtype(R)
    R64 = R.to(torch.float64)
    r, g = incremental_and_aggregated(R64)  # float64: equal R entries give exact 0
    s = torch.sign(r)  # sign(r_t)
    D = torch.sign(R64[:, -1:] - R64[:, :1])  # [N, 1]
    after = torch.sign(R64[:, -1:] - R64[:, 1:])  # sign(R_W − R_t), t = 1 … W

    is_tp = torch.zeros_like(r, dtype=torch.bool)
    # t >= 2: previous step against D, this step with D (column t-1 <-> step t).
    is_tp[:, 1:] = (s[:, :-1] * D < 0) & (s[:, 1:] * D > 0)
    if first_step:
        is_tp[:, 0] = (s[:, 0] * D[:, 0]) > 0
    if consistent:
        is_tp &= (s == after) & (s != 0)

    step_rewards = torch.where(is_tp, g, r)
    return step_rewards.to(out_dtype), is_tp


def balance_turning_points(
    step_rewards: Any,
    is_turning_point: Any,
    r: Any,
    R: Any,
    *,
    scope_ids: Any,
    rank_by: str = "trajectory",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance positive and negative turning points within each scope (docs/design.md §3.4, "Balancing").

    Within each balancing scope (all trajectories sharing a ``scope_ids`` value: a sampling micro-batch, a
    prompt group, or the whole batch), consider every turning point (trajectory, step). Its sign is the sign of
    its assigned (aggregated) reward ``g_t = step_rewards[n, t−1]``. If turning points of both signs exist, the
    ``k = min(#positive, #negative)`` largest of each sign are kept and the rest revert to ``r_t`` (and leave
    the mask); if all share one sign, all are kept. Turning points whose aggregated reward is exactly 0 (possible
    only under plain Definition 4.1) belong to neither sign: they are neither counted nor reverted.

    Ranking (largest first): ``rank_by="trajectory"`` (the reference's rule, default) ranks by ``|R_W − R_0|``
    of the trajectory the turning point belongs to; ``rank_by="aggregated"`` ranks by ``|g_t|``. Ties are broken
    deterministically: the earlier (trajectory, step) in row-major order wins.

    Args:
        step_rewards: ``[N, W]`` per-step rewards from :func:`turning_point_rewards`.
        is_turning_point: ``[N, W]`` bool mask from :func:`turning_point_rewards`.
        r: ``[N, W]`` incremental rewards (what reverted turning points get back).
        R: ``[N, W+1]`` rewards ``R_0 … R_W`` (for the ``trajectory`` ranking).
        scope_ids: ``[N]`` integer scope id of each trajectory.
        rank_by: ``"trajectory"`` or ``"aggregated"``.

    Returns:
        ``(balanced_rewards [N, W], balanced_mask [N, W] bool)``.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    step_rewards = _as_tensor(step_rewards, "step_rewards")
    mask = _as_tensor(is_turning_point, "is_turning_point")
    r = _as_tensor(r, "r")
    R = _check_rewards(R)
    scope_ids = _as_tensor(scope_ids, "scope_ids")

    if step_rewards.dim() != 2:
        raise ValueError(f"step_rewards must have shape [N, W], got {tuple(step_rewards.shape)}")
    N, W = step_rewards.shape
    if mask.dtype != torch.bool:
        raise ValueError(f"is_turning_point must be a bool tensor, got dtype {mask.dtype}")
    for name, t in (("is_turning_point", mask), ("r", r)):
        if tuple(t.shape) != (N, W):
            raise ValueError(f"{name} must have shape {(N, W)} like step_rewards, got {tuple(t.shape)}")
    if tuple(R.shape) != (N, W + 1):
        raise ValueError(f"R must have shape {(N, W + 1)} (step_rewards has W={W}), got {tuple(R.shape)}")
    if scope_ids.dim() != 1 or scope_ids.shape[0] != N:
        raise ValueError(f"scope_ids must have shape [{N}], got {tuple(scope_ids.shape)}")
    if scope_ids.is_floating_point() or scope_ids.is_complex() or scope_ids.dtype == torch.bool:
        raise ValueError(f"scope_ids must be an integer tensor, got dtype {scope_ids.dtype}")

    out_dtype = _float_dtype(step_rewards)
    sr64 = step_rewards.to(torch.float64)
    R64 = R.to(torch.float64)
    flat_mask = mask.reshape(-1)
    flat_sr = sr64.reshape(-1)
    if rank_by == "trajectory":
        key = (R64[:, -1] - R64[:, 0]).abs().unsqueeze(1).expand(N, W).reshape(-1)
    else:
        key = flat_sr.abs()
    scope_flat = scope_ids.to(torch.long).unsqueeze(1).expand(N, W).reshape(-1)

    revert = torch.zeros_like(flat_mask)
    for scope in torch.unique(scope_ids.to(torch.long)):
        in_scope = flat_mask & (scope_flat == scope)
        pos = torch.nonzero(in_scope & (flat_sr > 0)).reshape(-1)  # ascending flat index
        neg = torch.nonzero(in_scope & (flat_sr < 0)).reshape(-1)
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        k = min(pos.numel(), neg.numel())
        for idx in (pos, neg):
            order = torch.sort(key[idx], descending=True, stable=True).indices
            revert[idx[order[k:]]] = True

    revert = revert.reshape(N, W)
    balanced = torch.where(revert, r.to(torch.float64), sr64).to(out_dtype)
    return balanced, mask & ~revert


def turning_point_stats(
    is_tp_before: Any, is_tp_after: Any, step_rewards_before: Any, r: Any, g: Any
) -> dict[str, Any]:
    """Diagnostics for logging (plain Python numbers and lists).

    Keys: ``tp_rate_per_step`` / ``tp_rate_per_step_after`` (fraction of trajectories whose step t is a turning
    point, before/after balancing), ``tp_rate`` (overall, before), ``num_pos_before`` / ``num_neg_before`` /
    ``num_pos_after`` / ``num_neg_after`` (turning points by sign of their assigned reward),
    ``mean_abs_r_per_step`` and ``mean_abs_g_per_step`` (mean ``|r_t|`` and ``|g_t|`` over trajectories),
    ``r_zero_per_step`` (fraction of trajectories whose incremental reward ``r_t`` is exactly 0: two completions
    scored the same, as a reward with few levels often does; a zero never makes a turning point).
    """
    before = _as_tensor(is_tp_before, "is_tp_before").bool()
    after = _as_tensor(is_tp_after, "is_tp_after").bool()
    sr = _as_tensor(step_rewards_before, "step_rewards_before").to(torch.float64)
    r = _as_tensor(r, "r").to(torch.float64)
    g = _as_tensor(g, "g").to(torch.float64)
    shape = tuple(sr.shape)
    if len(shape) != 2 or any(tuple(t.shape) != shape for t in (before, after, r, g)):
        raise ValueError("turning_point_stats: all inputs must share one [N, W] shape")
    return {
        "tp_rate_per_step": before.double().mean(0).tolist(),
        "tp_rate_per_step_after": after.double().mean(0).tolist(),
        "tp_rate": float(before.double().mean()) if before.numel() else 0.0,
        "num_pos_before": int((before & (sr > 0)).sum()),
        "num_neg_before": int((before & (sr < 0)).sum()),
        "num_pos_after": int((after & (sr > 0)).sum()),
        "num_neg_after": int((after & (sr < 0)).sum()),
        "mean_abs_r_per_step": r.abs().mean(0).tolist(),
        "mean_abs_g_per_step": g.abs().mean(0).tolist(),
        "r_zero_per_step": (r == 0).double().mean(0).tolist(),
    }
