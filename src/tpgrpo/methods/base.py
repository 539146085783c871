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


class ForwardProcessMethod:
    """Shared parts of the forward-process methods (DiffusionNFT, AWM): deterministic ODE rollouts whose clean
    samples train K noise levels each; group advantages (std of the epoch or of the group); per-sample draws of the
    noise levels and noise. A subclass sets ``name``, ``old_policy``, ``num_train``, ``global_std`` and ``loss``."""

    engine_options: dict = {}
    rows = "samples"
    forward_process = True  # the trainer keeps the clean samples and trains with :meth:`loss`
    num_train: int
    global_std: bool

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        from ..advantages import group_advantages

        adv = group_advantages(scored.rewards, group_ids, std="global" if self.global_std else "group")
        return Credit(adv[:, None].float().contiguous())

    def draw(self, seed: int, schedule: torch.Tensor, latent: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's training noise levels [K] (a random permutation of the sampling σ's σ_0 … σ_{T−1}, its
        first K) and noise [K, *latent], from its own seed (the trainer derives it from seed, epoch, inner epoch and
        the sample's global index, so neither batching nor the number of processes changes them)."""
        g = torch.Generator().manual_seed(seed)
        T = len(schedule) - 1
        idx = torch.randperm(T, generator=g)[:self.num_train]
        return schedule[idx].float(), torch.randn((self.num_train, *latent), generator=g)


def add_velocity_kl(loss: torch.Tensor, info: dict, v: torch.Tensor, v_ref: torch.Tensor | None,
                    kl_weight: float) -> torch.Tensor:
    """``loss + kl_weight · mean((v − v_ref)²)`` (the forward-process methods' velocity-space KL to the reference),
    logging the KL in ``info``; the loss unchanged without a reference."""
    if v_ref is None:
        return loss
    kl = ((v - v_ref.detach()) ** 2).mean(dim=tuple(range(1, v.ndim))).mean()
    info["kl"] = kl.detach()
    return loss + kl_weight * kl
