"""JPEG (in)compressibility (DDPO / Flow-GRPO): encoded size in kB at quality 95, divided by 500 kB so scores are
about 0–1; compressibility is its negative."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .base import register_reward


def jpeg_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.array(sizes, dtype=np.float64)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility:
    primary = "jpeg_incompressibility"

    def __call__(self, images, prompts, metadata=None):
        return {self.primary: jpeg_kb(images) / 500.0}


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    primary = "jpeg_compressibility"

    def __call__(self, images, prompts, metadata=None):
        return {self.primary: -jpeg_kb(images) / 500.0}
