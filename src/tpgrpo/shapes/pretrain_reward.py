"""Training and measuring the built-in world's learned reward (``tpgrpo pretrain-reward``; docs/design.md, "The
learned reward").

Data, all from the train split of the grammar (the test split's prompts are never seen):

* **renders with hard negatives** — each step draws B distinct train prompts and, for each, a *neighbour* (the same
  tag with one slot changed: a shape, count, colour, colour binding or relation) and renders both. The 2B
  (image, caption) pairs train a symmetric CLIP loss in which every image's hardest competitor is its neighbour's
  caption and every caption's is its neighbour's render;
* **the base model's own samples ranked by the rule scorer** — a pool of samples of the latent base model (ODE with
  2, 3, 5 or 10 steps, and CPS rollouts with η = 0.7 over every step: the blurry completions and noisy rollouts RL
  will score), each scored by the rule scorer (key = partial credit + strict correctness). Pairs of one prompt's
  samples with different keys train a Bradley–Terry loss ``softplus(−τ·(s_better − s_worse))``, as PickScore is
  trained on human preference pairs.

:func:`measure_agreement` then reports how far the learned score agrees with the rules on *fresh* base-model samples
(train prompts with new seeds, and the held-out test prompts): pairwise ranking accuracy, rank correlation with
partial credit and with strict correctness per tag, how the score responds to small latent perturbations (the
smoothness TP-GRPO's incremental rewards need), and scoring throughput. Resumable: a state file in the work directory
is written atomically every ``ckpt_every`` steps.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..models.toy import ShapesModel
from ..rollout import RolloutPlan, initial_noise, make_generators, sample_rollout
from ..sampling import sigma_schedule
from .detect import score_image
from .grammar import TAGS, PromptSpec, split_prompts
from .preference import ShapesPreferenceModel
from .pretrain import _as_rng_state, _lr_at, neighbours
from .render import render_prompt

#: how the pool's base-model samples are drawn: (ODE steps, kernel); CPS rollouts are stochastic on every step
SAMPLERS: tuple[tuple[int, str], ...] = ((2, "ode"), (3, "ode"), (5, "ode"), (10, "ode"), (10, "cps"))


@dataclass
class RewardPretrainConfig:
    out: str = "pretrain_reward"          # work directory (pool, state file, log, agreement.json)
    export: str | None = None              # final safetensors (default: <out>/shapes_pref.safetensors)
    base: str = "latent"                   # the base model whose samples are ranked
    steps: int = 1500
    batch_size: int = 96                   # distinct train prompts per step (×2 with their neighbours)
    pairs: int = 128                       # preference pairs per step
    pref_weight: float = 1.0
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    pool_per_prompt: int = 24              # base-model samples per train prompt in the preference pool
    init: str | None = None                # safetensors weights to start from (a preference fine-tuning stage)
    agreement_groups: int = 8              # measurement: prompt groups per tag and split
    agreement_per_group: int = 16          # measurement: base-model samples per group
    seed: int = 0
    ckpt_every: int = 100
    threads: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "pairs", "pool_per_prompt", "ckpt_every", "agreement_groups",
                     "agreement_per_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.pref_weight < 0:
            raise ValueError(f"pref-weight must be >= 0, got {self.pref_weight}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# --- the base model's samples, ranked by the rules ---------------------------------------------------------------
@torch.no_grad()
def base_samples(model: ShapesModel, specs: list[PromptSpec], seeds: list[int], samplers: list[tuple[int, str]],
                 chunk: int = 256) -> dict[str, np.ndarray]:
    """One sample per (spec, seed, sampler) of the CFG-free base model, decoded and scored by the rules.

    Returns ``images`` uint8 [N, 32, 32, 3], ``latents`` [N, 4, 8, 8], ``partial`` and ``strict`` [N]."""
    shape = model.latent_shape()
    images, latents, partial, strict = [], [], [], []
    for lo in range(0, len(specs), chunk):
        part = list(range(lo, min(lo + chunk, len(specs))))
        by_sampler: dict[tuple[int, str], list[int]] = {}
        for i in part:
            by_sampler.setdefault(samplers[i], []).append(i)
        out = {}
        for (steps, kernel), idx in by_sampler.items():
            gens = make_generators([seeds[i] for i in idx])
            noise = initial_noise(gens, shape)
            sig = sigma_schedule(steps, 1.0)
            plan = RolloutPlan(sigmas=sig, kernel="cps", noise_level=0.7, logprob="mse",
                               window=list(range(steps - 1)) if kernel == "cps" else ())
            cond = model.encode_prompts([specs[i].text for i in idx])
            lat = sample_rollout(model, plan, cond, None, noise, gens).final_latents
            for j, i in enumerate(idx):
                out[i] = lat[j]
        lat = torch.stack([out[i] for i in part])
        imgs = model.decode(lat)
        scores = [score_image(img, specs[i]) for img, i in zip(imgs, part)]
        images.append(imgs)
        latents.append(lat.numpy())
        partial += [s.partial for s in scores]
        strict += [s.strict for s in scores]
    return {"images": np.concatenate(images), "latents": np.concatenate(latents),
            "partial": np.asarray(partial, np.float64), "strict": np.asarray(strict, np.float64)}


def _pool_items(specs: list[PromptSpec], per_prompt: int, seed: int) -> tuple[list[PromptSpec], list[int],
                                                                               list[tuple[int, str]], np.ndarray]:
    """``per_prompt`` items per spec, samplers cycling through :data:`SAMPLERS`; group id = the spec's index."""
    rng = random.Random(seed)
    items, seeds, samplers, groups = [], [], [], []
    for g, spec in enumerate(specs):
        for k in range(per_prompt):
            items.append(spec)
            seeds.append(rng.getrandbits(62))
            samplers.append(SAMPLERS[k % len(SAMPLERS)])
            groups.append(g)
    return items, seeds, samplers, np.asarray(groups)


def preference_pool(model: ShapesModel, specs: list[PromptSpec], per_prompt: int, seed: int) -> dict:
    items, seeds, samplers, groups = _pool_items(specs, per_prompt, seed)
    pool = base_samples(model, items, seeds, samplers)
    pool["group"] = groups
    pool["texts"] = np.array([s.text for s in items])
    pool["tags"] = np.array([s.tag for s in items])
    return pool


def ranked_pairs(groups: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Every (better, worse) index pair of samples in the same group whose keys differ, [P, 2]."""
    pairs = []
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        k = key[idx]
        better = k[:, None] > k[None, :]
        a, b = np.nonzero(better)
        pairs.append(np.stack([idx[a], idx[b]], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


# --- losses -----------------------------------------------------------------------------------------------------
def clip_loss(img: torch.Tensor, txt: torch.Tensor, texts: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss over matched (image, caption) rows; rows with the same caption are all positives
    (their targets share the probability mass)."""
    logits = scale * img @ txt.T
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def bradley_terry_loss(s_better: torch.Tensor, s_worse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``mean softplus(−τ·(s_better − s_worse))`` = −log σ(τ·Δ), the preference likelihood."""
    return F.softplus(-scale * (s_better - s_worse)).mean()


# --- training ---------------------------------------------------------------------------------------------------
def _contrastive_batch(rng: random.Random, train: list[PromptSpec], near: dict, n: int) -> tuple[np.ndarray, list[str]]:
    chosen = rng.sample(train, min(n, len(train)))
    specs = chosen + [rng.choice(near[s.text]) if near[s.text] else rng.choice(train) for s in chosen]
    return np.stack([render_prompt(s, rng.getrandbits(31)) for s in specs]), [s.text for s in specs]


def pretrain_reward(cfg: RewardPretrainConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train = split_prompts("train")
    near = neighbours(train)

    pool_path = out / "pool.npz"
    base = None
    if not pool_path.exists():
        base = ShapesModel.load(cfg.base).eval()
        t0 = time.time()
        pool = preference_pool(base, train, cfg.pool_per_prompt, cfg.seed + 17)
        np.savez_compressed(pool_path.with_suffix(".tmp.npz"), **pool)
        pool_path.with_suffix(".tmp.npz").replace(pool_path)
        print(f"preference pool: {len(pool['texts'])} base-model samples of {len(train)} train prompts "
              f"({time.time() - t0:.0f} s)")
    pool = dict(np.load(pool_path))
    pairs = ranked_pairs(pool["group"], pool["partial"] + pool["strict"])
    pool_x = ShapesPreferenceModel.images_to_tensor(pool["images"])
    texts = pool["texts"].tolist()
    print(f"preference pool: {len(texts)} samples, {len(pairs)} ranked pairs")
    if not len(pairs) and cfg.pref_weight > 0:
        raise ValueError(f"{pool_path}: no two samples of one prompt differ under the rule scorer, so there are no "
                         f"preference pairs; use a base model whose samples vary (--base) or --pref-weight 0")

    model = ShapesPreferenceModel.load(cfg.init).train().requires_grad_(True) if cfg.init else ShapesPreferenceModel()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    state_path = out / "reward_state.pt"
    step = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.setstate(_as_rng_state(st["py_rng"]))
        torch.set_rng_state(st["torch_rng"])
        step = st["step"]
        print(f"resuming {state_path.name} from step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shapes preference model: {n_params / 1e6:.2f}M parameters; {cfg.steps} steps")
    log = open(out / "reward_log.tsv", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-reward", dynamic_ncols=True)
    ema = None
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        images, caps = _contrastive_batch(rng, train, near, cfg.batch_size)
        pick = pairs[[rng.randrange(len(pairs)) for _ in range(cfg.pairs if len(pairs) else 0)]].reshape(-1, 2)
        scale = model.logit_scale.exp().clamp(max=100.0)
        flat = pick.reshape(-1)
        img = model.embed_images(torch.cat([ShapesPreferenceModel.images_to_tensor(images), pool_x[flat]]))
        txt = model.embed_texts_unique(caps + [texts[i] for i in flat])  # one text-tower call for both losses
        n = len(caps)
        l_clip = clip_loss(img[:n], txt[:n], caps, scale)
        s = (img[n:] * txt[n:]).sum(-1).view(-1, 2)
        l_pref = bradley_terry_loss(s[:, 0], s[:, 1], scale) if len(s) else img.new_zeros(())
        loss = l_clip + cfg.pref_weight * l_pref
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        cur = (l_clip.item(), l_pref.item())
        ema = cur if ema is None else tuple(0.98 * e + 0.02 * c for e, c in zip(ema, cur))
        bar.update(1)
        bar.set_postfix(clip=f"{ema[0]:.3f}", pref=f"{ema[1]:.3f}")
        if step % 50 == 0:
            log.write(f"{step}\t{ema[0]:.5f}\t{ema[1]:.5f}\t{time.time() - t0:.1f}\n")
            log.flush()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "py_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
            tmp.replace(state_path)
    bar.close()
    model.eval()
    export = Path(cfg.export) if cfg.export else out / "shapes_pref.safetensors"
    export.parent.mkdir(parents=True, exist_ok=True)
    model.save(export, metadata={"trained": json.dumps({k: v for k, v in asdict(cfg).items()
                                                        if k not in ("out", "export", "threads")})})
    print(f"wrote {export}")
    agreement = measure_agreement(ShapesPreferenceModel.load(export), base or ShapesModel.load(cfg.base).eval(),
                                  seed=cfg.seed + 1000, groups_per_tag=cfg.agreement_groups,
                                  per_group=cfg.agreement_per_group)
    (out / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
    print(json.dumps({k: agreement[k] for k in ("pairwise_accuracy", "spearman_partial")}, indent=2))
    return export


# --- measurement ------------------------------------------------------------------------------------------------
@torch.no_grad()
def pref_scores(pref: ShapesPreferenceModel, images: np.ndarray, texts: list[str], chunk: int = 1024) -> np.ndarray:
    return np.concatenate([pref.score(ShapesPreferenceModel.images_to_tensor(images[lo:lo + chunk]),
                                      texts[lo:lo + chunk]).double().numpy() for lo in range(0, len(texts), chunk)])


def pairwise_accuracy(groups: np.ndarray, key: np.ndarray, score: np.ndarray) -> tuple[float, int]:
    """Fraction of same-group pairs with different ``key`` that ``score`` orders the same way (ties count ½)."""
    p = ranked_pairs(groups, key)
    if not len(p):
        return float("nan"), 0
    d = score[p[:, 0]] - score[p[:, 1]]
    return float(np.mean((d > 0) + 0.5 * (d == 0))), int(len(p))


def measure_agreement(pref: ShapesPreferenceModel, base: ShapesModel, *, seed: int = 1000, groups_per_tag: int = 8,
                      per_group: int = 16, deltas: tuple[float, ...] = (0.05, 0.1, 0.2)) -> dict:
    """Agreement of the learned score with the rule scorer on fresh base-model samples (train prompts with new
    seeds, and the held-out test prompts), its response to latent perturbations, and its throughput."""
    from scipy.stats import spearmanr

    report: dict = {"seed": seed, "groups_per_tag": groups_per_tag, "per_group": per_group}
    for split in ("train", "test"):
        specs_all = split_prompts(split)
        rng = random.Random(seed + (0 if split == "train" else 1))
        specs = []
        for tag in TAGS:
            of_tag = [p for p in specs_all if p.tag == tag]
            specs += [rng.choice(of_tag) for _ in range(groups_per_tag)]
        pool = preference_pool(base, specs, per_group, seed + (7 if split == "train" else 8))
        s = pref_scores(pref, pool["images"], pool["texts"].tolist())
        key = pool["partial"] + pool["strict"]
        per_tag = {}
        for tag in TAGS:
            m = pool["tags"] == tag
            acc, n = pairwise_accuracy(pool["group"][m], key[m], s[m])
            per_tag[tag] = {"pairwise_accuracy": acc, "pairs": n,
                            "spearman_partial": float(spearmanr(s[m], pool["partial"][m]).statistic),
                            "spearman_strict": float(spearmanr(s[m], pool["strict"][m]).statistic),
                            "rule_partial_mean": float(pool["partial"][m].mean()),
                            "rule_strict_mean": float(pool["strict"][m].mean())}
        acc, n = pairwise_accuracy(pool["group"], key, s)
        report[split] = {"pairwise_accuracy": acc, "pairs": n, "samples": int(len(s)), "per_tag": per_tag,
                         "spearman_partial": float(np.mean([v["spearman_partial"] for v in per_tag.values()])),
                         "spearman_strict": float(np.mean([v["spearman_strict"] for v in per_tag.values()]))}
        if split == "train":
            report["smoothness"] = perturbation_response(pref, base, pool, deltas, seed)
    report["pairwise_accuracy"] = {k: report[k]["pairwise_accuracy"] for k in ("train", "test")}
    report["spearman_partial"] = {k: report[k]["spearman_partial"] for k in ("train", "test")}
    report["throughput"] = scoring_throughput(pref, base, n=16 * groups_per_tag * per_group)
    return report


@torch.no_grad()
def perturbation_response(pref: ShapesPreferenceModel, base: ShapesModel, pool: dict, deltas, seed: int) -> dict:
    """Decode ``latent + δ·ε`` for each pool sample and each δ: the fraction of samples whose score is exactly
    unchanged and the mean |change| divided by the score's spread over the pool (rule partial credit beside the
    learned score). A reward with few levels leaves most small moves at exactly 0 — TP-GRPO's incremental rewards
    see the same thing."""
    from .grammar import parse_prompt

    texts = pool["texts"].tolist()
    lat = torch.from_numpy(pool["latents"])
    s0 = pref_scores(pref, pool["images"], texts)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for d in deltas:
        imgs = base.decode(lat + d * torch.randn(lat.shape, generator=g))
        s1 = pref_scores(pref, imgs, texts)
        p1 = np.array([score_image(im, parse_prompt(t)).partial for im, t in zip(imgs, texts)])
        out[str(d)] = {
            "learned_unchanged": float(np.mean(s1 == s0)),
            "rule_unchanged": float(np.mean(p1 == pool["partial"])),
            "learned_mean_abs_change_rel": float(np.mean(np.abs(s1 - s0)) / s0.std()),
            "rule_mean_abs_change_rel": float(np.mean(np.abs(p1 - pool["partial"])) / pool["partial"].std()),
        }
    return out


def scoring_throughput(pref: ShapesPreferenceModel, base: ShapesModel, n: int = 2048, repeats: int = 3) -> dict:
    """Images per second of the learned score and of the rule scorer on ``n`` decoded base-model samples."""
    from .grammar import parse_prompt

    train = split_prompts("train")
    rng = random.Random(0)
    specs = [rng.choice(train) for _ in range(n)]
    imgs = base.decode(torch.randn((n, *base.latent_shape()), generator=torch.Generator().manual_seed(0)))
    texts = [s.text for s in specs]

    def best(fn):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return n / min(ts)

    return {"images": n, "threads": torch.get_num_threads(),
            "learned_images_per_s": best(lambda: pref_scores(pref, imgs, texts)),
            "rule_images_per_s": best(lambda: [score_image(im, parse_prompt(t)) for im, t in zip(imgs, texts)])}
