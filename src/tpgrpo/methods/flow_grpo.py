"""Flow-GRPO (DESIGN §3.1): one reward per trajectory, normalised within its prompt group (or by the batch std with
``global_std``), broadcast to every trained step of the window."""

from __future__ import annotations

import torch

from ..advantages import group_advantages
from .base import Credit


class FlowGRPO:
    name = "flow_grpo"
    forks_window_states = False

    def __init__(self, cfg):
        self.global_std = cfg.training.global_std

    def credit(self, rewards, fork_rewards, group_ids, microbatch_ids, window_size) -> Credit:
        adv = group_advantages(rewards, group_ids, std="global" if self.global_std else "group")
        return Credit(adv[:, None].expand(-1, window_size).contiguous())
