"""Clipped GRPO policy loss and KL penalty (docs/design.md §2).

Pure tensor functions. ``logp`` carries the gradient; ``logp_old`` and the advantages are treated as constants.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["clipped_policy_loss", "kl_penalty", "grpo_step_loss", "guard_log_ratio", "guard_step_weight"]


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def clipped_policy_loss(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    clip_range: float,
    *,
    adv_clip_max: float | None = 5.0,
    weights: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample PPO-clip loss ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` (docs/design.md §2).

    ``ρ = exp(logp − logp_old)``; ``A`` is clamped to ``±adv_clip_max`` (5 by default; None disables).
    Optional per-sample ``weights`` (e.g. TempFlow-GRPO noise-aware weights, docs/design.md §3.3) multiply the
    policy term. All inputs broadcast elementwise (normally ``[B]``).

    Returns:
        ``(loss_per_sample [B], info)`` with ``info["ratio"]`` (ρ, detached), ``info["clipfrac"]`` (fraction
        with ``|ρ − 1| > ε``, scalar) and ``info["approx_kl"]`` (``0.5·mean((logp − logp_old)²)``, scalar).
    """
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"clip_range must be a finite number > 0, got {clip_range!r}")
    if adv_clip_max is not None and not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0 or None, got {adv_clip_max!r}")
    logp = _as_tensor(logp)
    logp_old = _as_tensor(logp_old).to(device=logp.device, dtype=logp.dtype).detach()
    adv = _as_tensor(advantages).to(device=logp.device, dtype=logp.dtype).detach()
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)

    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    if weights is not None:
        loss = loss * _as_tensor(weights).to(device=logp.device, dtype=logp.dtype).detach()

    with torch.no_grad():
        info = {
            "ratio": ratio.detach(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).to(logp.dtype).mean(),
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        }
    return loss, info


def guard_log_ratio(logp: torch.Tensor, logp_old: Any, mean: torch.Tensor, mean_old: Any, std: Any) -> torch.Tensor:
    """GRPO-Guard's ratio normalisation (arXiv 2510.22319; yifan123/flow_grpo @ 2e2f712,
    scripts/train_sd3_GRPO_Guard.py L915–921, with the per-sample bias of issue #244, as VeRL-Omni's
    diffusion_algos.py L527–538)::

        log r̂ = s · (log p − log p_old + mean_d((μ − μ_old)²) / (2·s²))

    for Gaussian log-probs averaged over the latent dimensions with transition std ``s`` (σ_t·√Δt). With
    ``x' = μ_old + s·ε`` this is ``mean_d(ε·(μ − μ_old))``: zero-mean, on the same scale at every step, where the plain
    log-ratio is shifted left at low-noise steps. μ carries the gradient; ``logp_old`` and ``mean_old`` are the
    rollout's. Returns log r̂ [B]."""
    old = _as_tensor(logp_old).to(device=logp.device, dtype=logp.dtype).detach()
    mu_old = _as_tensor(mean_old).to(device=mean.device, dtype=mean.dtype).detach()
    s = _as_tensor(std).to(device=logp.device, dtype=logp.dtype)
    s = s.reshape(-1) if s.numel() == logp.numel() else s.reshape(())
    bias = (mean - mu_old).pow(2).flatten(1).mean(1) / (2 * s ** 2)
    return s * (logp - old + bias)


def guard_step_weight(sigma: float, sigma_next: float) -> float:
    """GRPO-Guard's gradient reweighting of a step's clipped loss: ``1/Δt`` with ``Δt = σ − σ'`` (L931–932:
    ``policy_loss / sqrt_dt²``), which evens out the steps' gradient norms."""
    return 1.0 / (sigma - sigma_next)


def kl_penalty(kl: Any, beta: float) -> torch.Tensor:
    """``β · mean(kl)``; ``kl`` is the per-sample KL to the reference policy (docs/design.md §2). Never weighted."""
    return beta * _as_tensor(kl).mean()


def grpo_step_loss(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    clip_range: float,
    *,
    kl: Any = None,
    beta: float = 0.0,
    adv_clip_max: float | None = 5.0,
    weights: Any = None,
    term_weights: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss for one trained step: ``mean(policy loss, weighted) + β·mean(kl)``.

    The per-sample ``weights`` multiply the policy term only; the KL term is unweighted (docs/design.md §3.3).
    ``kl`` may be None when ``beta == 0``. ``info`` adds ``policy_loss`` and ``kl_loss`` (detached scalars) to
    the entries of :func:`clipped_policy_loss`.

    With ``term_weights`` ``[K]`` the advantages are ``[B, K]``, one column per reward, and each reward gets its own
    clipped policy term: ``Σ_k term_weights[k] · mean_b(max(−A_bk·ρ_b, −A_bk·clip(ρ_b)))`` + β·mean(kl) (DanceGRPO's
    advantage-level aggregation, docs/design.md §3.2; ``reward.aggregate: loss``). It differs from one clipped term on
    ``Σ_k w_k·A_k`` only where a ratio is clipped.
    """
    if term_weights is None:
        per_sample, info = clipped_policy_loss(
            logp, logp_old, advantages, clip_range, adv_clip_max=adv_clip_max, weights=weights
        )
        policy = per_sample.mean()
    else:
        logp = _as_tensor(logp)
        tw = _as_tensor(term_weights).to(device=logp.device, dtype=logp.dtype)
        adv = _as_tensor(advantages)
        if adv.dim() != 2 or adv.shape[1] != tw.numel() or tw.dim() != 1:
            raise ValueError(f"grpo_step_loss: term_weights [K] needs advantages [B, K], got {tuple(tw.shape)} and "
                             f"{tuple(adv.shape)}")
        w = None if weights is None else _as_tensor(weights).unsqueeze(-1)
        per_term, info = clipped_policy_loss(logp.unsqueeze(-1), _as_tensor(logp_old).unsqueeze(-1), adv, clip_range,
                                             adv_clip_max=adv_clip_max, weights=w)
        policy = (per_term.mean(dim=0) * tw).sum()
        info["ratio"] = info["ratio"][:, 0]
    if kl is None:
        if beta != 0:
            raise ValueError("grpo_step_loss: beta != 0 requires kl")
        kl_term = torch.zeros((), dtype=policy.dtype, device=policy.device)
        kl_mean = kl_term
    else:
        kl_t = _as_tensor(kl)
        kl_mean = kl_t.mean()
        kl_term = beta * kl_mean
    info["policy_loss"] = policy.detach()
    info["kl_loss"] = kl_mean.detach()
    return policy + kl_term, info
