"""The built-in world's latent autoencoder: 3×32×32 renders ↔ 4×8×8 latents (docs/design.md §6, issue #15).

The built-in model works in a latent space as SD3 does: a tiny convolutional autoencoder, trained only on crisp
renders, maps an image to a 4-channel 8×8 latent and back. Its decoder turns coarse latents into crisp shapes, so the
flow model's remaining mistakes are compositional (counts, positions, colour binding) rather than ragged pixels.

Encoder: 3×3 conv → two stride-2 convs (32→16→8) → 1×1 conv to ``latent_channels``, then a fixed per-channel
normalisation (a BatchNorm without affine parameters: its running statistics play the role of the SD3 VAE's
``shift_factor`` / ``scaling_factor``, so latents are ≈ N(0, 1) per channel). The decoder mirrors it with
nearest-neighbour upsampling. Training (``tpgrpo pretrain-shapes``, stage 1) minimises an object-weighted pixel MSE
with small Gaussian noise on the normalised latent, so that the decoder tolerates the flow model's imprecision.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_AE_CONFIG = {"channels": 32, "latent_channels": 4}


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU())


class ShapesAutoencoder(nn.Module):
    """uint8-range images in [-1, 1], [B, 3, 32, 32] ↔ normalised latents [B, latent_channels, 8, 8]."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**DEFAULT_AE_CONFIG, **(config or {})}
        c, z = self.config["channels"], self.config["latent_channels"]
        self.encoder = nn.Sequential(_block(3, c), _block(c, 2 * c, 2), _block(2 * c, 2 * c, 2), nn.Conv2d(2 * c, z, 1))
        self.latent_norm = nn.BatchNorm2d(z, affine=False, momentum=0.01)
        self.decoder = nn.Sequential(
            nn.Conv2d(z, 2 * c, 1), nn.SiLU(), _block(2 * c, 2 * c),
            nn.Upsample(scale_factor=2, mode="nearest"), _block(2 * c, c),
            nn.Upsample(scale_factor=2, mode="nearest"), _block(c, c),
            nn.Conv2d(c, 3, 3, padding=1),
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → normalised latents (batch statistics in train mode, the running ones in eval mode)."""
        return self.latent_norm(self.encoder(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images in [-1, 1] (unclamped)."""
        return self.decoder(latents)

    def forward(self, images: torch.Tensor, latent_noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(images)
        if latent_noise:
            z = z + latent_noise * torch.randn_like(z)
        return self.decode(z), z


def object_weights(images: torch.Tensor, background: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: ``object_weight`` where a pixel differs from the background colour, 1
    elsewhere (objects cover a small part of the canvas; unweighted, the loss would favour a blank background)."""
    is_object = (images - background.view(1, 3, 1, 1)).abs().amax(dim=1, keepdim=True) > 1e-3
    return 1.0 + (object_weight - 1.0) * is_object.float()


def reconstruction_loss(model: ShapesAutoencoder, images: torch.Tensor, background: torch.Tensor,
                        object_weight: float = 4.0, latent_noise: float = 0.1) -> torch.Tensor:
    """Object-weighted MSE of the reconstruction from a noised latent (the autoencoder's training objective)."""
    recon, _ = model(images, latent_noise)
    w = object_weights(images, background, object_weight)
    return (w * (recon - images) ** 2).sum() / (w.sum() * images.shape[1])
