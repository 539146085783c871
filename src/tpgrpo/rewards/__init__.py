"""Reward functions behind one protocol (DESIGN §7): ``scorer(images, prompts, metadata) -> {name: scores[N]}``."""

from .base import RewardFunction, build_reward, register_reward, registered_rewards
from . import jpeg as _jpeg, shapes as _shapes  # noqa: F401  (register the built-in scorers)

__all__ = ["RewardFunction", "build_reward", "register_reward", "registered_rewards"]
