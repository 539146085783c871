"""Prompt sources: the shapes grammar's splits, or a UTF-8 text file with one prompt a line."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .shapes.grammar import TAGS, eval_set, split_prompts

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    tag: str
    seed: int


class PromptSource:
    """Prompts with a tag each; training draws a tag uniformly, then a prompt of that tag."""

    def __init__(self, prompts: list[tuple[str, str]], name: str, shapes_split: str | None = None):
        self.prompts = prompts
        self.name = name
        self.shapes_split = shapes_split
        self.by_tag: dict[str, list[str]] = {}
        for text, tag in prompts:
            self.by_tag.setdefault(tag, []).append(text)
        self.tags = sorted(self.by_tag, key=lambda t: TAGS.index(t) if t in TAGS else len(TAGS))

    def sample(self, rng: random.Random, k: int, tag_weights: dict[str, float] | None = None) -> list[str]:
        """k prompts: a tag (uniformly, or in proportion to ``tag_weights``), then a prompt of that tag."""
        if not tag_weights:
            return [rng.choice(self.by_tag[rng.choice(self.tags)]) for _ in range(k)]
        weights = [tag_weights.get(t, 0.0) for t in self.tags]
        return [rng.choice(self.by_tag[rng.choices(self.tags, weights)[0]]) for _ in range(k)]

    def check_tag_weights(self, tag_weights: dict[str, float] | None, field: str) -> None:
        """Every weighted tag must exist, and some tag of this source must have a positive weight."""
        if not tag_weights:
            return
        unknown = sorted(set(tag_weights) - set(self.tags))
        if unknown:
            raise ValueError(f"{field}: unknown tag(s) {', '.join(unknown)}; the prompts have {', '.join(self.tags)}")
        if not any(tag_weights.get(t, 0.0) > 0 for t in self.tags):
            raise ValueError(f"{field}: every tag has weight 0")

    def eval_items(self, per_tag: int, seed: int = 0) -> list[EvalPrompt]:
        if self.shapes_split is not None:
            return [EvalPrompt(it.prompt.text, it.prompt.tag, it.seed) for it in eval_set(per_tag, self.shapes_split, seed)]
        items = []
        for tag in self.tags:
            texts = self.by_tag[tag]
            items += [EvalPrompt(texts[k % len(texts)], tag, 1_000_000 + seed * 10_000 + k) for k in range(per_tag)]
        return items


def load_prompt_source(spec: str, field: str) -> PromptSource:
    """``shapes:train`` / ``shapes:test``, or a path to a text file (blank lines and ``#`` comments skipped)."""
    if spec.startswith("shapes:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"{field}: unknown shapes split {split!r} (use shapes:train or shapes:test)")
        return PromptSource([(p.text, p.tag) for p in split_prompts(split)], spec, shapes_split=split)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{field}: prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {path} is not valid UTF-8 (byte {e.start})") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"{field}: {path}:{lineno}: prompt longer than {MAX_PROMPT_CHARS} characters")
        prompts.append((line, "prompts"))
    if not prompts:
        raise ValueError(f"{field}: {path} contains no prompts")
    return PromptSource(prompts, str(path))
