"""The shapes world's GenEval-style reward: partial credit trains, strict 0/1 correctness is reported."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..shapes.detect import score_image
from ..shapes.grammar import parse_prompt
from .base import register_reward


@register_reward("shapes")
class ShapesReward:
    primary = "shapes_partial"

    @staticmethod
    def validate_prompts(prompts: Sequence[str]) -> None:
        """Raise ValueError for a prompt outside the shapes grammar (the scorer could not score it)."""
        for p in prompts:
            parse_prompt(p)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"shapes reward: {len(images)} images but {len(prompts)} prompts")
        scores = [score_image(img, parse_prompt(p)) for img, p in zip(images, prompts)]
        return {"shapes_partial": np.array([s.partial for s in scores], dtype=np.float64),
                "shapes_strict": np.array([s.strict for s in scores], dtype=np.float64)}
