"""Mean brightness: a smooth sanity-check reward.

Every image's mean pixel value in [0, 1] (``invert=True``: one minus it). It depends on every pixel in the same
direction for every prompt, so any working policy-gradient pipeline raises it within a few updates: use it to check
that a new model, method or setting learns at all before spending compute on a compositional reward."""

from __future__ import annotations

import numpy as np

from .base import check_batch, register_reward


@register_reward("brightness")
class Brightness:
    primary = "brightness"

    def __init__(self, invert: bool = False):
        if not isinstance(invert, bool):
            raise ValueError(f"reward 'brightness': invert must be true or false, got {invert!r}")
        self.invert = invert

    def __call__(self, images, prompts, metadata=None):
        arr = check_batch(self.primary, images, prompts, metadata)
        mean = arr.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
        return {self.primary: 1.0 - mean if self.invert else mean}
