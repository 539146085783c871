"""``tpgrpo sample``: images from the base model, a trained checkpoint or an exported LoRA.

Image j of prompt i starts from its own generator, seeded from (seed, i, j), which also draws its transition noise
under a stochastic sampler, so an image does not depend on which other images were sampled with it. The output
directory gets ``pPPPP_sSS.png`` per image, ``index.json`` / ``index.csv`` (file, prompt, seed) and ``grid.png``."""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import MAX_SEED, MAX_STEPS
from .evaluation import save_image_grid
from .io_checks import first_line
from .models.base import PromptEmbeds, encode_each
from .prompts import MAX_PROMPT_CHARS
from .rollout import RolloutPlan, initial_noise, make_generators, sample_rollout

SAMPLERS = ("ode", "sde", "cps", "dance")
MAX_IMAGES = 10_000         # per command: a typo in --n-per-prompt must not fill the disk
MAX_GRID = 256              # images shown in grid.png (the first ones)
STORED_BYTES = 1 << 31      # stochastic samplers keep every step's latents: chunks stay below this


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of image ``sample_index`` of prompt ``prompt_index`` (63 bits, well mixed)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint64)[0]) >> 1


def read_prompts(prompts_file: str | None, texts: Sequence[str] | None) -> list[str]:
    """The prompts of ``--prompts FILE`` (or ``shapes:train`` / ``shapes:test``) or of the ``--prompt`` flags."""
    from .prompts import load_prompt_source

    if prompts_file and texts:
        raise ValueError("--prompts and --prompt exclude each other (put every prompt in the file)")
    if prompts_file:
        return [text for text, _ in load_prompt_source(prompts_file, "--prompts").prompts]
    if not texts:
        raise ValueError("no prompts: give --prompts FILE (one prompt a line) or --prompt TEXT (repeatable)")
    prompts = [t.strip() for t in texts]
    for t in prompts:
        if not t:
            raise ValueError("--prompt: empty prompt")
        if len(t) > MAX_PROMPT_CHARS:
            raise ValueError(f"--prompt: prompt longer than {MAX_PROMPT_CHARS} characters")
    return prompts


def check_options(n_prompts: int, *, n_per_prompt: int, steps: int, guidance: float, noise_level: float,
                  seed: int, sampler: str) -> None:
    """ValueError naming the flag of the first impossible value."""
    if n_per_prompt < 1:
        raise ValueError(f"--n-per-prompt: expected an integer >= 1, got {n_per_prompt}")
    if n_prompts * n_per_prompt > MAX_IMAGES:
        raise ValueError(f"--n-per-prompt: {n_per_prompt} images × {n_prompts} prompt(s) exceeds the {MAX_IMAGES} "
                         "images one command may write")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps: expected 1 to {MAX_STEPS}, got {steps}")
    if not (math.isfinite(guidance) and 1.0 <= guidance <= 100.0):
        raise ValueError(f"--guidance: expected a finite number in [1, 100], got {guidance}")
    if not (math.isfinite(noise_level) and 0.0 < noise_level <= 10.0):
        raise ValueError(f"--noise-level: expected a finite number in (0, 10], got {noise_level}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed: expected 0 to {MAX_SEED}, got {seed}")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")


def resolve_lora(path: str | Path) -> tuple[str, Path]:
    """What ``--lora PATH`` names: ("exported", the safetensors file) for a directory holding an exported
    ``pytorch_lora_weights.safetensors`` (or that file); ("transformer", its directory) for ``export-lora``'s
    full fine-tuning output (``PATH/transformer``); else ("checkpoint", the checkpoint directory) for a checkpoint,
    ``checkpoints/latest`` or a run directory."""
    from .checkpoint import resolve_checkpoint
    from .export import LORA_WEIGHT_NAME

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--lora: {p} does not exist")
    if p.is_file() and p.suffix == ".safetensors":
        return "exported", p
    if p.is_dir() and (p / LORA_WEIGHT_NAME).is_file():
        return "exported", p / LORA_WEIGHT_NAME
    if p.is_dir() and (p / "transformer" / "config.json").is_file():
        return "transformer", p / "transformer"
    try:
        return "checkpoint", resolve_checkpoint(p)
    except FileNotFoundError as e:
        raise ValueError(f"--lora: {e}; nor an exported LoRA ({LORA_WEIGHT_NAME} or transformer/)") from None


def load_exported_lora(model, file: Path) -> None:
    """Load a diffusers-format LoRA file (``export_lora``'s) into ``model.transformer`` (rank and alpha from its
    metadata)."""
    from diffusers.utils import logging as diffusers_logging

    from .export import has_lora

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its multi-line logs; failures are raised below
    try:
        model.transformer.load_lora_adapter(str(file.parent), prefix="transformer", weight_name=file.name)
    except Exception as e:  # peft / diffusers / safetensors raise many kinds; all mean "not a LoRA of this model"
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"--lora: {file}: cannot load it into this model's transformer ({msg})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not has_lora(model.transformer):
        raise ValueError(f"--lora: {file} holds no LoRA weights for this model's transformer")


def load_exported_transformer(model, directory: Path) -> None:
    """Load a fully fine-tuned transformer saved by ``export-lora`` (safetensors shards) into ``model.transformer``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    try:
        if not files:
            raise ValueError("no .safetensors weights in it")
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        model.transformer.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"--lora: {directory}: not a transformer of this model ({msg})") from None


@torch.no_grad()
def sample_images(model, cond: PromptEmbeds, n_per_prompt: int, seed: int, sigmas: torch.Tensor, *,
                  guidance_scale: float, sampler: str = "ode", noise_level: float = 0.7,
                  max_batch: int = 256) -> Iterator[tuple[list[tuple[int, int, int]], np.ndarray]]:
    """Sample ``n_per_prompt`` images of each prompt of ``cond`` (one embedding per prompt) and yield them chunk by
    chunk as (items, uint8 images [B, H, W, 3]); an item is (prompt index, sample index, seed). ``ode`` is the
    evaluation sampler; ``sde`` / ``cps`` / ``dance`` take that stochastic step on every step but the last."""
    steps = len(sigmas) - 1
    stochastic = sampler != "ode"
    plan = RolloutPlan(sigmas=sigmas, kernel=sampler if stochastic else "cps", noise_level=noise_level,
                       window=list(range(steps - 1)) if stochastic else [], guidance_scale=guidance_scale,
                       max_batch=max_batch)
    shape = model.latent_shape()
    chunk = max_batch
    if stochastic:  # sample_rollout keeps the latents before and after every window step
        chunk = max(1, min(chunk, STORED_BYTES // (8 * max(1, steps - 1) * math.prod(shape))))
    items = [(i, j, image_seed(seed, i, j)) for i in range(len(cond)) for j in range(n_per_prompt)]
    uncond = model.encode_prompts([""])
    for lo in range(0, len(items), chunk):
        part = items[lo:lo + chunk]
        generators = make_generators([s for _, _, s in part])
        noise = initial_noise(generators, shape)
        rows = cond.index(torch.tensor([i for i, _, _ in part]))
        out = sample_rollout(model, plan, rows, uncond.expand(len(part)), noise, generators)
        yield part, model.decode(out.final_latents)


def _grid_label(label: str) -> str:
    lines = textwrap.wrap(label, 26)
    return "\n".join(lines[:3]) + ("…" if len(lines) > 3 else "")


def save_sample_grid(images: Sequence[np.ndarray], labels: Sequence[str], path: Path, *, cols: int = 8,
                     cell: int = 160) -> Path:
    """A PNG grid of ``images``, each fitted into a ``cell``-pixel square with its label (wrapped) below it."""
    return save_image_grid(images, [_grid_label(t) for t in labels], path, cols=cols, box=cell, text_h=48)


def run_sample(cfg, *, prompts_file: str | None = None, prompt_texts: Sequence[str] | None = None,
               lora: str | None = None, raw: bool = False, n_per_prompt: int = 1, seed: int = 0,
               out: str = "samples", steps: int | None = None, guidance: float | None = None, sampler: str = "ode",
               noise_level: float | None = None) -> dict:
    """``tpgrpo sample``: check every input (ValueError naming the flag, before the model loads), load the model
    and weights, sample, and write the PNGs, ``index.json``, ``index.csv`` and ``grid.png`` into ``out``. Defaults
    come from ``cfg.sampling`` (eval_num_steps, guidance_scale, noise_level). Returns the index."""
    from .io_checks import output_dir
    from .models import load_model, model_sigmas

    steps = cfg.sampling.eval_num_steps if steps is None else steps
    guidance = cfg.sampling.guidance_scale if guidance is None else guidance
    noise_level = cfg.sampling.noise_level if noise_level is None else noise_level
    prompts = read_prompts(prompts_file, prompt_texts)
    check_options(len(prompts), n_per_prompt=n_per_prompt, steps=steps, guidance=guidance, noise_level=noise_level,
                  seed=seed, sampler=sampler)
    out_dir = output_dir("--out", out)
    if raw and not lora:
        raise ValueError("--raw needs --lora (a checkpoint whose raw weights to load)")
    kind, weights = resolve_lora(lora) if lora else (None, None)
    if raw and kind != "checkpoint":
        raise ValueError("--raw: exported weights are one set of weights; --raw applies to checkpoints")

    try:
        model = load_model(cfg.model)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise ValueError(first_line(e)) from None
    if kind == "exported":
        load_exported_lora(model, weights)
    elif kind == "transformer":
        load_exported_transformer(model, weights)
    elif kind == "checkpoint":
        from .export import load_lora_into

        try:
            load_lora_into(model, cfg, weights, use_ema=not raw)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--lora: {e}") from None
    try:
        cond = encode_each(model, prompts)
    except ValueError as e:
        raise ValueError(f"{'--prompts' if prompts_file else '--prompt'}: {e}") from None
    sigmas = model_sigmas(model, cfg.sampling, steps)

    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(n_per_prompt - 1)))
    entries, grid, done = [], [], 0
    for part, images in sample_images(model, cond, n_per_prompt, seed, sigmas, guidance_scale=guidance,
                                      sampler=sampler, noise_level=noise_level, max_batch=cfg.training.max_batch):
        for (i, j, s), img in zip(part, images):
            name = f"p{i:04d}_s{j:0{width}d}.png"
            Image.fromarray(img).save(out_dir / name)
            entries.append({"file": name, "prompt_index": i, "sample_index": j, "prompt": prompts[i], "seed": s})
            if len(grid) < MAX_GRID:
                grid.append((img, f"{name[:-4]}: {prompts[i]}"))
        done += len(part)
        if done < len(prompts) * n_per_prompt:
            print(f"sampled {done}/{len(prompts) * n_per_prompt}", file=sys.stderr, flush=True)
    which = None if kind is None else ("raw" if raw else "ema") if kind == "checkpoint" else "exported"
    index = {"settings": {"model": {"kind": cfg.model.kind, "path": cfg.model.path},
                          "lora": None if weights is None else str(weights), "lora_weights": which,
                          "sampler": sampler, "steps": steps, "guidance_scale": guidance,
                          "noise_level": noise_level if sampler != "ode" else None, "seed": seed,
                          "n_per_prompt": n_per_prompt, "sigmas": [round(s, 6) for s in sigmas.tolist()]},
             "images": entries}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out_dir / "index.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "prompt_index", "sample_index", "seed", "prompt"])
        writer.writeheader()
        writer.writerows(entries)
    save_sample_grid([g[0] for g in grid], [g[1] for g in grid], out_dir / "grid.png")
    return index
