"""Trained weights in and out: adding LoRA, the KL reference, loading checkpoints back into a model, and exporting
LoRA in the diffusers format (``pipe.load_lora_weights(dir)`` loads it; docs/design.md §7)."""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint, resolve_checkpoint

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(model, rank: int, alpha: float) -> None:
    """Add a peft LoRA adapter (``default``) on ``model.lora_target_modules``; the LoRA weights are fp32 even when
    the base weights are fp16/bf16 (they are the trained master weights)."""
    from peft import LoraConfig

    targets = list(model.lora_target_modules)
    widths = [min(m.in_features, m.out_features) for name, m in model.transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not widths:
        raise ValueError(f"model.lora_target_modules: none of {targets} names a linear layer of the transformer")
    if rank > min(widths):
        raise ValueError(f"training.lora_rank: {rank} exceeds the width of the smallest targeted layer ({min(widths)})")
    model.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                             target_modules=targets))
    for name, p in model.transformer.named_parameters():
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()


def has_lora(transformer) -> bool:
    return any("lora_" in n for n, _ in transformer.named_parameters())


# --- full fine-tuning and the KL reference ------------------------------------------------------------------------
def prepare_full_finetune(model) -> list[torch.nn.Parameter]:
    """Full fine-tuning: every transformer weight trains (no LoRA). Returns the trainable parameters."""
    model.transformer.requires_grad_(True)
    return [p for p in model.transformer.parameters() if p.requires_grad]


@contextmanager
def swapped_transformer(model, transformer):
    """Temporarily run ``model`` with another transformer module (same architecture)."""
    original = model.transformer
    model.transformer = transformer
    try:
        yield model
    finally:
        model.transformer = original


@contextmanager
def adapters_disabled(model):
    """Temporarily run ``model`` as its base model: the LoRA adapters of its transformer switched off."""
    model.transformer.disable_adapters()
    try:
        yield model
    finally:
        model.transformer.enable_adapters()


def make_reference(model, *, copy_weights: bool | None = None) -> Callable:
    """The KL reference policy as ``velocity_ref(x, sigma, cond, uncond=None, guidance_scale=1.0)`` (no grad, fp32).

    With LoRA on the transformer the reference is the base model (adapters disabled for the call); otherwise
    (full fine-tuning) it is a frozen deep copy of the transformer *as it is now*, kept in the model's compute
    dtype. Call it once, right after loading the model and before any update or checkpoint restore.
    """
    if copy_weights is None:
        copy_weights = not has_lora(model.transformer)
    if not copy_weights:
        def velocity_ref(x, sigma, cond, uncond=None, guidance_scale=1.0):
            with torch.no_grad(), adapters_disabled(model):
                return model.velocity(x, sigma, cond, uncond, guidance_scale)

        velocity_ref.transformer = None
        return velocity_ref

    ref = copy.deepcopy(model.transformer)
    dtype = getattr(model, "compute_dtype", None)
    if dtype is not None and dtype != torch.float32:
        ref.to(dtype)
    ref.requires_grad_(False)
    ref.eval()

    def velocity_ref(x, sigma, cond, uncond=None, guidance_scale=1.0):
        with torch.no_grad(), swapped_transformer(model, ref):
            return model.velocity(x, sigma, cond, uncond, guidance_scale)

    velocity_ref.transformer = ref
    return velocity_ref


# --- checkpoints ----------------------------------------------------------------------------------------------------
def trained_lora_settings(checkpoint: Path, lora: dict[str, torch.Tensor], cfg) -> tuple[int, float]:
    """The (rank, alpha) a checkpoint's LoRA was trained with: the rank its ``lora_A`` tensors have, the alpha of its
    run's ``config.yaml`` (``RUN/checkpoints/epoch_N``; ``cfg``'s where there is none). So ``tpgrpo sample``/``eval
    --lora RUN`` load a run trained with another rank or alpha than ``-c``'s."""
    from .config import load_yaml

    run_cfg = Path(checkpoint).resolve().parent.parent / "config.yaml"
    training = ((load_yaml(run_cfg.read_text()) or {}).get("training") or {}) if run_cfg.is_file() else {}
    ranks = {t.shape[0] for n, t in lora.items() if "lora_A" in n}
    rank = ranks.pop() if len(ranks) == 1 else cfg.training.lora_rank
    return rank, float(training.get("lora_alpha", cfg.training.lora_alpha))


def load_lora_into(model, cfg, checkpoint_dir: str | Path, *, use_ema: bool = True) -> None:
    """Load a checkpoint's EMA (default) or raw trained weights into ``model``: the configured LoRA (added here), or
    every transformer weight when ``model.full_finetune`` is set."""
    checkpoint_dir = resolve_checkpoint(checkpoint_dir)  # a run directory or `latest` names its newest checkpoint
    ck = load_checkpoint(checkpoint_dir)
    if getattr(cfg.model, "full_finetune", False):
        params = list(model.transformer.named_parameters())
        if len(params) != len(ck["lora"]):
            raise ValueError(f"{checkpoint_dir}: checkpoint has {len(ck['lora'])} tensors, the transformer has "
                             f"{len(params)} (is it a full fine-tuning checkpoint of this model?)")
    else:
        add_lora(model, *trained_lora_settings(checkpoint_dir, ck["lora"], cfg))
        params = [(n, p) for n, p in model.transformer.named_parameters() if "lora_" in n]
        if len(params) != len(ck["lora"]):
            raise ValueError(f"{checkpoint_dir}: checkpoint has {len(ck['lora'])} LoRA tensors, the configured LoRA "
                             f"has {len(params)} (check training.lora_rank and model.lora_target_modules)")
    for i, (name, p) in enumerate(params):
        if name not in ck["lora"]:
            raise ValueError(f"{checkpoint_dir}: checkpoint has no tensor {name}")
        src = ck["ema"].get(f"shadow.{i}") if use_ema else ck["lora"][name]
        if src is None:
            raise ValueError(f"{checkpoint_dir}: its EMA has no tensor shadow.{i}")
        if src.shape != p.shape:
            raise ValueError(f"{checkpoint_dir}: {name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(src)


# --- diffusers-format export ----------------------------------------------------------------------------------------
def _pipeline_class(model):
    pipe = getattr(model, "pipe", None)
    if pipe is not None:
        return type(pipe)
    from diffusers import StableDiffusion3Pipeline  # the shapes model is an SD3Transformer2DModel

    return StableDiffusion3Pipeline


def export_lora(model, out_dir: str | Path, *, adapter_name: str = "default") -> Path:
    """Write the transformer's LoRA as ``out_dir/pytorch_lora_weights.safetensors`` in the diffusers format (with the
    LoRA config as metadata, so rank and alpha load back exactly): ``pipe.load_lora_weights(out_dir)`` on a fresh
    pipeline of the same family reproduces the trained transformer."""
    from peft.utils import get_peft_model_state_dict

    transformer = model.transformer
    if not has_lora(transformer):
        raise ValueError("export_lora: the model's transformer has no LoRA adapter")
    layers = {k: v.detach().contiguous().cpu()
              for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
    meta = transformer.peft_config[adapter_name].to_dict()
    for k, v in list(meta.items()):
        if isinstance(v, set):
            meta[k] = sorted(v)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _pipeline_class(model).save_lora_weights(str(out), transformer_lora_layers=layers,
                                             transformer_lora_adapter_metadata=meta, safe_serialization=True,
                                             weight_name=LORA_WEIGHT_NAME)
    return out / LORA_WEIGHT_NAME


def export_lora_cli(args) -> int:
    """``tpgrpo export-lora --config C --checkpoint DIR --out DIR [--raw]``: a checkpoint's EMA (default) or raw LoRA
    in the diffusers format; a full fine-tuning checkpoint is written as a diffusers transformer (``OUT/transformer``)."""
    from .config import load_config
    from .models import load_model

    from .io_checks import output_dir

    cfg = load_config(args.config, getattr(args, "overrides", None))
    try:
        output_dir("--out", args.out)
        model = load_model(cfg.model)
        load_lora_into(model, cfg, args.checkpoint, use_ema=not getattr(args, "raw", False))
        out = Path(args.out)
        if cfg.model.full_finetune:
            model.transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
            print(f"wrote {out / 'transformer'}")
        else:
            print(f"wrote {export_lora(model, out)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_export_lora_parser(subparsers) -> None:
    p = subparsers.add_parser("export-lora", help="export a checkpoint's LoRA in the diffusers format "
                                                  "(pipe.load_lora_weights(OUT) loads it)")
    p.add_argument("--config", "-c", help="YAML preset the run was trained with")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (run_dir/checkpoints/epoch_…)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--raw", action="store_true", help="export the raw trained weights instead of their EMA")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="override single fields")
    p.set_defaults(fn=export_lora_cli)
