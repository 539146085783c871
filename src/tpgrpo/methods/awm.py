"""AWM, advantage-weighted matching (arXiv 2509.25050; docs/design.md §3.5) — a forward-process method: the pretraining
(flow-matching) loss on the policy's own samples, weighted by their advantages.

* rollouts are deterministic ODE samples of the *current* policy (on-policy); only the clean samples x0 are kept;
* advantages: group mean, std of the whole epoch (``awm.global_std``), as DiffusionNFT;
* each sample trains K noise levels t with fresh noise, x_t = (1 − t)·x0 + t·ε, drawn as DiffusionNFT draws them
  (a random subset of the sampling σ's, ``awm.timestep_fraction``);
* a sample's "log-likelihood" at t is the negative flow-matching error, ``log p̂ = −w(t)·mean((v_θ(x_t) − (ε − x0))²)``
  (:func:`matching_logprob`), and the loss is PPO's clipped ratio objective on it (:func:`awm_loss`), the old value
  taken from the policy before the epoch's updates.

Transcribed from the definitions in Flow-Factory's ``trainers/awm.py`` (X-GenGroup/Flow-Factory, commit 0574042:
``compute_weighted_log_prob`` and ``optimize``); see tests/test_awm.py.
"""

from __future__ import annotations

import torch

from .base import ForwardProcessMethod, add_velocity_kl

WEIGHTINGS = ("uniform", "t", "t2")


def matching_logprob(v: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     weighting: str = "uniform") -> torch.Tensor:
    """``−w(t)·mean((v − (ε − x0))²)`` per sample [B], in float64, with ε − x0 = (x_t − x0)/t (x_t = (1 − t)·x0 + t·ε)
    and w = 1 (``uniform``), t or t²."""
    te = t.view(-1, *([1] * (x0.ndim - 1))).double()
    target = (xt.double() - x0.double()) / te
    logp = -((v.double() - target) ** 2).mean(dim=tuple(range(1, v.ndim)))
    if weighting == "t":
        logp = logp * t.double()
    elif weighting == "t2":
        logp = logp * t.double() ** 2
    elif weighting != "uniform":
        raise ValueError(f"awm.weighting: unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    return logp


def awm_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, *, clip_range: float, adv_clip_max: float, weighting: str = "uniform",
             v_ref: torch.Tensor | None = None, kl_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """AWM's loss of one noise level per sample: ρ = exp(log p̂_θ − log p̂_old), A clipped to ±``adv_clip_max``,
    ``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))``, plus ``kl_weight · mean((v_θ − v_ref)²)`` (velocity-space KL).
    Shapes: v, v_old, x0, xt, v_ref [B, *latent]; t, advantages [B]."""
    logp = matching_logprob(v, x0, xt, t, weighting)
    with torch.no_grad():
        logp_old = matching_logprob(v_old, x0, xt, t, weighting)
    ratio = torch.exp(logp - logp_old).float()
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    info = {"policy_loss": policy.detach(), "old_deviate": ((v - v_old) ** 2).mean().detach(),
            "ratio_mean": ratio.mean().detach(), "clipfrac": ((ratio - 1).abs() > clip_range).float().mean()}
    return add_velocity_kl(policy, info, v, v_ref, kl_weight), info


class AWM(ForwardProcessMethod):
    name = "awm"
    old_policy = "current"  # the old log-likelihoods come from the policy before the epoch's updates

    def __init__(self, cfg):
        o = cfg.awm
        self.global_std, self.weighting = o.global_std, o.weighting
        self.clip_range, self.adv_clip_max = cfg.training.clip_range, cfg.training.adv_clip_max
        self.num_train = max(1, int(cfg.sampling.num_steps * o.timestep_fraction))

    def loss(self, v, v_old, x0, xt, t, advantages, *, v_ref=None, kl_weight=0.0):
        return awm_loss(v, v_old, x0, xt, t, advantages, clip_range=self.clip_range, adv_clip_max=self.adv_clip_max,
                        weighting=self.weighting, v_ref=v_ref, kl_weight=kl_weight)
