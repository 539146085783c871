"""DiffusionNFT (arXiv 2509.16117; docs/design.md §3.5) — a forward-process method, no log-probs:

* rollouts are deterministic ODE samples of the *old* policy (the reference samples with its "old" adapter,
  NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` L640–658); only the clean samples x0 are kept and scored;
* advantages: group mean, std of the whole epoch (+1e-4) — the reference's ``PerPromptStatTracker`` with
  ``sample.global_std = True`` (``config/base.py`` L57, ``flow_grpo/stat_tracking.py`` L24–32), ``nft.global_std``;
* each sample trains ``int(num_steps · timestep_fraction)`` noise levels t taken from the sampling schedule (a random
  permutation per sample and inner epoch, L569, L806–815), with fresh noise x_t = (1 − t)·x0 + t·ε (L864–870);
* the loss is :func:`nft_loss`; the old policy moves at the end of every epoch, old ← d·old + (1 − d)·current with
  d = :func:`return_decay` (global optimizer steps, ``nft.decay_type``) (L1033–1039);
  the trainer keeps old as a second copy of the trained weights (an :class:`~tpgrpo.ema.EMA` whose decay it sets),
  checkpointed as ``old.safetensors``.
"""

from __future__ import annotations

import torch

from .base import ForwardProcessMethod, add_velocity_kl

#: (flat, uprate, uphold) of the reference's ``return_decay`` (train_nft_sd3.py L169–189)
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def return_decay(step: int, decay_type: int) -> float:
    """The old policy's decay after ``step`` optimizer steps: 0 for step < flat, else min((step − flat)·uprate,
    uphold) (train_nft_sd3.py L169–189). Type 0: old = current after every epoch; 1: up to 0.5; 2: 0 for 75 steps,
    then up to 0.999."""
    flat, uprate, uphold = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, *, beta: float, adv_clip_max: float, v_ref: torch.Tensor | None = None,
             kl_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DiffusionNFT loss of one noise level per sample (train_nft_sd3.py L908–970; paper Eq. 8 with the adaptive
    weighting of its §4):

    * optimality ``r = clamp(clip(A, ±c)/c/2 + 0.5, 0, 1)``, c = ``adv_clip_max``;
    * implicit policies ``v⁺ = β·v_θ + (1 − β)·v_old``, ``v⁻ = (1 + β)·v_old − β·v_θ``;
    * x0 predictions ``x̂0± = x_t − t·v±``; adaptive weights ``w± = max(mean|x̂0± − x0|, 1e-5)`` (per sample,
      detached, in float64);
    * ``L± = mean((x̂0± − x0)² / w±)`` per sample; policy loss ``mean(c·(r·L⁺ + (1 − r)·L⁻)/β)``;
    * plus ``kl_weight · mean((v_θ − v_ref)²)`` (the base model's velocity, adapters off: L892–905, L966–970).

    Shapes: v, v_old, x0, xt, v_ref [B, *latent]; t, advantages [B]. Returns the loss and detached diagnostics."""
    c = adv_clip_max
    r = torch.clamp(advantages.clamp(-c, c) / c / 2.0 + 0.5, 0, 1)
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v

    def weighted(v_pm):
        x0_hat = xt - t * v_pm
        with torch.no_grad():
            w = (x0_hat.double() - x0.double()).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=1e-5)
        return _per_sample_mean((x0_hat - x0) ** 2 / w)

    pos, neg = weighted(v_pos), weighted(v_neg)
    policy = (c * (r * pos / beta + (1.0 - r) * neg / beta)).mean()
    info = {"policy_loss": policy.detach(), "old_deviate": ((v - v_old) ** 2).mean().detach()}
    return add_velocity_kl(policy, info, v, v_ref, kl_weight), info


class DiffusionNFT(ForwardProcessMethod):
    name = "diffusion_nft"
    old_policy = "decayed"  # samples and v_old come from old weights that move once per epoch (:meth:`old_decay`)

    def __init__(self, cfg):
        o = cfg.nft
        self.beta, self.decay_type, self.global_std = o.beta, o.decay_type, o.global_std
        self.adv_clip_max = cfg.training.adv_clip_max
        self.num_train = max(1, int(cfg.sampling.num_steps * o.timestep_fraction))  # L569

    def loss(self, v, v_old, x0, xt, t, advantages, *, v_ref=None, kl_weight=0.0):
        return nft_loss(v, v_old, x0, xt, t, advantages, beta=self.beta, adv_clip_max=self.adv_clip_max, v_ref=v_ref,
                        kl_weight=kl_weight)

    def old_decay(self, optimizer_steps: int) -> float:
        return return_decay(optimizer_steps, self.decay_type)
