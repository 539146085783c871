"""TP-GRPO (docs/design.md §3.4) — what differs from Flow-GRPO:

* the engine ODE-completes every window state, giving R_0 … R_W per trajectory (R_W = the trajectory's own reward);
* per-step rewards are the incremental rewards r_t = R_t − R_{t−1}, except at turning points, which receive the
  aggregated reward g_t = R_W − R_{t−1}; turning points are balanced by sign within a scope;
* advantages are normalised per window step within each prompt group.

Ablations are options of this one method (``tpgrpo.*``): ``turning_points: false`` keeps the incremental rewards
r_t at every step (the dense-reward baseline, close to DenseGRPO); ``consistent: false`` uses plain Definition 4.1;
``first_step: false`` drops the first-step rule; ``balance: false`` keeps every turning point.
"""

from __future__ import annotations

import torch

from ..advantages import group_advantages
from ..credit import balance_turning_points, incremental_and_aggregated, turning_point_rewards, turning_point_stats
from .base import Credit, ScoredRollout


class TPGRPO:
    name = "tpgrpo"
    engine_options = {"fork_window_states": True}
    rows = "samples"

    def __init__(self, cfg):
        self.opts = cfg.tpgrpo

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        o = self.opts
        R = torch.cat([scored.fork_rewards, scored.rewards[:, None]], dim=1).double()  # [N, W+1]: R_0 … R_W
        r, g = incremental_and_aggregated(R)
        if o.turning_points:
            step_rewards, is_tp = turning_point_rewards(R, consistent=o.consistent, first_step=o.first_step)
        else:  # the dense-reward ablation: r_t everywhere
            step_rewards, is_tp = r.clone(), torch.zeros(r.shape, dtype=torch.bool)
        balanced, is_tp_kept = step_rewards, is_tp
        if o.balance:
            scope = {"microbatch": microbatch_ids, "group": group_ids,
                     "batch": torch.zeros_like(group_ids)}[o.balance_scope]
            balanced, is_tp_kept = balance_turning_points(step_rewards, is_tp, r, R, scope_ids=scope,
                                                          rank_by=o.balance_rank)
        adv = group_advantages(balanced, group_ids, std="group").float()
        stats = turning_point_stats(is_tp, is_tp_kept, step_rewards, r, g)
        return Credit(adv, stats={"tp": stats, "R": R.float(), "is_tp": is_tp_kept})
