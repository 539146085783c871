"""PickScore reward (Kirstain et al. 2023): logit_scale · cos(image, text) of the PickScore CLIP-H model, divided by
26 so scores are about 0–1 (Flow-GRPO).

Options: ``model`` (default ``yuvalkirstain/PickScore_v1``), ``processor`` (tokenizer + preprocessing; default
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for the default model — PickScore's repo ships no tokenizer —
and the model location otherwise), ``device``, ``dtype``, ``batch_size``, ``norm`` (26).
Scores: ``pickscore`` (= logit_scale·cos/norm, primary) and ``pickscore_raw`` (logit_scale·cos).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import check_batch, register_reward
from .clip_common import ClipBackbone

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_reward("pickscore")
class PickScoreReward:
    primary = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, norm: float = 26.0):
        if not norm or float(norm) <= 0:
            raise ValueError(f"pickscore: norm must be positive, got {norm!r}")
        if processor is None:  # PickScore's hub repo has no tokenizer; a local dir or another id is used as is
            processor = PICKSCORE_PROCESSOR if model == PICKSCORE_MODEL else model
        self.norm = float(norm)
        self.clip = ClipBackbone("pickscore", model, processor, device, dtype, batch_size)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        images = check_batch("pickscore", images, prompts, metadata)
        raw = self.clip.logit_scale * self.clip.cosine(images, prompts)
        return {"pickscore": raw / self.norm, "pickscore_raw": raw}
