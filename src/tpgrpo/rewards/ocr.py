"""OCR reward (Flow-GRPO's text-rendering reward).

The target is the text between the first pair of double quotes in the prompt (``"..."`` or ``“...”``),
lower-cased with all whitespace removed; the recognised text is normalised the same way, and the reward is
``1 − min(edit_distance(recognised, target), len(target)) / len(target)``. As in Flow-GRPO's code, a recognised
text that *contains* the target scores 1 (``substring=True``; pass ``substring=False`` for the plain formula).

A prompt without quoted text (or with empty quotes) cannot be scored: rather than a silent 0, the scorer raises a
ValueError naming the prompt — and ``validate_prompts`` lets the trainer reject such a prompt file before training.
An OCR engine failure raises too (it is never turned into a score of 0).

Options: ``backend`` (``tesseract`` — the ``tesseract`` CLI, apt ``tesseract-ocr tesseract-ocr-eng`` — or
``paddle``, which needs the optional ``paddleocr`` package), ``lang`` (tesseract language, ``eng``), ``psm``
(tesseract page segmentation mode; 11 = sparse text, finds text anywhere in the image; 7 = one line),
``tesseract_cmd``, ``timeout`` (seconds per image), ``workers`` (parallel tesseract processes), ``substring``.
Scores: ``ocr`` (primary) and ``ocr_edit_distance`` (the raw, uncapped distance).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from .base import check_batch, one_line, register_reward

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def normalize_text(text: str) -> str:
    """Lower-case and remove all whitespace."""
    return "".join(text.split()).lower()


def ocr_target(prompt: str) -> str:
    """The normalised text between the first pair of quotes; ValueError naming the prompt when there is none."""
    m = _QUOTED.search(prompt)
    if m is None:
        raise ValueError(f"ocr reward: prompt has no quoted text to render: {prompt!r}")
    target = normalize_text(m.group(1) if m.group(1) is not None else m.group(2))
    if not target:
        raise ValueError(f"ocr reward: prompt has empty quoted text: {prompt!r}")
    return target


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str, substring: bool = True) -> tuple[float, int]:
    """(reward, raw edit distance) for normalised strings."""
    dist = edit_distance(recognized, target)
    capped = 0 if substring and target in recognized else min(dist, len(target))
    return 1.0 - capped / len(target), dist


class TesseractBackend:
    def __init__(self, cmd: str = "tesseract", lang: str = "eng", psm: int = 11, timeout: float = 60.0):
        path = shutil.which(cmd)
        if path is None:
            raise ValueError(f"ocr reward: tesseract binary {cmd!r} not found on PATH; install it "
                             f"(apt-get install tesseract-ocr tesseract-ocr-eng) or pass tesseract_cmd=")
        if not isinstance(psm, int) or not 0 <= psm <= 13:
            raise ValueError(f"ocr reward: psm must be a tesseract page segmentation mode 0-13, got {psm!r}")
        self.cmd, self.lang, self.psm, self.timeout = path, lang, psm, float(timeout)
        langs = self._run(["--list-langs"], b"").decode("utf-8", "replace").split()
        if lang not in langs:
            have = ", ".join(langs[1:]) or "none"
            raise ValueError(f"ocr reward: tesseract has no language {lang!r} (installed: {have}); "
                             f"install tesseract-ocr-{lang}")

    def _run(self, args: list[str], stdin: bytes) -> bytes:
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        try:
            res = subprocess.run([self.cmd, *args], input=stdin, capture_output=True, timeout=self.timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"ocr reward: tesseract took longer than {self.timeout:g} s") from None
        if res.returncode != 0:
            err = res.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RuntimeError(f"ocr reward: tesseract failed (exit {res.returncode}): {err[-1] if err else ''}")
        return res.stdout

    def __call__(self, image: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out = self._run(["stdin", "stdout", "-l", self.lang, "--psm", str(self.psm)], buf.getvalue())
        return out.decode("utf-8", "replace")


class PaddleBackend:
    def __init__(self, lang: str = "en"):
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ValueError("ocr reward: backend 'paddle' needs the optional paddleocr package "
                             "(pip install paddleocr paddlepaddle)") from None
        try:
            self.ocr = PaddleOCR(use_angle_cls=False, lang=lang, use_gpu=False, show_log=False)
            self.v3 = False
        except (TypeError, ValueError):  # paddleocr >= 3 dropped these arguments
            self.ocr = PaddleOCR(lang=lang, use_textline_orientation=False)
            self.v3 = True

    def __call__(self, image: np.ndarray) -> str:
        if self.v3:
            return "".join("".join(r.get("rec_texts", [])) for r in self.ocr.predict(image))
        result = self.ocr.ocr(image, cls=False)
        if not result or not result[0]:
            return ""
        return "".join(res[1][0] for res in result[0] if res[1][1] > 0)


@register_reward("ocr")
class OcrReward:
    primary = "ocr"

    def __init__(self, backend: str = "tesseract", lang: str | None = None, psm: int = 11,
                 tesseract_cmd: str = "tesseract", timeout: float = 60.0, workers: int = 1, substring: bool = True):
        if backend == "tesseract":
            self.engine = TesseractBackend(tesseract_cmd, lang or "eng", psm, timeout)
        elif backend == "paddle":
            self.engine = PaddleBackend(lang or "en")
        else:
            raise ValueError(f"ocr reward: backend must be 'tesseract' or 'paddle', got {backend!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"ocr reward: workers must be a positive integer, got {workers!r}")
        self.workers, self.substring = workers, bool(substring)

    @staticmethod
    def validate_prompts(prompts: Sequence[str]) -> None:
        """Raise ValueError for a prompt without quoted text (the OCR reward could not score it)."""
        for p in prompts:
            ocr_target(p)

    def recognize(self, images: np.ndarray) -> list[str]:
        if self.workers == 1 or len(images) == 1:
            return [self.engine(img) for img in images]
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(self.engine, images))

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        images = check_batch("ocr reward", images, prompts, metadata)
        targets = [ocr_target(p) for p in prompts]
        try:
            texts = self.recognize(images)
        except RuntimeError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine failure is an error, never a 0 score
            raise RuntimeError(f"ocr reward: OCR engine failed: {one_line(e)}") from None
        pairs = [ocr_score(normalize_text(t), target, self.substring) for t, target in zip(texts, targets)]
        return {"ocr": np.array([s for s, _ in pairs], dtype=np.float64),
                "ocr_edit_distance": np.array([d for _, d in pairs], dtype=np.float64)}
