"""What a method contributes to the shared trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Credit:
    """Per-sample, per-window-step advantages [N, W]; optional per-step policy weights [W]; diagnostics."""

    advantages: torch.Tensor
    step_weights: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    forks_window_states: bool  # ask the engine for ODE completions of every window state

    def credit(self, rewards: torch.Tensor, fork_rewards: torch.Tensor | None, group_ids: torch.Tensor,
               microbatch_ids: torch.Tensor, window_size: int) -> Credit: ...
