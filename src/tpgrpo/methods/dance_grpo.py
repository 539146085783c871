"""DanceGRPO (docs/design.md §3.2) — what differs from Flow-GRPO:

* the ``dance`` kernel (constant noise scale η) and shared initial noise within a prompt group (``same_noise``);
* each trajectory trains a random subset of its window steps (``timestep_fraction`` of them);
* advantages use the *unbiased* group std plus 1e-8 (``dance.unbiased_std``, ``dance.std_eps``), as the reference's
  ``(r − r.mean()) / (r.std() + 1e-8)`` (XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py``);
* several rewards get their own clipped policy term each, the weighted losses summed — offered to every method by
  the trainer's ``reward.aggregate: loss``.
"""

from __future__ import annotations

import torch

from ..advantages import group_advantages
from .base import Credit, ScoredRollout


class DanceGRPO:
    name = "dance_grpo"
    engine_options: dict = {}
    rows = "samples"

    def __init__(self, cfg):
        self.fraction = cfg.dance.timestep_fraction
        self.unbiased = cfg.dance.unbiased_std
        self.eps = cfg.dance.std_eps

    def trained_steps_mask(self, n: int, W: int, rng: torch.Generator) -> torch.Tensor:
        """[n, W] bool: int(fraction·W) (at least 1) random steps per trajectory — the reference's
        ``int(len(timesteps) * timestep_fraction)`` of a random permutation (train_grpo_flux.py L551–570)."""
        k = max(1, int(self.fraction * W))
        order = torch.stack([torch.randperm(W, generator=rng) for _ in range(n)])
        return torch.zeros(n, W, dtype=torch.bool).scatter_(1, order[:, :k], True)

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        adv = group_advantages(scored.rewards, group_ids, std="group", eps=self.eps, unbiased=self.unbiased)
        W = len(window)
        mask = self.trained_steps_mask(len(adv), W, rng)
        return Credit(adv[:, None].expand(-1, W).float().contiguous(), train_mask=mask)
