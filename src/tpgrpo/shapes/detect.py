"""Detector and GenEval-style scorer of the shapes world (docs/design.md §6).

Detection: each pixel takes the nearest of the background and palette colours (RGB distance); per colour, 8-connected
components above a minimum area are objects. A component whose pixels lie on average farther than MAX_COLOR_DIST from
its palette colour is noise and ignored (random pixels are all nearest to *some* colour). A component's shape is the
template (circle / square / triangle) with the highest IoU against the component's hole-filled mask, each template
drawn into every box whose sides lie within ±FIT_SLACK pixels of the component's bounding box (a stray edge pixel
moves the bounding box, not the object), comparing only pixels on the canvas (an object cut by the border still
matches) — robust to ragged edges where a bounding-box fill ratio alone is not. Components that are too large, too
elongated or match no template well are "blob"s: they count for no clause (e.g. two objects merged into one).

Scoring (per prompt clause, exact counts — see grammar.py):
  count credit  = max(0, 1 − |n − n_found| / n)        over detected objects of the clause's shape
  colour credit = fraction of those objects with the clause's colour (0 when none found)
  position      = 1 if the relation holds between the largest object of each related clause, else 0
  partial       = mean over clauses of the mean of that clause's credits  (the training reward)
  strict        = every count exact, every colour credit 1, every relation holds  (the evaluation metric)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .grammar import BACKGROUND, COLORS, PALETTE, PromptSpec
from .render import OBJECT_SIZE, shape_mask

MIN_AREA = 15              # pixels; smaller components are noise
MAX_SIDE = int(OBJECT_SIZE * 1.5)
MAX_ASPECT = 1.6
MIN_IOU = 0.6              # a component must match a template at least this well to get a shape
FIT_SLACK = 1              # a template's box sides may lie this many pixels inside/outside the component's bbox
MAX_COLOR_DIST = 60.0      # mean RGB distance of a component's pixels to its palette colour; farther = noise, not an
                           # object (about half the smallest distance between two palette colours, 121)
POSITION_MARGIN = 2.0      # pixels between centres for a relation to hold
_SHAPES = ("circle", "square", "triangle")
_COLOR_TABLE = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)  # index 0 = background
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    shape: str          # circle | square | triangle | blob
    color: str
    area: int
    center: tuple[float, float]  # (x, y), pixel units
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive end
    iou: float


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """[H, W] int labels: 0 background, 1..6 the palette colours in COLORS order."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(img.shape)}")
    d = ((img[:, :, None, :] - _COLOR_TABLE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


@lru_cache(maxsize=None)
def _template_bank(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Every template whose box sides lie within ±FIT_SLACK of an h×w bounding box, drawn into the padded
    (h + 2s)×(w + 2s) frame: (shape index of each row [K], flattened masks [K, (h + 2s)(w + 2s)] float32)."""
    s = FIT_SLACK
    H, W = h + 2 * s, w + 2 * s
    index, masks = [], []
    for top in range(2 * s + 1):
        for bottom in range(H - 2 * s, H + 1):
            for left in range(2 * s + 1):
                for right in range(W - 2 * s, W + 1):
                    if bottom - top < 2 or right - left < 2:
                        continue
                    for si, shape in enumerate(_SHAPES):
                        t = np.zeros((H, W), dtype=np.float32)
                        t[top:bottom, left:right] = shape_mask(shape, right - left, bottom - top)
                        index.append(si)
                        masks.append(t.ravel())
    return np.array(index), np.stack(masks)


def _classify_shape(mask: np.ndarray, inside: np.ndarray | None = None) -> tuple[str, float]:
    """Shape and best IoU of a component's mask; ``inside`` marks which cells of the FIT_SLACK-padded frame lie
    on the canvas (None: all)."""
    h, w = mask.shape
    if h > MAX_SIDE or w > MAX_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        return "blob", 0.0
    index, bank = _template_bank(h, w)
    m = np.pad(mask, FIT_SLACK).ravel().astype(np.float32)
    inter = bank @ m
    t_area = bank.sum(1) if inside is None else bank @ inside.ravel().astype(np.float32)
    iou = inter / np.maximum(t_area + m.sum() - inter, 1.0)
    best, best_iou = "blob", 0.0
    for si, shape in enumerate(_SHAPES):
        v = float(iou[index == si].max())
        if v > best_iou:
            best, best_iou = shape, v
    return (best if best_iou >= MIN_IOU else "blob"), best_iou


def detect(image: np.ndarray) -> list[Detection]:
    """All objects in a uint8 RGB image, largest first."""
    labels = classify_pixels(image)
    pixels = np.asarray(image, dtype=np.float32)
    found: list[Detection] = []
    for ci, color in enumerate(COLORS, start=1):
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            raw = comp[sl] == k
            mask = ndimage.binary_fill_holes(raw)
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            if np.sqrt(((pixels[sl][raw] - _COLOR_TABLE[ci]) ** 2).sum(-1)).mean() > MAX_COLOR_DIST:
                continue  # pixels merely nearest to a palette colour (noise), not painted in it
            rows = np.arange(sl[0].start - FIT_SLACK, sl[0].stop + FIT_SLACK)
            cols = np.arange(sl[1].start - FIT_SLACK, sl[1].stop + FIT_SLACK)
            inside = (((rows >= 0) & (rows < labels.shape[0]))[:, None]
                      & ((cols >= 0) & (cols < labels.shape[1]))[None, :])
            shape, iou = _classify_shape(mask, inside)
            ys, xs = np.nonzero(mask)
            center = (float(xs.mean() + sl[1].start + 0.5), float(ys.mean() + sl[0].start + 0.5))
            bbox = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            found.append(Detection(shape, color, area, center, bbox, iou))
    found.sort(key=lambda d: -d.area)
    return found


def relation_holds(rel: str, a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel] >= margin


@dataclass(frozen=True)
class Score:
    strict: float   # 0.0 or 1.0
    partial: float  # in [0, 1]


def score_detections(objects: list[Detection], spec: PromptSpec) -> Score:
    """GenEval-style strict correctness and partial credit of detected ``objects`` against ``spec``."""
    per_clause = [[o for o in objects if o.shape == c.shape] for c in spec.clauses]
    credits: list[list[float]] = []
    strict = True
    for clause, found in zip(spec.clauses, per_clause):
        n, k = clause.count, len(found)
        items = [max(0.0, 1.0 - abs(n - k) / n)]
        strict &= k == n
        if clause.color is not None:
            color_credit = sum(o.color == clause.color for o in found) / k if k else 0.0
            items.append(color_credit)
            strict &= color_credit == 1.0
        credits.append(items)
    if spec.relation is not None:
        rel, i, j = spec.relation
        holds = bool(per_clause[i]) and bool(per_clause[j]) and relation_holds(rel, per_clause[i][0], per_clause[j][0])
        credits[i].append(float(holds))
        strict &= holds
    partial = float(np.mean([np.mean(c) for c in credits]))
    return Score(float(strict), partial)


def score_image(image: np.ndarray, spec: PromptSpec) -> Score:
    return score_detections(detect(image), spec)
