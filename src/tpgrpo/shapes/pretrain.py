"""Pretraining of the built-in shapes base model (``tpgrpo pretrain-shapes``).

Rectified-flow matching in pixel space on freshly rendered train-split scenes: x_σ = (1 − σ)·x0 + σ·ε, target
v = ε − x0, σ ~ logit-normal(0, 1) (as SD3 trains), tag-balanced prompt sampling, caption dropout so that
classifier-free guidance works. Resumable: a state file in the work directory is written atomically every
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
from tqdm import tqdm

from ..models.toy import ShapesModel
from .grammar import TAGS, split_prompts
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


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _batch(rng: random.Random, by_tag: dict[str, list], cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    images, texts = [], []
    for _ in range(cfg.batch_size):
        spec = rng.choice(by_tag[rng.choice(TAGS)])
        images.append(render_prompt(spec, rng.getrandbits(31)))
        texts.append("" if rng.random() < cfg.caption_dropout else spec.text)
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
    model = ShapesModel(autocast_dtype=torch.bfloat16 if cfg.bf16 else None)
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
    by_tag = {t: [p for p in split_prompts("train") if p.tag == t] for t in TAGS}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shapes base model: {n_params / 1e6:.2f}M parameters; {cfg.steps} steps of batch {cfg.batch_size}")
    log = open(out / "pretrain_log.tsv", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-shapes", dynamic_ncols=True)
    ema_loss = None
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        x0, texts = _batch(rng, by_tag, cfg)
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
