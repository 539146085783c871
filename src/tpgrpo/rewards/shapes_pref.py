"""The shapes world's learned reward (``reward.name: shapes_pref``): the cosine score of a small CLIP-style
text–image model trained on renders with hard negatives and on the base model's samples ranked by the rule scorer
(:mod:`tpgrpo.shapes.preference`, docs/design.md "The learned reward"). It is continuous, as PickScore is; the rule
scorer stays the held-out metric (``reward.held_out: shapes``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..shapes.grammar import parse_prompt
from .base import check_batch, register_reward


@register_reward("shapes_pref")
class ShapesPreferenceReward:
    primary = "shapes_pref"

    def __init__(self, path: str | None = None, batch_size: int = 1024):
        from ..shapes.preference import ShapesPreferenceModel

        if batch_size < 1:
            raise ValueError(f"reward 'shapes_pref': batch_size must be >= 1, got {batch_size}")
        self.model = ShapesPreferenceModel.load(path)
        self.batch_size = batch_size

    @staticmethod
    def validate_prompts(prompts: Sequence[str]) -> None:
        """Raise ValueError for a prompt outside the shapes grammar (its text tower has no words for it)."""
        for p in prompts:
            parse_prompt(p)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        arr = check_batch("shapes_pref", images, prompts, metadata)
        m, bs = self.model, self.batch_size
        out = [m.score(m.images_to_tensor(arr[lo:lo + bs]), list(prompts[lo:lo + bs])).double().numpy()
               for lo in range(0, len(arr), bs)]
        return {"shapes_pref": np.concatenate(out) if out else np.zeros(0)}
