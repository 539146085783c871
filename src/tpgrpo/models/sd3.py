"""Stable Diffusion 3 / 3.5 behind the FlowModel protocol (docs/design.md §7), over diffusers' ``StableDiffusion3Pipeline``.

Latents are VAE latents ``[C, res/8, res/8]`` (C = 16), kept in fp32; the transformer runs under autocast in the
configured dtype and its velocity comes back in fp32. CFG concatenates [uncond, cond] into one transformer call.
Text encoders and VAE are frozen and never trained; prompt embeddings come back in fp32 (the trainer caches them).

:class:`DiffusersFlowModel` holds what SD3 and FLUX share (loading, devices, autocast, decoding).
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .base import PromptEmbeds, apply_cfg, default_device, sigma_batch

SD3_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_pretrained(path: str | os.PathLike | None, kind: str) -> str:
    """A hub id (``owner/name``) or an existing diffusers directory with ``model_index.json``; else one clear line."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"model.path: required for model.kind={kind} (a hub id or a local diffusers directory)")
    p = Path(str(path)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"model.path: {p} is a file; model.kind={kind} needs a diffusers pipeline "
                                    f"directory (with model_index.json) or a hub id")
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"model.path: {p} has no model_index.json (not a diffusers pipeline directory)")
        return str(p)
    s = str(path)
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return s
    raise FileNotFoundError(f"model.path: directory not found: {p}")


class DiffusersFlowModel(nn.Module):
    """Shared machinery of the diffusers-backed models. Subclasses implement ``_pipeline_class``,
    ``encode_prompts``, ``latent_shape`` and ``raw_velocity``."""

    kind = ""
    lora_target_modules: tuple[str, ...] = ()
    decode_batch_size: int = 8
    encode_batch_size: int = 32

    def __init__(self, pipe, *, dtype: str = "fp32", resolution: int | None = None, device=None,
                 max_sequence_length: int | None = None, gradient_checkpointing: bool = False,
                 full_finetune: bool = False):
        super().__init__()
        self.pipe = pipe
        self.dtype_name = dtype
        self.compute_dtype = DTYPES[dtype]
        self.max_sequence_length = max_sequence_length
        self._device = torch.device(device) if device is not None else default_device()
        # Registered as submodules so that .requires_grad_(), .eval(), .to() and .parameters() reach them.
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleList([m for m in self._text_encoder_list() if m is not None])
        for m in [self.vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        self.to(self._device)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution) if resolution is not None else self._default_resolution()
        if self.resolution % (self.vae_scale_factor * self._latent_multiple()):
            raise ValueError(f"model.resolution: {self.resolution} must be a multiple of "
                             f"{self.vae_scale_factor * self._latent_multiple()}")
        if full_finetune:  # trained weights are fp32 master weights; compute still autocasts to the model dtype
            self.transformer.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # --- loading ----------------------------------------------------------------------------------------------
    @staticmethod
    def _pipeline_class():
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path, *, dtype: str = "fp32", **kw) -> "DiffusersFlowModel":
        """Load the pipeline from a hub id or local directory (safetensors only, never pickles)."""
        src = resolve_pretrained(path, cls.kind)
        pipeline_class = cls._pipeline_class()
        try:
            pipe = pipeline_class.from_pretrained(src, dtype=DTYPES[dtype], use_safetensors=True)
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"model.path: could not load a {pipeline_class.__name__} from {src}: "
                                    f"{first}") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, dtype=dtype, **kw)

    def _text_encoder_list(self):
        return [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]

    def _latent_multiple(self) -> int:
        return 1

    def _default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self._device

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self._device.type, dtype=self.compute_dtype)

    def _prompt_kw(self) -> dict:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

    # --- protocol ---------------------------------------------------------------------------------------------
    @property
    def uses_cfg(self) -> bool:
        """Whether ``velocity`` uses the unconditional embedding (CFG doubles the rows of a transformer call)."""
        return True

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """fp32 prompt embeddings (hidden [B, L, D], pooled [B, P]), encoded in chunks of ``encode_batch_size``."""
        prompts = list(prompts)
        parts = [self._encode(prompts[lo:lo + self.encode_batch_size])
                 for lo in range(0, len(prompts), self.encode_batch_size)]
        return parts[0] if len(parts) == 1 else PromptEmbeds.cat(parts)

    def velocity(self, x, sigma, cond, uncond=None, guidance_scale=1.0):
        """fp32 velocity on x's device; CFG as one batched call over [uncond, cond]."""
        if uncond is None or guidance_scale == 1.0:
            return self.raw_velocity(x, sigma, cond)
        n = x.shape[0]
        s = sigma_batch(sigma, n, x.device)
        v = self.raw_velocity(torch.cat([x, x]), torch.cat([s, s]), PromptEmbeds.cat([uncond, cond]))
        return apply_cfg(v[:n], v[n:], guidance_scale)

    def _embeds(self, e: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        return e.hidden.to(self._device), e.pooled.to(self._device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        """uint8 RGB [B, H, W, 3]: latents / scaling_factor + shift_factor → VAE → [-1, 1] → [0, 255]."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        out = []
        for lo in range(0, x.shape[0], self.decode_batch_size):
            lat = x[lo:lo + self.decode_batch_size].to(self._device, torch.float32)
            lat = lat / cfg.scaling_factor + shift
            img = self.vae.decode(lat.to(self.vae.dtype), return_dict=False)[0].float()
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)


class SD3Model(DiffusersFlowModel):
    """SD3 / SD3.5 (``StableDiffusion3Pipeline``): CFG by concatenation, timestep = 1000·σ."""

    kind = "sd3"
    lora_target_modules = SD3_ATTENTION_PROJECTIONS

    @staticmethod
    def _pipeline_class():
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def latent_shape(self) -> tuple[int, ...]:
        c = getattr(self.vae.config, "latent_channels", None) or self.transformer.config.in_channels
        s = self.resolution // self.vae_scale_factor
        return (int(c), s, s)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                       device=self._device, do_classifier_free_guidance=False,
                                                       **self._prompt_kw())
        return PromptEmbeds(hidden.float(), pooled.float())

    def raw_velocity(self, x: torch.Tensor, sigma, cond: PromptEmbeds) -> torch.Tensor:
        """One transformer call: fp32 velocity for states x at noise level σ (timestep 1000·σ)."""
        n = x.shape[0]
        t = sigma_batch(sigma, n, self._device) * 1000.0
        hidden, pooled = self._embeds(cond)
        with self._autocast():
            out = self.transformer(hidden_states=x.to(self._device, torch.float32), timestep=t,
                                   encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        return out.float().to(x.device)

