"""The model protocol every method trains through (docs/design.md §5): encode prompts, velocity with guidance, decode.

A model works in its own "latent" space (pixels for the built-in model, VAE latents for SD3/FLUX). Velocities come
back in fp32 whatever the compute dtype, so that step math and log-probs are fp32 (docs/design.md §2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn


@dataclass
class PromptEmbeds:
    """Conditioning for a batch of prompts: per-token states [B, L, D] and a pooled vector [B, P]."""

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, idx) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden[idx], self.pooled[idx])

    def expand(self, n: int) -> "PromptEmbeds":
        """Repeat a single prompt's embedding n times."""
        return PromptEmbeds(self.hidden.expand(n, *self.hidden.shape[1:]), self.pooled.expand(n, *self.pooled.shape[1:]))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]))


def encode_each(model, prompts: Sequence[str]) -> PromptEmbeds:
    """Embed each prompt alone (a batch of one): a prompt's embedding is then the same bits whatever batch it came
    in, which exact resume and process-count independence rely on (a batched encoder's last bits depend on the
    batch composition)."""
    return PromptEmbeds.cat([model.encode_prompts([p]) for p in prompts])


@runtime_checkable
class FlowModel(Protocol):
    """What the rollout engine and trainer need from a text-to-image flow model."""

    transformer: nn.Module
    lora_target_modules: tuple[str, ...]

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent (without batch)."""

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embed prompts (the empty string is the unconditional prompt)."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: PromptEmbeds,
                 uncond: PromptEmbeds | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """fp32 velocity v = ε − x0 at noise level sigma, with classifier-free guidance when uncond is given."""

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """uint8 RGB images [B, H, W, 3] from final latents."""


def default_device() -> torch.device:
    """cuda:LOCAL_RANK where a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def sigma_batch(sigma: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """σ as a float32 vector of length n."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return s.expand(n).clone() if s.ndim == 0 else s.float()


def apply_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + g·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)
