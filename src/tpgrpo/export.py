"""Loading trained LoRA weights from a checkpoint back into a model."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_checkpoint


def add_lora(model, rank: int, alpha: float) -> None:
    from peft import LoraConfig

    model.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                             target_modules=list(model.lora_target_modules)))


def load_lora_into(model, cfg, checkpoint_dir: str | Path, *, use_ema: bool = True) -> None:
    """Add the configured LoRA to ``model`` and load a checkpoint's EMA (default) or raw LoRA weights."""
    ck = load_checkpoint(Path(checkpoint_dir))
    add_lora(model, cfg.training.lora_rank, cfg.training.lora_alpha)
    params = [(n, p) for n, p in model.transformer.named_parameters() if "lora_" in n]
    if len(params) != len(ck["lora"]):
        raise ValueError(f"{checkpoint_dir}: checkpoint has {len(ck['lora'])} LoRA tensors, the configured LoRA has "
                         f"{len(params)} (check training.lora_rank)")
    for i, (name, p) in enumerate(params):
        src = ck["ema"][f"shadow.{i}"] if use_ema else ck["lora"][name]
        if src.shape != p.shape:
            raise ValueError(f"{checkpoint_dir}: {name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
        p.data.copy_(src)
