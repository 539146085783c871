"""Exact renderer of the shapes world: a scene (objects with shape, colour, box) → a 32×32 RGB image (docs/design.md §6)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .grammar import BACKGROUND, COLORS, PALETTE, PromptSpec

CANVAS = 32
OBJECT_SIZE = 10
MIN_GAP = 2          # pixels between bounding boxes of two objects
RELATION_MARGIN = 6  # rendered relations hold by at least this many pixels between centres


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x: int  # left column of the bounding box
    y: int  # top row of the bounding box
    size: int = OBJECT_SIZE

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)


@lru_cache(maxsize=None)
def shape_mask(shape: str, width: int, height: int | None = None) -> np.ndarray:
    """Boolean mask of ``shape`` filling a width×height box, sampled at pixel centres.

    circle: ellipse inscribed in the box; square: the full box; triangle: apex at the top centre, base along the
    bottom edge."""
    h = width if height is None else height
    w = width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (xx + 0.5) / w  # 0..1 across
    v = (yy + 0.5) / h  # 0..1 down
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return np.abs(u - 0.5) <= v / 2
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[SceneObject], canvas: int = CANVAS) -> np.ndarray:
    """uint8 image [canvas, canvas, 3]."""
    img = np.empty((canvas, canvas, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        m = shape_mask(o.shape, o.size)
        region = img[o.y:o.y + o.size, o.x:o.x + o.size]
        region[m[: region.shape[0], : region.shape[1]]] = PALETTE[o.color]
    return img


def _relation_holds(rel: str, a: SceneObject, b: SceneObject, margin: float) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    if rel == "left of":
        return bx - ax >= margin
    if rel == "right of":
        return ax - bx >= margin
    if rel == "above":
        return by - ay >= margin
    if rel == "below":
        return ay - by >= margin
    raise ValueError(f"unknown relation {rel!r}")


def _apart(a: SceneObject, b: SceneObject) -> bool:
    return (a.x + a.size + MIN_GAP <= b.x or b.x + b.size + MIN_GAP <= a.x
            or a.y + a.size + MIN_GAP <= b.y or b.y + b.size + MIN_GAP <= a.y)


def sample_scene(spec: PromptSpec, rng: random.Random, canvas: int = CANVAS) -> list[SceneObject]:
    """A random scene that satisfies ``spec`` exactly: non-overlapping objects, unnamed colours drawn at random."""
    kinds: list[tuple[str, str, int]] = []  # (shape, colour, clause index)
    for ci, clause in enumerate(spec.clauses):
        for _ in range(clause.count):
            kinds.append((clause.shape, clause.color or rng.choice(COLORS), ci))
    hi = canvas - OBJECT_SIZE
    for _ in range(10_000):
        objs: list[SceneObject] = []
        ok = True
        for shape, color, _ci in kinds:
            for _ in range(200):
                cand = SceneObject(shape, color, rng.randint(0, hi), rng.randint(0, hi))
                if all(_apart(cand, o) for o in objs):
                    objs.append(cand)
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        if spec.relation is not None:
            rel, i, j = spec.relation
            a = next(o for o, k in zip(objs, kinds) if k[2] == i)
            b = next(o for o, k in zip(objs, kinds) if k[2] == j)
            if not _relation_holds(rel, a, b, RELATION_MARGIN):
                continue
        return objs
    raise RuntimeError(f"could not place a scene for {spec.text!r}")  # pragma: no cover


def render_prompt(spec: PromptSpec, seed: int) -> np.ndarray:
    """Ground-truth image for ``spec`` with scene randomness from ``seed``."""
    return render(sample_scene(spec, random.Random(seed)))
