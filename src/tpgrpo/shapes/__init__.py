"""The built-in shapes world: prompt grammar, exact renderer, detector and GenEval-style scorer (docs/design.md §6)."""

from .detect import Detection, Score, detect, score_image
from .grammar import COLORS, SHAPES, TAGS, PromptSpec, eval_set, parse_prompt, split_prompts, vocabulary
from .render import render, render_prompt, sample_scene

__all__ = ["COLORS", "SHAPES", "TAGS", "Detection", "PromptSpec", "Score", "detect", "eval_set", "parse_prompt",
           "render", "render_prompt", "sample_scene", "score_image", "split_prompts", "vocabulary"]
