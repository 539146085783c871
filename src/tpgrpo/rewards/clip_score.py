"""CLIP score reward: 100 · cos(image, text) of a CLIP model, divided by 30 so scores are about 0–1 (Flow-GRPO).

Options: ``model`` (hub id or local dir of a ``CLIPModel``; default ``openai/clip-vit-large-patch14``),
``processor`` (where the tokenizer / preprocessor_config live; default = model), ``device``, ``dtype``
(float32 | float16 | bfloat16), ``batch_size``, ``scale`` (the 100 of the CLIP score), ``norm`` (the 30).
Scores: ``clip_score`` (= scale·cos/norm, primary) and ``clip_cosine`` (raw cosine).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import check_batch, register_reward
from .clip_common import ClipBackbone


@register_reward("clip_score")
class ClipScoreReward:
    primary = "clip_score"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32, scale: float = 100.0,
                 norm: float = 30.0):
        if not norm or float(norm) <= 0:
            raise ValueError(f"clip_score: norm must be positive, got {norm!r}")
        self.scale, self.norm = float(scale), float(norm)
        self.clip = ClipBackbone("clip_score", model, processor, device, dtype, batch_size)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        images = check_batch("clip_score", images, prompts, metadata)
        cos = self.clip.cosine(images, prompts)
        return {"clip_score": self.scale * cos / self.norm, "clip_cosine": cos}
