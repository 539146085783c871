"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, as in DDPO / Flow-GRPO): the L2-normalised CLIP
image embedding of CLIP ViT-L/14 goes through a linear MLP head; scores are on the predictor's ~1–10 scale (not
rescaled).

Options: ``head`` (required: local weights of the MLP head, ``.safetensors``; a ``.pth``/``.pt`` state dict such
as the original ``sac+logos+ava1-l14-linearMSE.pth`` is read with ``torch.load(weights_only=True)``, never
unpickled), ``model`` (CLIP location, default ``openai/clip-vit-large-patch14``), ``device``, ``dtype``,
``batch_size``. Score: ``aesthetic`` (primary).

The head file must hold exactly these tensors (D = the CLIP model's ``projection_dim``, 768 for ViT-L/14)::

    layers.0.weight [1024, D]   layers.0.bias [1024]
    layers.2.weight [128, 1024] layers.2.bias [128]
    layers.4.weight [64, 128]   layers.4.bias [64]
    layers.6.weight [16, 64]    layers.6.bias [16]
    layers.7.weight [1, 16]     layers.7.bias [1]

(the original ``nn.Sequential`` with dropouts at 1, 3, 5 and no activations). To convert the original file:
``save_file(torch.load("sac+logos+ava1-l14-linearMSE.pth", weights_only=True), "aesthetic_head.safetensors")``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .base import check_batch, one_line, register_reward
from .clip_common import ClipBackbone

HEAD_LAYERS = (("layers.0", 1024, None), ("layers.2", 128, 1024), ("layers.4", 64, 128), ("layers.6", 16, 64),
               ("layers.7", 1, 16))


def expected_head_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, out, inp in HEAD_LAYERS:
        shapes[f"{name}.weight"] = (out, dim if inp is None else inp)
        shapes[f"{name}.bias"] = (out,)
    return shapes


def load_aesthetic_head(path: str, dim: int):
    """Read and check the MLP head's tensors; returns the head (a module with ``.layers``) in float32."""
    import torch
    from torch import nn

    if not path:
        raise ValueError("aesthetic: head= is required (local .safetensors with the LAION aesthetic MLP weights)")
    if not os.path.isfile(path):
        raise ValueError(f"aesthetic: head weights file {path!r} does not exist")
    try:
        if str(path).endswith((".pth", ".pt", ".bin")):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"aesthetic: cannot read head weights {path!r}: {one_line(e)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"aesthetic: head weights {path!r} are not a state dict of tensors")
    want = expected_head_shapes(dim)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"aesthetic: head weights {path!r}: missing tensors {missing}, unexpected tensors {extra} "
                         f"(expected layers.{{0,2,4,6,7}}.{{weight,bias}})")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"aesthetic: head weights {path!r}: tensor {k} has shape {list(state[k].shape)}, "
                             f"expected {list(shape)} (CLIP projection_dim {dim})")
    head = nn.Module()
    head.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    head.forward = head.layers.forward
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticReward:
    primary = "aesthetic"

    def __init__(self, head: str | None = None, model: str = "openai/clip-vit-large-patch14", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32):
        if not head:
            raise ValueError("aesthetic: head= is required (local .safetensors with the LAION aesthetic MLP weights)")
        if not os.path.isfile(head):
            raise ValueError(f"aesthetic: head weights file {head!r} does not exist")
        self.clip = ClipBackbone("aesthetic", model, None, device, dtype, batch_size, need_text=False)
        self.head = load_aesthetic_head(head, self.clip.model.config.projection_dim).to(self.clip.device)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        import torch

        images = check_batch("aesthetic", images, prompts, metadata)
        emb = self.clip.image_embeds(images)
        with torch.inference_mode():
            scores = self.head(emb.float()).squeeze(-1)
        return {"aesthetic": scores.double().cpu().numpy()}
