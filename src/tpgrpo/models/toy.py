"""The built-in shapes model: flow matching with a tiny diffusers ``SD3Transformer2DModel`` and a small word-level
text encoder over the shapes grammar's vocabulary (docs/design.md §6).

Two data spaces (``config["space"]``): ``latent`` (the default world since issue #15) runs the transformer on the
4×8×8 latents of :class:`~tpgrpo.models.shapes_autoencoder.ShapesAutoencoder`, whose decoder is part of the model and
of its safetensors file, as the VAE is part of SD3; ``pixel`` runs it on the 3×32×32 image itself."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file
from torch import nn

from ..shapes.grammar import vocabulary
from .base import PromptEmbeds, apply_cfg, sigma_batch
from .shapes_autoencoder import ShapesAutoencoder

SD3_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_CONFIG = {
    "space": "pixel",
    "image_size": 32,
    "patch_size": 4,
    "num_layers": 6,
    "width": 128,
    "heads": 4,
    "text_layers": 2,
    "max_words": 8,
}
# The latent world (issue #15): 8×8×4 latents, patch 2 → 16 image tokens (the pixel model has 64).
LATENT_CONFIG = {"space": "latent", "image_size": 8, "patch_size": 2, "autoencoder": None}
PAD, BOS = 0, 1


#: the built-in weights shipped in the package, by name (``model.path: latent``)
BUILTIN_WEIGHTS = {"pixel": "shapes_base.safetensors", "latent": "shapes_latent.safetensors"}


def default_weights_path(name: str = "pixel") -> Path:
    return Path(str(resources.files("tpgrpo") / "assets" / BUILTIN_WEIGHTS[name]))


class ShapesTokenizer:
    """Word-level tokenizer: [BOS] + words + [PAD]…; words outside the grammar raise a clear error."""

    def __init__(self, words: Sequence[str], max_words: int):
        self.word_to_id = {w: i + 2 for i, w in enumerate(words)}
        self.max_words = max_words

    @property
    def vocab_size(self) -> int:
        return len(self.word_to_id) + 2

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), self.max_words + 1), PAD, dtype=torch.long)
        ids[:, 0] = BOS
        for i, p in enumerate(prompts):
            words = p.lower().split()
            if len(words) > self.max_words:
                raise ValueError(f"prompt {p!r} has {len(words)} words; the shapes text encoder takes at most {self.max_words}")
            for j, w in enumerate(words):
                if w not in self.word_to_id:
                    raise ValueError(f"prompt {p!r}: word {w!r} is not in the shapes vocabulary")
                ids[i, j + 1] = self.word_to_id[w]
        return ids


class ShapesTextEncoder(nn.Module):
    """Token + position embeddings and a small pre-norm transformer encoder; pooled output = the BOS state."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=ids == PAD))
        return h, h[:, 0]


class ShapesModel(nn.Module):
    """Text encoder + tiny SD3 transformer, in pixel space ([-1, 1], 3×32×32) or on autoencoder latents."""

    lora_target_modules = SD3_ATTENTION_PROJECTIONS

    def __init__(self, config: dict | None = None, *, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        if c["space"] not in ("pixel", "latent"):
            raise ValueError(f"shapes model config: space must be 'pixel' or 'latent', got {c['space']!r}")
        self.autoencoder = ShapesAutoencoder(c.get("autoencoder")).eval() if c["space"] == "latent" else None
        if self.autoencoder is not None:
            self.autoencoder.requires_grad_(False)
            c["autoencoder"] = self.autoencoder.config
        channels = self.autoencoder.config["latent_channels"] if self.autoencoder is not None else 3
        self.tokenizer = ShapesTokenizer(vocabulary(), c["max_words"])
        self.text_encoder = ShapesTextEncoder(self.tokenizer.vocab_size, c["width"], c["text_layers"], c["heads"],
                                              c["max_words"] + 1)
        self.transformer = SD3Transformer2DModel(
            sample_size=c["image_size"], patch_size=c["patch_size"], in_channels=channels, out_channels=channels,
            num_layers=c["num_layers"], attention_head_dim=c["width"] // c["heads"], num_attention_heads=c["heads"],
            joint_attention_dim=c["width"], caption_projection_dim=c["width"], pooled_projection_dim=c["width"],
            pos_embed_max_size=c["image_size"] // c["patch_size"],
        )
        self.autocast_dtype = autocast_dtype

    # --- protocol ---------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        s = self.config["image_size"]
        return (self.autoencoder.config["latent_channels"] if self.autoencoder is not None else 3, s, s)

    def train(self, mode: bool = True) -> "ShapesModel":
        """The autoencoder is frozen and always in eval mode (its latent normalisation uses running statistics)."""
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        ids = self.tokenizer(list(prompts)).to(self.device)
        hidden, pooled = self.text_encoder(ids)
        return PromptEmbeds(hidden.float(), pooled.float())

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ValueError for a prompt the tokenizer cannot take."""
        self.tokenizer(list(prompts))

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def raw_velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: PromptEmbeds) -> torch.Tensor:
        """One transformer call: fp32 velocity for a batch of states at noise level sigma (timestep 1000·σ), on the
        states' device (the model may sit on a GPU while rollout states stay on the host, as for SD3)."""
        device = self.device
        t = sigma_batch(sigma, x.shape[0], device) * 1000.0
        with self._autocast():
            out = self.transformer(hidden_states=x.to(device), encoder_hidden_states=cond.hidden.to(device),
                                   pooled_projections=cond.pooled.to(device), timestep=t, return_dict=False)[0]
        return out.float().to(x.device)

    def velocity(self, x, sigma, cond, uncond=None, guidance_scale=1.0):
        if uncond is None or guidance_scale == 1.0:
            return self.raw_velocity(x, sigma, cond)
        n = x.shape[0]
        s = sigma_batch(sigma, n, x.device)
        v = self.raw_velocity(torch.cat([x, x]), torch.cat([s, s]), PromptEmbeds.cat([uncond, cond]))
        return apply_cfg(v[:n], v[n:], guidance_scale)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """uint8 RGB images from final states (through the autoencoder's decoder in the latent space)."""
        x = x.detach().float()
        if self.autoencoder is not None:
            with torch.no_grad():
                x = self.autoencoder.decode(x.to(self.device))
        return self.tensor_to_images(x)

    @staticmethod
    def tensor_to_images(x: torch.Tensor) -> np.ndarray:
        """float [B, 3, H, W] in [-1, 1] (clamped) → uint8 [B, H, W, 3]; the inverse of :meth:`images_to_tensor`."""
        img = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def images_to_tensor(images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1]."""
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] → the model's data space (pixels in [-1, 1], or normalised autoencoder latents)."""
        x = self.images_to_tensor(images).to(self.device)
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return self.autoencoder.encode(x)

    # --- weights ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write weights (safetensors) and the config (as safetensors metadata) atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"config": json.dumps(self.config)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kw) -> "ShapesModel":
        if path is None or str(path) in BUILTIN_WEIGHTS:
            path = default_weights_path(str(path) if path else "pixel")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model weights not found: {path} (train them with `tpgrpo pretrain-shapes`)")
        from ..io_checks import load_module_with_config

        return load_module_with_config(path, "shapes model", lambda config: cls(config, **kw))
