"""Pretraining of the built-in shapes base model (``tpgrpo pretrain-shapes``).

Rectified-flow matching in pixel space on freshly rendered train-split scenes: x_σ = (1 − σ)·x0 + σ·ε, target
v = ε − x0, σ ~ logit-normal(0, 1) (as SD3 trains), tag-balanced prompt sampling, caption dropout so that
classifier-free guidance works, and optional caption noise: with probability ``caption_noise`` a scene is rendered
for a *neighbouring* train prompt (one slot changed: a shape, count, colour or relation) while the caption keeps the
original text, as web alt-text often misdescribes its image. ``init`` starts from existing weights (a second,
fine-tuning stage). Resumable: a state file in the work directory is written atomically every
``ckpt_every`` steps and picked up again on restart.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..io_checks import input_file, output_dir, output_file
from ..models.toy import ShapesModel
from .grammar import TAGS, PromptSpec, split_prompts
from .render import render_prompt


@dataclass
class PretrainConfig:
    out: str = "pretrain"             # work directory (state file, log)
    export: str | None = None          # where to write the final safetensors (default: <out>/shapes_base.safetensors)
    steps: int = 9000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 250
    threads: int | None = None
    bf16: bool = False  # fp32 measured faster than bf16 autocast on the 2-core dev CPU
    caption_noise: float = 0.0         # probability that a caption describes a neighbouring prompt's scene
    init: str | None = None            # safetensors weights to start from (default: random initialisation)

    def __post_init__(self):
        for name in ("steps", "batch_size", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000_000:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer in [1, 10000000], got {v}")
        if self.batch_size > 65536:
            raise ValueError(f"--batch-size must be at most 65536, got {self.batch_size}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup must be in [0, --steps], got {self.warmup}")
        if not (math.isfinite(self.lr) and 0 <= self.lr <= 10):
            raise ValueError(f"--lr must be a finite number in [0, 10], got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.seed <= (1 << 63) - 1:
            raise ValueError(f"--seed must be in [0, 2^63), got {self.seed}")
        output_dir("--out", self.out)
        if self.export is not None:
            output_file("--export", self.export, (".safetensors",))
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(f"caption_noise must be in [0, 1), got {self.caption_noise}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.init is not None:
            input_file("--init", self.init)
            try:
                with safe_open(self.init, "pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                raise ValueError(f"--init: {self.init} is not a safetensors file ({e})") from None


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _slots(spec: PromptSpec) -> tuple:
    """The prompt's slot values in order: (shape, count, colour) per clause, then the relation."""
    flat = tuple(v for c in spec.clauses for v in (c.shape, c.count, c.color))
    return flat + ((spec.relation[0] if spec.relation else None),)


def neighbours(prompts: list[PromptSpec]) -> dict[str, list[PromptSpec]]:
    """For each prompt, the prompts of the same tag in ``prompts`` that differ from it in exactly one slot."""
    slots = [_slots(p) for p in prompts]
    return {p.text: [q for q, sq in zip(prompts, slots) if q.tag == p.tag and sum(a != b for a, b in zip(sp, sq)) == 1]
            for p, sp in zip(prompts, slots)}


def draw_example(rng: random.Random, by_tag: dict[str, list[PromptSpec]], near: dict[str, list[PromptSpec]],
                 caption_noise: float) -> tuple[PromptSpec, str]:
    """One (scene to render, caption) pair: a tag uniformly, a prompt of that tag; with probability
    ``caption_noise`` the scene is one of the prompt's neighbours instead (prompts without neighbours stay exact)."""
    spec = rng.choice(by_tag[rng.choice(TAGS)])
    if caption_noise and rng.random() < caption_noise and near[spec.text]:
        return rng.choice(near[spec.text]), spec.text
    return spec, spec.text


def _batch(rng: random.Random, by_tag: dict[str, list[PromptSpec]], near: dict[str, list[PromptSpec]],
           cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    images, texts = [], []
    for _ in range(cfg.batch_size):
        scene, caption = draw_example(rng, by_tag, near, cfg.caption_noise)
        images.append(render_prompt(scene, rng.getrandbits(31)))
        texts.append("" if rng.random() < cfg.caption_dropout else caption)
    return ShapesModel.encode_images(np.stack(images)), texts


def _save_state(path: Path, model, opt, step: int, rng: random.Random, cfg: PretrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "py_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pretrain_state.pt"
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    autocast = torch.bfloat16 if cfg.bf16 else None
    model = ShapesModel.load(cfg.init, autocast_dtype=autocast) if cfg.init else ShapesModel(autocast_dtype=autocast)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        rng.setstate(_as_rng_state(st["py_rng"]))
        torch.set_rng_state(st["torch_rng"])
        print(f"resuming pretraining from step {step}")
    train = split_prompts("train")
    by_tag = {t: [p for p in train if p.tag == t] for t in TAGS}
    near = neighbours(train)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shapes base model: {n_params / 1e6:.2f}M parameters; {cfg.steps} steps of batch {cfg.batch_size}")
    log = open(out / "pretrain_log.tsv", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-shapes", dynamic_ncols=True)
    ema_loss = None
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        x0, texts = _batch(rng, by_tag, near, cfg)
        sigma = torch.sigmoid(torch.randn(x0.shape[0]))
        eps = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * eps
        v = model.raw_velocity(x, sigma, model.encode_prompts(texts))
        loss = ((v - (eps - x0)) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{_lr_at(step, cfg):.2e}")
        if step % 50 == 0:
            log.write(f"{step}\t{ema_loss:.5f}\t{time.time() - t0:.1f}\n")
            log.flush()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_state(state_path, model, opt, step, rng, cfg)
    bar.close()
    export = Path(cfg.export) if cfg.export else out / "shapes_base.safetensors"
    export.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save(export)
    print(f"wrote {export}")
    return export


def _as_rng_state(s):
    """random.Random state round-tripped through torch.save comes back with lists where tuples were."""
    return (s[0], tuple(s[1]), s[2])
