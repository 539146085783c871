"""Shared CLIP machinery for the CLIP score, PickScore and aesthetic rewards.

A ``transformers.CLIPModel`` and ``CLIPTokenizer`` are loaded from a hub id or a local directory (``model``; the
tokenizer and the image preprocessing settings may come from another location, ``processor``, as PickScore's do).
Images are preprocessed with PIL and numpy exactly like CLIP's image processor — resize the shortest side to
``size`` (bicubic), center-crop to ``crop_size``, scale to [0, 1], normalise with the CLIP mean/std — reading
``preprocessor_config.json`` when the location has one and falling back to CLIP's defaults and the vision config's
image size otherwise. No torchvision.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from PIL import Image

from .base import one_line

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _int_size(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in (key, "shortest_edge", "height"):
            if k in value:
                return int(value[k])
    return None


class ClipPreprocessor:
    """uint8 [N, H, W, 3] → float32 [N, 3, crop, crop] pixel values, the way CLIP's image processor does it."""

    def __init__(self, size: int, crop_size: int, mean=CLIP_MEAN, std=CLIP_STD, resample=Image.BICUBIC):
        self.size, self.crop_size = int(size), int(crop_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.resample = resample

    @classmethod
    def from_location(cls, location: str, default_size: int) -> "ClipPreprocessor":
        cfg = read_preprocessor_config(location)
        size = _int_size(cfg.get("size"), "shortest_edge") or default_size
        crop = _int_size(cfg.get("crop_size"), "height") or size
        return cls(size, crop, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD),
                   int(cfg.get("resample", Image.BICUBIC)))

    def one(self, img: np.ndarray) -> np.ndarray:
        im = Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), resample=self.resample)
        c = self.crop_size
        top, left = max((new_h - c) // 2, 0), max((new_w - c) // 2, 0)
        im = im.crop((left, top, left + c, top + c))  # PIL pads with zeros if the image is smaller than the crop
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.one(img) for img in images]).astype(np.float32)


def read_preprocessor_config(location: str) -> dict:
    """The location's preprocessor_config.json as a dict, or {} when it has none (or cannot be reached)."""
    try:
        from transformers.utils import cached_file

        path = cached_file(location, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - an unreachable hub falls back to CLIP's defaults
        return {}
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_dtype(dtype: str, reward: str):
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"{reward}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


class ClipBackbone:
    """A CLIP model + tokenizer + preprocessing, producing L2-normalised image and text embeddings."""

    def __init__(self, reward: str, model: str, processor: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, need_text: bool = True):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        if not model or not isinstance(model, str):
            raise ValueError(f"{reward}: model must be a hub id or a local directory, got {model!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{reward}: batch_size must be a positive integer, got {batch_size!r}")
        self.reward, self.device, self.batch_size = reward, torch.device(device), batch_size
        self.dtype = resolve_dtype(dtype, reward)
        processor = processor or model
        try:
            self.model = CLIPModel.from_pretrained(model, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - OSError, EnvironmentError, missing files, bad configs ...
            raise ValueError(f"{reward}: cannot load CLIP model from {model!r}: {one_line(e)}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = None
        if need_text:
            try:
                self.tokenizer = CLIPTokenizer.from_pretrained(processor)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{reward}: cannot load the CLIP tokenizer from {processor!r}: "
                                 f"{one_line(e)}") from None
        vis = self.model.config.vision_config
        self.preprocess = ClipPreprocessor.from_location(processor, vis.image_size)
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 77) or 77,
                              self.model.config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale.detach().float().exp().cpu())

    def image_embeds(self, images: np.ndarray):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                px = torch.from_numpy(self.preprocess(images[i:i + self.batch_size])).to(self.device, self.dtype)
                pooled = self.model.vision_model(pixel_values=px).pooler_output
                out.append(self.model.visual_projection(pooled).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: Sequence[str]):
        """Embeddings of ``prompts`` (each distinct prompt is encoded once)."""
        import torch

        uniq = list(dict.fromkeys(prompts))
        out = []
        with torch.inference_mode():
            for i in range(0, len(uniq), self.batch_size):
                tok = self.tokenizer(uniq[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                out.append(self.model.text_projection(pooled).float())
        emb = torch.cat(out)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        index = {p: i for i, p in enumerate(uniq)}
        return emb[torch.tensor([index[p] for p in prompts], dtype=torch.long)]

    def cosine(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        img, txt = self.image_embeds(images), self.text_embeds(prompts)
        return (img * txt).sum(-1).double().cpu().numpy()
