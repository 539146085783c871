"""Reward functions behind one protocol (docs/design.md §7): ``scorer(images, prompts, metadata) -> {name: scores[N]}``.

Registered names (``build_reward(name, **options)``): shapes, shapes_pref, brightness, jpeg_incompressibility, jpeg_compressibility,
clip_score, pickscore, aesthetic, ocr, vlm_judge, remote. The model-based scorers import torch/transformers only
when constructed."""

from .base import RewardFunction, build_reward, check_batch, register_reward, registered_rewards
from . import brightness as _brightness, jpeg as _jpeg, shapes as _shapes, shapes_pref as _shapes_pref  # noqa: F401
from . import aesthetic as _aesthetic, clip_score as _clip_score, ocr as _ocr, pickscore as _pickscore  # noqa: F401
from . import remote as _remote, vlm_judge as _vlm_judge  # noqa: F401

__all__ = ["RewardFunction", "build_reward", "check_batch", "register_reward", "registered_rewards"]
