"""Reward protocol and registry."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of uint8 RGB images [N, H, W, 3] for their prompts.

    Returns a dict of per-image float64 score arrays; ``primary`` names the one that trains. A scorer that fails
    raises — a failed reward is never turned into 0."""

    primary: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict] | None = None
                 ) -> dict[str, np.ndarray]: ...


_REGISTRY: dict[str, Callable[..., RewardFunction]] = {}


def register_reward(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> RewardFunction:
    if name not in _REGISTRY:
        raise ValueError(f"reward.name: unknown reward {name!r}; registered: {', '.join(registered_rewards())}")
    return _REGISTRY[name](**kwargs)
