"""The shapes world's prompt grammar (docs/design.md §6).

Six GenEval tags over three shapes and six colours. A prompt parses to a :class:`PromptSpec`: a list of object
clauses (shape, exact count, optional colour) and an optional spatial relation between the first two clauses.

Choice (documented in docs/shapes.md): every clause asks for an *exact* count. The canvas holds nothing but the
requested objects, so an extra object of a named shape is a mistake; objects of shapes the prompt does not name
are ignored, as in GenEval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 210),
    "cyan": (40, 210, 215),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (15, 15, 15)
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Clause:
    """One requested object kind: exactly ``count`` objects of ``shape`` (all of ``color`` if given)."""

    shape: str
    count: int = 1
    color: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. ``relation`` = (relation, i, j): clause i's object stands ``relation`` clause j's."""

    text: str
    tag: str
    clauses: tuple[Clause, ...]
    relation: tuple[str, int, int] | None = None


def _article_phrase(shape: str, color: str | None = None) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def make_prompt(tag: str, **kw) -> PromptSpec:
    """Build the spec and text of one prompt of ``tag`` from its slots (shape/shape2/color/color2/count/relation)."""
    if tag == "single_object":
        c = Clause(kw["shape"])
        return PromptSpec(_article_phrase(c.shape), tag, (c,))
    if tag == "two_object":
        a, b = Clause(kw["shape"]), Clause(kw["shape2"])
        return PromptSpec(f"{_article_phrase(a.shape)} and {_article_phrase(b.shape)}", tag, (a, b))
    if tag == "counting":
        n = int(kw["count"])
        noun = kw["shape"] if n == 1 else PLURALS[kw["shape"]]
        return PromptSpec(f"{NUMBERS[n - 1]} {noun}", tag, (Clause(kw["shape"], n),))
    if tag == "colors":
        c = Clause(kw["shape"], 1, kw["color"])
        return PromptSpec(_article_phrase(c.shape, c.color), tag, (c,))
    if tag == "position":
        a, b = Clause(kw["shape"]), Clause(kw["shape2"])
        text = f"{_article_phrase(a.shape)} {kw['relation']} {_article_phrase(b.shape)}"
        return PromptSpec(text, tag, (a, b), (kw["relation"], 0, 1))
    if tag == "color_attr":
        a, b = Clause(kw["shape"], 1, kw["color"]), Clause(kw["shape2"], 1, kw["color2"])
        text = f"{_article_phrase(a.shape, a.color)} and {_article_phrase(b.shape, b.color)}"
        return PromptSpec(text, tag, (a, b))
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")


def all_prompts() -> list[PromptSpec]:
    """Every prompt of the grammar, in a fixed order."""
    out: list[PromptSpec] = []
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    out += [make_prompt("single_object", shape=s) for s in SHAPES]
    out += [make_prompt("two_object", shape=a, shape2=b) for a, b in pairs]
    out += [make_prompt("counting", shape=s, count=n) for s in SHAPES for n in range(1, 5)]
    out += [make_prompt("colors", shape=s, color=c) for c in COLORS for s in SHAPES]
    out += [make_prompt("position", shape=a, shape2=b, relation=r) for a, b in pairs for r in RELATIONS]
    out += [
        make_prompt("color_attr", shape=a, shape2=b, color=c1, color2=c2)
        for a, b in pairs
        for c1 in COLORS
        for c2 in COLORS
        if c1 != c2
    ]
    return out


# Held-out combinations (the test split). Single objects are too few to hold out: the test split reuses them
# with evaluation seeds the training never sees.
_HELD_OUT_TWO = {("triangle", "circle"), ("square", "triangle")}
_HELD_OUT_COUNT = {("triangle", 3), ("square", 2), ("circle", 4)}
_HELD_OUT_COLOR = {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
                   ("purple", "square"), ("cyan", "circle")}
_HELD_OUT_POSITION = {("circle", "square", "left of"), ("square", "circle", "above"),
                      ("triangle", "square", "right of"), ("square", "triangle", "below"),
                      ("circle", "triangle", "below"), ("triangle", "circle", "above")}
_COLOR_ATTR_HELDOUT_FRACTION = 0.2


def _is_test(p: PromptSpec) -> bool:
    c = p.clauses
    if p.tag == "single_object":
        return True
    if p.tag == "two_object":
        return (c[0].shape, c[1].shape) in _HELD_OUT_TWO
    if p.tag == "counting":
        return (c[0].shape, c[0].count) in _HELD_OUT_COUNT
    if p.tag == "colors":
        return (c[0].color, c[0].shape) in _HELD_OUT_COLOR
    if p.tag == "position":
        return (c[0].shape, c[1].shape, p.relation[0]) in _HELD_OUT_POSITION
    return p.text in _color_attr_test_texts()


_COLOR_ATTR_TEST: set[str] | None = None


def _color_attr_test_texts() -> set[str]:
    global _COLOR_ATTR_TEST
    if _COLOR_ATTR_TEST is None:
        texts = sorted(p.text for p in all_prompts() if p.tag == "color_attr")
        rng = random.Random(1234)
        _COLOR_ATTR_TEST = set(rng.sample(texts, round(_COLOR_ATTR_HELDOUT_FRACTION * len(texts))))
    return _COLOR_ATTR_TEST


def split_prompts(split: str) -> list[PromptSpec]:
    """The fixed ``train`` or ``test`` split (single-object prompts are in both)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prompts = all_prompts()
    if split == "test":
        return [p for p in prompts if _is_test(p)]
    return [p for p in prompts if p.tag == "single_object" or not _is_test(p)]


_BY_TEXT: dict[str, PromptSpec] | None = None


def parse_prompt(text: str) -> PromptSpec:
    """The spec of a grammar prompt; a clear ValueError for text outside the grammar."""
    global _BY_TEXT
    if _BY_TEXT is None:
        _BY_TEXT = {p.text: p for p in all_prompts()}
    key = " ".join(text.strip().lower().split())
    if key not in _BY_TEXT:
        raise ValueError(f"prompt {text!r} is not in the shapes grammar (e.g. 'a red circle and a blue square')")
    return _BY_TEXT[key]


def vocabulary() -> list[str]:
    """All words the grammar uses, sorted (the built-in text encoder's vocabulary)."""
    words = {w for p in all_prompts() for w in p.text.split()}
    return sorted(words)


@dataclass
class EvalItem:
    prompt: PromptSpec
    seed: int = field(default=0)


def eval_set(per_tag: int, split: str = "test", seed: int = 0) -> list[EvalItem]:
    """A balanced evaluation set: ``per_tag`` items per tag, cycling through the split's prompts of that tag,
    each with its own fixed seed. Overall accuracy is the mean over tags, as GenEval reports it."""
    prompts = split_prompts(split)
    items: list[EvalItem] = []
    for ti, tag in enumerate(TAGS):
        of_tag = [p for p in prompts if p.tag == tag]
        if split == "test" and tag == "color_attr":
            of_tag = random.Random(seed).sample(of_tag, len(of_tag))
        for k in range(per_tag):
            items.append(EvalItem(of_tag[k % len(of_tag)], seed=1_000_000 + seed * 10_000 + ti * 1_000 + k))
    return items
