"""What a method contributes to the shared trainer: engine options (which states fork) and credit assignment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ScoredRollout:
    """Rewards of one epoch's images, for one reward function."""

    rewards: torch.Tensor                    # [N]: R(x_0) of each main trajectory
    fork_rewards: torch.Tensor | None = None   # [N, W]: R_k of the ODE completions of window states (TP-GRPO)
    child_rewards: torch.Tensor | None = None  # [N, W, C]: rewards of the branched children (TempFlow-GRPO)


@dataclass
class Credit:
    """Advantages per trained row and window step [M, W] (rows: samples, or children for TempFlow-GRPO); optional
    per-step policy weights [W]; an optional mask [M, W] of the (row, step) pairs that train; diagnostics."""

    advantages: torch.Tensor
    step_weights: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    engine_options: dict  # extra RolloutPlan fields, e.g. {"fork_window_states": True}
    rows: str             # "samples" (one trained chain per sample) or "children" (TempFlow-GRPO)

    def credit(self, scored: ScoredRollout, group_ids: torch.Tensor, microbatch_ids: torch.Tensor,
               window: list[int], rng: torch.Generator) -> Credit: ...
