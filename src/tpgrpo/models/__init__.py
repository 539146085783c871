"""Model adapters behind one protocol (see base.py)."""

import torch

from .base import FlowModel, PromptEmbeds


def load_model(model_cfg) -> FlowModel:
    """Build the configured model (``model.kind``) from ``model.path``.

    shapes: a safetensors file (None: the built-in weights), placed on ``model.device``. sd3 / flux: a hub id or a
    local diffusers pipeline directory (``model_index.json``), loaded with ``use_safetensors=True``.
    """
    kind = model_cfg.kind
    if kind == "shapes":
        from .base import default_device
        from .toy import ShapesModel

        try:
            device = torch.device(model_cfg.device) if model_cfg.device else default_device()
        except RuntimeError as e:
            raise ValueError(f"model.device: {model_cfg.device!r} is not a torch device ({e})") from None
        model = ShapesModel.load(model_cfg.path).to(device)
        if getattr(model_cfg, "gradient_checkpointing", False):
            model.transformer.enable_gradient_checkpointing()
    elif kind in ("sd3", "flux"):
        if kind == "sd3":
            from .sd3 import SD3Model as cls
        else:
            from .flux import FluxModel as cls
        model = cls.from_pretrained(model_cfg.path, dtype=model_cfg.dtype, resolution=model_cfg.resolution,
                                    device=model_cfg.device, max_sequence_length=model_cfg.max_sequence_length,
                                    gradient_checkpointing=model_cfg.gradient_checkpointing,
                                    full_finetune=model_cfg.full_finetune)
    else:
        raise ValueError(f"model.kind: unknown model kind {kind!r}")
    targets = getattr(model_cfg, "lora_target_modules", None)
    if targets:
        model.lora_target_modules = tuple(targets)
    return model


def model_sigmas(model: FlowModel, sampling_cfg, num_steps: int):
    """The σ schedule of ``num_steps`` steps for ``model`` under ``sampling.spacing`` / ``sampling.shift``
    (docs/design.md §2). ``auto`` takes the spacing of the model's own diffusers pipeline (``model.pipeline_spacing``,
    FLUX: ``flux_pipeline``; otherwise the scheduler's default); a model with a resolution-dependent shift
    (``model.schedule_mu()``, FLUX) uses it, except under DanceGRPO's ``linspace``, which applies the static
    ``sampling.shift``."""
    from ..sampling import sigma_schedule

    spacing = sampling_cfg.spacing
    if spacing == "auto":
        spacing = getattr(model, "pipeline_spacing", "scheduler")
    mu = model.schedule_mu() if hasattr(model, "schedule_mu") and spacing != "linspace" else None
    return sigma_schedule(num_steps, sampling_cfg.shift, mu=mu, spacing=spacing)


__all__ = ["FlowModel", "PromptEmbeds", "load_model", "model_sigmas"]
