"""DanceGRPO (DESIGN §3.2) — what differs from Flow-GRPO:

* the ``dance`` kernel (constant noise scale η) and shared initial noise within a prompt group (``same_noise``);
* each trajectory trains a random subset of its window steps (``timestep_fraction`` of them);
* several rewards are combined at the advantage level (each normalised per group, then weighted and summed) —
  offered to every method by the trainer's ``reward.aggregate: advantage``.
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

    def trained_steps_mask(self, n: int, W: int, rng: torch.Generator) -> torch.Tensor:
        """[n, W] bool: round(fraction·W) (at least 1) random steps per trajectory."""
        k = max(1, round(self.fraction * W))
        order = torch.stack([torch.randperm(W, generator=rng) for _ in range(n)])
        return torch.zeros(n, W, dtype=torch.bool).scatter_(1, order[:, :k], True)

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        adv = group_advantages(scored.rewards, group_ids, std="group")
        W = len(window)
        mask = self.trained_steps_mask(len(adv), W, rng)
        return Credit(adv[:, None].expand(-1, W).float().contiguous(), train_mask=mask)
