"""Reward protocol and registry."""

from __future__ import annotations

import inspect
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
    factory = _REGISTRY[name]
    if kwargs:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                known = ", ".join(k for k in params if k != "self") or "none"
                raise ValueError(f"reward {name!r}: unknown option(s) {', '.join(unknown)}; its options: {known}")
    return factory(**kwargs)


def check_batch(reward: str, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> np.ndarray:
    """Validate a scorer's inputs and return the images as uint8 [N, H, W, 3].

    Raises a one-line ValueError naming the reward and the problem (wrong array shape or dtype, different numbers
    of images and prompts or metadata entries, a prompt that is not a string)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{reward}: images must be an array [N, H, W, 3], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{reward}: images must be uint8, got {arr.dtype}")
    if isinstance(prompts, str):
        raise ValueError(f"{reward}: prompts must be a list of strings, got a single string")
    if len(arr) != len(prompts):
        raise ValueError(f"{reward}: {len(arr)} images but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{reward}: prompt {i} is {type(p).__name__}, not a string")
    if metadata is not None and len(metadata) != len(arr):
        raise ValueError(f"{reward}: {len(arr)} images but {len(metadata)} metadata entries")
    return arr


def one_line(e: BaseException) -> str:
    """An exception's message on one line (for error messages that embed another library's error)."""
    msg = " ".join(str(e).split())
    return msg if msg else type(e).__name__
