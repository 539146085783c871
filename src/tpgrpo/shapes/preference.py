"""The built-in world's learned reward: a small CLIP-style text–image scorer, the PickScore of the shapes world
(docs/design.md, "The learned reward").

Real text-to-image RL trains on a *learned* reward (PickScore, HPS, ImageReward) and reports a rule-based benchmark
(GenEval) beside it. This model plays the learned reward's part in the built-in world; the rule scorer
(:mod:`tpgrpo.shapes.detect`) stays the held-out metric, so reward hacking shows as a rising learned score over a
flat or falling strict accuracy.

Two towers map an image and a prompt into one unit-norm embedding space:

* image tower: a 4×4 stride-2 convolution that sees every pixel (32×32 → 16×16), two 3×3 stride-2 convolutions
  (→ 8×8 → 4×4) and a two-layer head on the flattened 4×4 map (flattening keeps *where* things are, which the
  position prompts need);
* text tower: the shapes grammar's word-level tokenizer and a small transformer encoder
  (:class:`~tpgrpo.models.toy.ShapesTextEncoder`), its BOS state projected to the embedding.

The score of (image, prompt) is the cosine of the two embeddings, in [−1, 1], as PickScore's is a scaled cosine.
``logit_scale`` (learned, as in CLIP) only sharpens the training losses; it is not part of the score.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from ..models.toy import ShapesModel, ShapesTextEncoder, ShapesTokenizer
from .grammar import vocabulary

DEFAULT_PREF_CONFIG = {"channels": 32, "embed_dim": 128, "text_width": 128, "text_layers": 2, "heads": 4,
                       "max_words": 8}
#: the committed weights, inside the package (``reward.options.shapes_pref.path`` overrides)
BUILTIN_PREF_WEIGHTS = "shapes_pref.safetensors"


def default_pref_path() -> Path:
    return Path(str(resources.files("tpgrpo") / "assets" / BUILTIN_PREF_WEIGHTS))


class ImageTower(nn.Module):
    """[B, 3, 32, 32] in [−1, 1] → [B, embed_dim] (not normalised)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1), nn.SiLU(),             # 16×16
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),         # 8×8
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.SiLU(),     # 4×4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * 16, 2 * embed_dim), nn.SiLU(),
                                  nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))


class ShapesPreferenceModel(nn.Module):
    """Dual encoder; :meth:`score` is the cosine between an image's and its prompt's embedding."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**DEFAULT_PREF_CONFIG, **(config or {})}
        c = self.config
        self.tokenizer = ShapesTokenizer(vocabulary(), c["max_words"])
        self.image_tower = ImageTower(c["channels"], c["embed_dim"])
        self.text_encoder = ShapesTextEncoder(self.tokenizer.vocab_size, c["text_width"], c["text_layers"], c["heads"],
                                              c["max_words"] + 1)
        self.text_proj = nn.Linear(c["text_width"], c["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] in [−1, 1] → unit-norm [B, embed_dim]."""
        return F.normalize(self.image_tower(x), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts of the shapes grammar → unit-norm [B, embed_dim]."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.text_proj(self.text_encoder(ids)[1]), dim=-1)

    def embed_texts_unique(self, prompts: Sequence[str]) -> torch.Tensor:
        """:meth:`embed_texts`, running the text tower once per distinct prompt (groups repeat their prompt)."""
        unique = list(dict.fromkeys(prompts))
        if len(unique) == len(prompts):
            return self.embed_texts(prompts)
        where = {p: i for i, p in enumerate(unique)}
        return self.embed_texts(unique)[torch.tensor([where[p] for p in prompts], device=self.device)]

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The reward of each (image, prompt) pair: cos(image embedding, prompt embedding), [B]."""
        return (self.embed_images(x) * self.embed_texts_unique(prompts)).sum(-1)

    #: uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [−1, 1], the flow model's pixel convention
    images_to_tensor = staticmethod(ShapesModel.images_to_tensor)

    # --- weights ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Weights as fp16 safetensors (the file stays small; scores are computed in fp32) with the config in the
        metadata, written atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"config": json.dumps(self.config), **(metadata or {})})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "ShapesPreferenceModel":
        """The committed weights (``path=None``) or a file written by :meth:`save`; one-line errors name the file."""
        from ..io_checks import load_module_with_config

        path = Path(path) if path else default_pref_path()
        if not path.is_file():
            raise FileNotFoundError(f"shapes preference model weights not found: {path} (train them with "
                                    f"`tpgrpo pretrain-reward`)")
        model = load_module_with_config(path, "shapes preference model", cls)
        return model.eval().requires_grad_(False)
