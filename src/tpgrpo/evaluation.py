"""Evaluation: deterministic ODE sampling of a fixed, tag-balanced prompt set with fixed seeds; strict and partial
scores per tag and overall (mean over tags, as GenEval reports).

Items are processed in fixed chunks; with several processes each one samples and scores every P-th chunk (same seed
per item, same composition) and the images and scores are gathered, so the result is the single-process one."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import distributed as dist
from .models.base import FlowModel, PromptEmbeds, encode_each
from .prompts import PromptSource
from .rollout import initial_noise, make_generators, sample_ode


@torch.no_grad()
def evaluate(model: FlowModel, source: PromptSource, reward_fn, sigmas: torch.Tensor, *, guidance_scale: float,
             per_tag: int, seed: int = 0, max_batch: int = 256, embed: Callable | None = None,
             uncond: PromptEmbeds | None = None, chunk: int = 128, held_out=None) -> dict:
    """Sample, decode and score the evaluation items ``chunk`` at a time.

    ``held_out``: a second scorer that never trains (``reward.held_out``), e.g. the rule scorer beside a learned
    reward. Its primary score is reported as ``held_out`` (overall and per tag) and its ``shapes_strict``, where it
    has one, is the ``strict`` column; ``partial`` stays the trained reward's primary score.

    The chunk is the unit of work: chunk c (items [c·chunk, (c+1)·chunk)) is computed by process c mod P, in the
    same composition whatever P is, so the scores do not depend on the number of processes by construction."""
    if chunk < 1:
        raise ValueError(f"evaluate: chunk must be >= 1, got {chunk}")
    all_items = source.eval_items(per_tag, seed)
    starts = range(0, len(all_items), chunk)
    my_starts = [lo for c, lo in enumerate(starts) if c % dist.world_size() == dist.rank()]  # all with one process
    embed = embed or (lambda texts: encode_each(model, texts))
    uncond = uncond if uncond is not None else model.encode_prompts([""])
    mine: list[int] = []
    images, scores = [], []
    for lo in my_starts:
        part = all_items[lo:lo + chunk]
        texts = [it.text for it in part]
        noise = initial_noise(make_generators([it.seed for it in part]), model.latent_shape())
        lat = sample_ode(model, sigmas, embed(texts), uncond.expand(len(part)), noise, guidance_scale, max_batch)
        images.append(model.decode(lat))
        scores.append(_scores(reward_fn, held_out, images[-1], texts))
        mine += range(lo, lo + len(part))
    images = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    scores = {k: np.concatenate([np.asarray(s[k]) for s in scores]) for k in scores[0]} if scores else {}
    if dist.world_size() > 1:
        images, scores = _gather(mine, images, scores, len(all_items))
    items = all_items
    prompts = [it.text for it in items]
    primary = scores[reward_fn.primary]
    strict = scores.get("shapes_strict", primary)
    tags = np.array([it.tag for it in items])
    columns = {"strict": strict, "partial": primary}
    if held_out is not None:
        columns["held_out"] = scores[held_out.primary]
    per = {t: {name: float(v[tags == t].mean()) for name, v in columns.items()} for t in dict.fromkeys(tags)}
    out = {name: float(np.mean([v[name] for v in per.values()])) for name in columns}
    out.update({
        "per_tag": per,
        "n": len(items),
        "images": images, "prompts": prompts, "scores": primary, "strict_scores": np.asarray(strict, np.float64),
        "tags": tags.tolist(),
    })
    if held_out is not None:
        out["held_out_name"] = held_out.primary
        out["held_out_scores"] = np.asarray(columns["held_out"], np.float64)
    return out


#: evaluation result keys that hold per-image arrays (left out of logged records)
PER_IMAGE_KEYS = ("images", "prompts", "scores", "strict_scores", "held_out_scores")


def _scores(reward_fn, held_out, images: np.ndarray, texts: list[str]) -> dict:
    """The trained reward's scores of one chunk, and the held-out scorer's beside them (on a copy of the images, so
    neither scorer can change what the other sees)."""
    scores = dict(reward_fn(images.copy() if held_out is not None else images, texts))
    if held_out is not None:
        extra = held_out(images.copy(), texts)
        clash = sorted(set(scores) & set(extra))
        if clash:
            raise ValueError(f"reward.held_out: its scores {clash} have the same names as the trained reward's")
        scores.update(extra)
    return scores


def paired_gain(base: dict, tuned: dict) -> dict:
    """The tuned model's gain over the base on the *same* evaluation items (same prompts, same seeds): in the
    trained reward (``partial``), in strict accuracy and, where both have one, in the held-out reward.

    Per image d = score_tuned − score_base; per tag the mean of d; overall the mean over tags (as ``evaluate``
    averages), with its standard error ``sqrt(Σ_tag var_tag / n_tag) / n_tags`` (sample variances of d). Also counts
    the images whose strict outcome flipped each way: on the shapes model many flip in both directions, which is why
    unpaired single evaluations are noisy."""
    if base["prompts"] != tuned["prompts"] or base["tags"] != tuned["tags"]:
        raise ValueError("paired_gain: the two evaluations did not use the same items")
    tags = np.array(base["tags"])
    out: dict = {"n": len(tags), "per_tag": {}}
    keys = [("scores", "partial"), ("strict_scores", "strict")]
    if "held_out_scores" in base and "held_out_scores" in tuned:
        keys.append(("held_out_scores", "held_out"))
    for key, name in keys:
        d = np.asarray(tuned[key], np.float64) - np.asarray(base[key], np.float64)
        means, var_terms = [], []
        for t in dict.fromkeys(tags.tolist()):
            dt = d[tags == t]
            means.append(float(dt.mean()))
            var_terms.append(float(dt.var(ddof=1)) / len(dt) if len(dt) > 1 else float("nan"))
            out["per_tag"].setdefault(t, {})[name] = means[-1]
        out[name] = float(np.mean(means))
        out[f"{name}_se"] = float(np.sqrt(np.sum(var_terms)) / len(means))
    sb, st = np.asarray(base["strict_scores"]) > 0.5, np.asarray(tuned["strict_scores"]) > 0.5
    out["strict_gained"] = int((~sb & st).sum())
    out["strict_lost"] = int((sb & ~st).sum())
    return out


def _gather(mine: list[int], images: np.ndarray, scores: dict, n: int) -> tuple[np.ndarray, dict]:
    """Every process's images and scores of its items, put back in item order."""
    parts = [p for p in dist.all_gather_object((mine, images, {k: np.asarray(v) for k, v in scores.items()}))
             if p[0]]
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    assert len(order) == n
    images = np.concatenate([p[1] for p in parts])[order]
    scores = {k: np.concatenate([p[2][k] for p in parts])[order] for k in parts[0][2]}
    return images, scores


def save_image_grid(images, labels, path: Path, *, cols: int, box: int, cell_w: int = 0, text_h: int = 46,
                    title: str = "") -> Path:
    """A PNG grid: each image fitted into a ``box``-pixel square (nearest-neighbour when enlarged) in a cell at least
    ``cell_w`` wide, its (multi-line) label below it, and an optional title line on top."""
    cols = max(1, min(cols, len(images)))
    cell_w = max(box, cell_w)
    rows = (len(images) + cols - 1) // cols
    top = 22 if title else 0
    sheet = Image.new("RGB", (cols * cell_w, top + rows * (box + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 4), title, fill="black")
    for k, (img, label) in enumerate(zip(images, labels)):
        r, c = divmod(k, cols)
        x0, y0 = c * cell_w, top + r * (box + text_h)
        h, w = img.shape[:2]
        scale = box / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        thumb = Image.fromarray(img).resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)
        sheet.paste(thumb, (x0 + (cell_w - size[0]) // 2, y0 + (box - size[1]) // 2))
        draw.multiline_text((x0 + 4, y0 + box + 2), label, fill="black", spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_eval_grid(result: dict, path: Path, *, per_tag: int = 4, cols: int = 6, scale: int = 4,
                   title: str = "") -> Path:
    """A PNG grid: up to ``per_tag`` images of each tag, the prompt and its reward under each image."""
    tags = result["tags"]
    chosen: list[int] = []
    for t in dict.fromkeys(tags):
        chosen += [i for i, x in enumerate(tags) if x == t][:per_tag]
    imgs = result["images"]
    labels = [textwrap.fill(result["prompts"][i], 24) + f"\nreward {result['scores'][i]:.2f}" for i in chosen]
    return save_image_grid([imgs[i] for i in chosen], labels, path, cols=cols,
                           box=max(imgs.shape[1], imgs.shape[2]) * scale, cell_w=150, title=title)
