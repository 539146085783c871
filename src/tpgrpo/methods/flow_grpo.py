"""Flow-GRPO (docs/design.md §3.1): one reward per trajectory, normalised within its prompt group (or by the batch std with
``global_std``), broadcast to every trained step of the window."""

from __future__ import annotations

from ..advantages import group_advantages
from .base import Credit, ScoredRollout


class FlowGRPO:
    name = "flow_grpo"
    engine_options: dict = {}
    rows = "samples"

    def __init__(self, cfg):
        self.global_std = cfg.training.global_std

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        adv = group_advantages(scored.rewards, group_ids, std="global" if self.global_std else "group")
        return Credit(adv[:, None].expand(-1, len(window)).float().contiguous())
