"""TempFlow-GRPO (docs/design.md §3.3) — what differs from Flow-GRPO:

* the main trajectory is pure ODE; at each branch point k the engine draws C children by one SDE step from x_k and
  finishes each with the ODE, so child b's reward is the process reward of its single stochastic transition;
* advantages are normalised per seed group: the C children of one (prompt, initial noise, branch point);
* each branch point's policy term is weighted by the noise-aware weight w_k = std_k / mean(std) of the schedule in
  use (the KL term is not weighted).
"""

from __future__ import annotations

import torch

from ..advantages import group_advantages
from ..credit import noise_aware_weights
from ..sampling import sigma_schedule
from .base import Credit, ScoredRollout


class TempFlowGRPO:
    name = "tempflow_grpo"
    rows = "children"

    def __init__(self, cfg):
        self.children = cfg.tempflow.children
        self.engine_options = {"branch_children": self.children}
        s = cfg.sampling
        self.kernel, self.noise_level = s.kernel, s.noise_level
        self.schedule = sigma_schedule(s.num_steps, s.shift)  # the trainer replaces it with the schedule in use

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        R = scored.child_rewards  # [N, W, C]
        n, W, C = R.shape
        rows = R.permute(0, 2, 1).reshape(n * C, W)            # row n·C + c, column k
        seed_groups = torch.arange(n).repeat_interleave(C)      # the C children of one trajectory
        adv = group_advantages(rows.double(), seed_groups, std="group").float()
        weights = noise_aware_weights(self.schedule, window, kind=self.kernel, noise_level=self.noise_level).float()
        return Credit(adv, step_weights=weights, stats={"branch_reward_std": float(R.std(-1, unbiased=False).mean())})
