"""Pretraining of the built-in shapes base model (``tpgrpo pretrain-shapes``).

In the latent world (``space: latent``, the default) there are two stages, each resumable: first the autoencoder
(:mod:`tpgrpo.models.shapes_autoencoder`) on renders, then the flow model on its latents; the pixel world has the
second stage only, on pixels.

Rectified-flow matching in the model's data space on freshly rendered train-split scenes: x_σ = (1 − σ)·x0 + σ·ε, target
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
from ..models.shapes_autoencoder import ShapesAutoencoder, reconstruction_loss
from ..models.toy import LATENT_CONFIG, ShapesModel
from .grammar import BACKGROUND, TAGS, PromptSpec, split_prompts
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
    space: str = "latent"              # latent: autoencoder + latent flow model; pixel: flow model on pixels
    ae_steps: int = 3000               # autoencoder steps (latent space only)
    ae_batch_size: int = 64
    ae_lr: float = 2e-3
    width: int = 128                   # flow transformer width
    layers: int = 6                    # flow transformer depth

    def __post_init__(self):
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"--space must be 'latent' or 'pixel', got {self.space!r}")
        for name in ("ae_steps", "ae_batch_size", "width", "layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer in [1, 100000], got {v}")
        if self.width % 32:
            raise ValueError(f"--width must be a multiple of 32 (heads of 32), got {self.width}")
        if not (math.isfinite(self.ae_lr) and 0 < self.ae_lr <= 10):
            raise ValueError(f"--ae-lr must be a finite number in (0, 10], got {self.ae_lr}")
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


def _lr_at(step: int, cfg: PretrainConfig, lr: float | None = None, steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay to zero."""
    lr = cfg.lr if lr is None else lr
    steps = cfg.steps if steps is None else steps
    warmup = min(cfg.warmup, steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


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


def _render_batch(rng: random.Random, by_tag: dict[str, list[PromptSpec]], near: dict[str, list[PromptSpec]],
                  cfg: PretrainConfig, n: int) -> tuple[np.ndarray, list[str]]:
    images, texts = [], []
    for _ in range(n):
        scene, caption = draw_example(rng, by_tag, near, cfg.caption_noise)
        images.append(render_prompt(scene, rng.getrandbits(31)))
        texts.append("" if rng.random() < cfg.caption_dropout else caption)
    return np.stack(images), texts


def _save_state(path: Path, model, opt, step: int, rng: random.Random, cfg: PretrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "py_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, model, opt, rng: random.Random) -> int:
    if not path.exists():
        return 0
    st = torch.load(path, weights_only=True)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    rng.setstate(_as_rng_state(st["py_rng"]))
    torch.set_rng_state(st["torch_rng"])
    print(f"resuming {path.name} from step {st['step']}")
    return st["step"]


def reconstruction_accuracy(ae: ShapesAutoencoder, n: int = 300, seed: int = 12345) -> float:
    """Strict accuracy, under the shapes detector, of the autoencoder's reconstructions of ``n`` test-split renders
    (one prompt per render, cycling through the tags)."""
    from .detect import score_image

    test = split_prompts("test")
    by_tag = {t: [p for p in test if p.tag == t] for t in TAGS}
    rng = random.Random(seed)
    specs = [rng.choice(by_tag[TAGS[i % len(TAGS)]]) for i in range(n)]
    images = np.stack([render_prompt(s, rng.getrandbits(31)) for s in specs])
    ae.eval()
    with torch.no_grad():
        recon = ae.decode(ae.encode(ShapesModel.images_to_tensor(images)))
    out = ShapesModel.tensor_to_images(recon)
    return float(np.mean([score_image(img, s).strict for img, s in zip(out, specs)]))


def train_autoencoder(cfg: PretrainConfig, out: Path, by_tag, near) -> ShapesAutoencoder:
    """Stage 1: the latent autoencoder on renders (object-weighted MSE, noised latents), resumable."""
    ae = ShapesAutoencoder()
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)
    state_path = out / "autoencoder_state.pt"
    step = _load_state(state_path, ae, opt, rng)
    background = ShapesModel.images_to_tensor(np.array([[[BACKGROUND]]], dtype=np.uint8)).view(3)
    bar = tqdm(total=cfg.ae_steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    ema_loss = None
    ae.train()
    while step < cfg.ae_steps:
        images, _ = _render_batch(rng, by_tag, near, cfg, cfg.ae_batch_size)
        loss = reconstruction_loss(ae, ShapesModel.images_to_tensor(images), background)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, cfg.ae_lr, cfg.ae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.5f}")
        if step % cfg.ckpt_every == 0 or step == cfg.ae_steps:
            _save_state(state_path, ae, opt, step, rng, cfg)
    bar.close()
    ae.eval()
    return ae


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pretrain_state.pt"
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train = split_prompts("train")
    by_tag = {t: [p for p in train if p.tag == t] for t in TAGS}
    near = neighbours(train)
    autocast = torch.bfloat16 if cfg.bf16 else None
    if cfg.init:
        model = ShapesModel.load(cfg.init, autocast_dtype=autocast)
    else:
        arch = {"width": cfg.width, "num_layers": cfg.layers, "heads": cfg.width // 32}
        if cfg.space == "latent":
            ae = train_autoencoder(cfg, out, by_tag, near)
            acc_path = out / "autoencoder_accuracy.txt"
            if not acc_path.exists():
                acc_path.write_text(f"{reconstruction_accuracy(ae):.4f}\n")
            print(f"autoencoder: reconstruction strict accuracy {acc_path.read_text().strip()} on 300 test renders")
            model = ShapesModel({**LATENT_CONFIG, **arch, "autoencoder": ae.config}, autocast_dtype=autocast)
            model.autoencoder.load_state_dict(ae.state_dict())
        else:
            model = ShapesModel(arch, autocast_dtype=autocast)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = _load_state(state_path, model, opt, rng)
    n_params = sum(p.numel() for p in trained)
    print(f"shapes base model ({model.config['space']}): {n_params / 1e6:.2f}M trained parameters; "
          f"{cfg.steps} steps of batch {cfg.batch_size}")
    log = open(out / "pretrain_log.tsv", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-shapes", dynamic_ncols=True)
    ema_loss = None
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        images, texts = _render_batch(rng, by_tag, near, cfg, cfg.batch_size)
        x0 = model.encode_images(images)
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
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
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
