"""Group-normalised advantages (docs/design.md §3.1, §3.2, §3.4).

Pure tensor functions; inputs may be torch tensors or numpy arrays, outputs are torch tensors.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["group_advantages", "nonzero_advantage_mask", "combine_advantages", "STD_MODES"]

#: Accepted values of the ``std`` argument.
STD_MODES = ("group", "global")


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _check_group_ids(group_ids: Any, n: int) -> torch.Tensor:
    gid = _as_tensor(group_ids)
    if gid.dim() != 1 or gid.shape[0] != n:
        raise ValueError(f"group_ids must have shape [{n}], got {tuple(gid.shape)}")
    if gid.is_floating_point() or gid.is_complex() or gid.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {gid.dtype}")
    return gid.to(torch.long)


def group_advantages(
    rewards: Any,
    group_ids: Any,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """GRPO advantages ``(R − mean_group) / (std + eps)`` (docs/design.md §3.1).

    Args:
        rewards: ``[N]`` (one reward per sample) or ``[N, S]`` (S columns, e.g. TP-GRPO's per-window-step rewards,
            each normalised independently — docs/design.md §3.4 "per window step").
        group_ids: ``[N]`` integer group of each sample (prompt group, TempFlow seed group, …).
        std: ``"group"`` — the std of the sample's group; ``"global"`` — the std over the whole batch, per column
            (the Flow-GRPO reference's ``global_std``). The mean is always the group's. Both are *population*
            stds (``unbiased=False``), as in the Flow-GRPO reference (numpy ``std``), unless ``unbiased``.
        eps: added to the std (1e-4 in Flow-GRPO, TP-GRPO and TempFlow-GRPO; 1e-8 in DanceGRPO). With ``eps = 0``
            a zero std gives advantage 0.
        clip: if given, clamp advantages to ``±clip``.
        unbiased: use the sample std (divide by n − 1), as DanceGRPO's ``torch.Tensor.std()`` does; a group of one
            sample then has no std and gets advantage 0.

    Returns:
        Advantages with the shape of ``rewards``. A group of size 1 gets advantage 0 (its mean is its value).
        Floating inputs keep their dtype; computation is done in float64.
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")
    x = _as_tensor(rewards)
    if x.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [N] or [N, S], got {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"rewards must be real-valued, got dtype {x.dtype}")
    out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    squeeze = x.dim() == 1
    x64 = x.detach().to(torch.float64)
    if squeeze:
        x64 = x64.unsqueeze(1)
    if not bool(torch.isfinite(x64).all()):
        raise ValueError("rewards contain non-finite values (nan/inf)")
    n = x64.shape[0]
    gid = _check_group_ids(group_ids, n).to(x64.device)
    if n == 0:
        return torch.zeros_like(x, dtype=out_dtype)

    _, inv = torch.unique(gid, return_inverse=True)
    n_groups = int(inv.max()) + 1
    counts = torch.bincount(inv, minlength=n_groups).to(torch.float64).unsqueeze(1)  # [G, 1]
    sums = torch.zeros(n_groups, x64.shape[1], dtype=torch.float64, device=x64.device).index_add_(0, inv, x64)
    centered = x64 - (sums / counts)[inv]
    if std == "group":
        sq = torch.zeros_like(sums).index_add_(0, inv, centered * centered)
        dof = (counts - 1).clamp(min=1) if unbiased else counts
        sd = torch.sqrt(sq / dof)[inv]
    else:
        sd = x64.std(dim=0, unbiased=unbiased, keepdim=True).expand_as(x64)
    denom = sd + eps
    adv = torch.where(denom > 0, centered / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    if squeeze:
        adv = adv.squeeze(1)
    return adv.to(out_dtype)


def nonzero_advantage_mask(adv: Any) -> torch.Tensor:
    """``[N]`` bool: True for samples with any nonzero advantage (docs/design.md §3.1).

    Samples whose advantages are all zero contribute nothing to the policy loss and may be dropped.
    """
    a = _as_tensor(adv)
    if a.dim() == 1:
        return a != 0
    if a.dim() == 2:
        return (a != 0).any(dim=1)
    raise ValueError(f"adv must have shape [N] or [N, S], got {tuple(a.shape)}")


def combine_advantages(
    per_reward_rewards: Mapping[str, Any],
    weights: Mapping[str, float],
    group_ids: Any,
    *,
    std: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantage-level aggregation of several rewards (DanceGRPO, docs/design.md §3.2).

    ``A = Σ_k weights[k] · group_advantages(per_reward_rewards[k], group_ids)``: each reward is normalised
    separately, then the advantages are summed with weights (instead of summing rewards first).
    ``weights`` must have exactly the keys of ``per_reward_rewards``.
    """
    if not per_reward_rewards:
        raise ValueError("combine_advantages: per_reward_rewards is empty")
    if set(per_reward_rewards) != set(weights):
        raise ValueError(
            "combine_advantages: weights must have exactly the reward names as keys; "
            f"rewards={sorted(per_reward_rewards)}, weights={sorted(weights)}"
        )
    total = None
    shape = None
    for name in sorted(per_reward_rewards):
        w = float(weights[name])
        if not math.isfinite(w):
            raise ValueError(f"combine_advantages: weight for {name!r} is not finite: {w!r}")
        a = group_advantages(per_reward_rewards[name], group_ids, std=std, eps=eps)
        if shape is None:
            shape = tuple(a.shape)
        elif tuple(a.shape) != shape:
            raise ValueError(f"combine_advantages: reward {name!r} has shape {tuple(a.shape)}, expected {shape}")
        total = w * a if total is None else total + w * a
    return total
