"""FLUX.1 behind the FlowModel protocol (docs/design.md §7), over diffusers' ``FluxPipeline``.

Latents in the protocol are the *unpacked* VAE latents ``[C, res/8, res/8]`` (C = 16), fp32; packing into 2×2
patches (``[N, (h/2)(w/2), 4C]``), the image position ids and the text ids are handled inside :meth:`velocity`.
Guidance is the distilled guidance embedding (FLUX.1-dev): the guidance scale is passed as the ``guidance`` tensor
and the unconditional embedding is ignored. For a transformer without a guidance embedding (e.g. FLUX.1-schnell)
an unconditional embedding with a scale ≠ 1 gives true CFG in one batched call, like SD3.

Timestep convention: the pipeline passes ``timestep / 1000`` with ``timestep = 1000·σ``; we pass exactly that.
"""

from __future__ import annotations

import torch

from ..sampling import flux_mu
from .base import PromptEmbeds, apply_cfg, sigma_batch
from .sd3 import SD3_ATTENTION_PROJECTIONS, DiffusersFlowModel

FLUX_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
FLUX_LORA_TARGETS = SD3_ATTENTION_PROJECTIONS + FLUX_FEED_FORWARD


class FluxModel(DiffusersFlowModel):
    """FLUX.1 (``FluxPipeline``): pooled CLIP + T5 states, guidance embedding, packed latents."""

    kind = "flux"
    lora_target_modules = FLUX_LORA_TARGETS

    @staticmethod
    def _pipeline_class():
        from diffusers import FluxPipeline

        return FluxPipeline

    def _text_encoder_list(self):
        return [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2")]

    def _latent_multiple(self) -> int:
        return 2  # latents are packed in 2×2 patches

    def _default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def latent_shape(self) -> tuple[int, ...]:
        s = self.resolution // self.vae_scale_factor
        return (self.latent_channels, s, s)

    @property
    def image_seq_len(self) -> int:
        s = self.resolution // self.vae_scale_factor
        return (s // 2) * (s // 2)

    #: ``FluxPipeline`` passes ``sigmas = linspace(1, 1/T, T)`` to the scheduler (see ``sampling.sigma_schedule``).
    pipeline_spacing = "flux_pipeline"

    def schedule_mu(self) -> float:
        """The resolution-dependent shift ``mu`` the FLUX pipeline uses (for ``sampling.sigma_schedule(T, mu=…)``)."""
        c = self.pipe.scheduler.config
        return flux_mu(self.image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                       c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def uses_cfg(self) -> bool:
        return not self.guidance_embeds

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        hidden, pooled, _text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self._device,
                                                            **self._prompt_kw())
        return PromptEmbeds(hidden.float(), pooled.float())

    def velocity(self, x, sigma, cond, uncond=None, guidance_scale=1.0):
        if self.guidance_embeds or uncond is None or guidance_scale == 1.0:
            return self.raw_velocity(x, sigma, cond, guidance_scale)
        n = x.shape[0]  # no guidance embedding: true CFG
        s = sigma_batch(sigma, n, x.device)
        v = self.raw_velocity(torch.cat([x, x]), torch.cat([s, s]), PromptEmbeds.cat([uncond, cond]))
        return apply_cfg(v[:n], v[n:], guidance_scale)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.pipe._pack_latents(x, n, c, h, w)

    def unpack(self, packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        vsf = self.vae_scale_factor
        return self.pipe._unpack_latents(packed, h * vsf, w * vsf, vsf)

    def raw_velocity(self, x: torch.Tensor, sigma, cond: PromptEmbeds, guidance_scale: float = 1.0) -> torch.Tensor:
        """One transformer call on unpacked states x [N, C, h, w]: fp32 velocity, same shape, on x's device."""
        n, _, h, w = x.shape
        dev = self._device
        t = sigma_batch(sigma, n, dev) * 1000.0 / 1000.0  # the pipeline's `timestep / 1000` with timestep = 1000·σ
        hidden, pooled = self._embeds(cond)
        packed = self.pack(x.to(dev, torch.float32))
        img_ids = self.pipe._prepare_latent_image_ids(n, h // 2, w // 2, dev, torch.float32)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=dev, dtype=torch.float32)
        guidance = torch.full((n,), float(guidance_scale), device=dev, dtype=torch.float32) if self.guidance_embeds else None
        with self._autocast():
            out = self.transformer(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=pooled,
                                   encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids,
                                   return_dict=False)[0]
        return self.unpack(out.float(), h, w).to(x.device)
