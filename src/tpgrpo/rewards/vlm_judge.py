"""VLM judge reward: asks a vision-language model behind an OpenAI-compatible chat-completions endpoint (vLLM,
SGLang, llama.cpp server, OpenAI, ...) to rate each image, and parses a number from its reply.

Each image is sent as a base64 PNG ``image_url`` data URL together with ``prompt_template`` formatted with the
image's prompt (``{prompt}``) and ``max_score``. The reply's score is read, in this order, from ``score: X``,
``X/max``, or the reply's only number; a reply with no score, an ambiguous one, or one outside [0, max_score]
raises a clear RuntimeError (never a silent 0). Requests are retried on connection errors, timeouts, 5xx and 429
with exponential backoff.

Options: ``url`` (base, e.g. ``http://127.0.0.1:8000/v1``, or the full ``.../chat/completions``), ``model``
(required), ``prompt_template``, ``max_score`` (10), ``api_key`` (default: the environment variable named by
``api_key_env``, ``OPENAI_API_KEY``; none for local servers), ``timeout``, ``retries``, ``backoff``,
``temperature`` (0), ``max_tokens`` (64), ``workers`` (concurrent requests, 4).
Scores: ``vlm_judge`` (= score / max_score, primary, 0–1) and ``vlm_judge_raw``.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from .base import check_batch, register_reward
from .http import encode_image, request_json

DEFAULT_TEMPLATE = (
    "You are judging an image generated from the prompt: \"{prompt}\". Rate how well the image matches the prompt "
    "and its visual quality on a scale from 0 to {max_score}. Reply with only the number, as 'Score: <number>'.")

_NUM = r"[-+]?\d+(?:\.\d+)?"
_SCORE_LABEL = re.compile(rf"(?i)\b(?:score|rating)\s*(?:is|of|=|:)?\s*\**\s*({_NUM})")
_FRACTION = re.compile(rf"({_NUM})\s*(?:/|out of)\s*({_NUM})")


def parse_score(reply: str, max_score: float) -> float:
    """The numeric score in a judge's reply; ValueError when there is none, it is ambiguous or out of range."""
    m = _SCORE_LABEL.search(reply)
    if m:
        value = float(m.group(1))
    else:
        m = _FRACTION.search(reply)
        if m:
            value = float(m.group(1))
        else:
            nums = re.findall(_NUM, reply)
            if len(nums) != 1:
                what = "no number" if not nums else f"{len(nums)} numbers and no 'score:' label"
                raise ValueError(f"cannot parse a score from the judge's reply ({what}): {reply[:200]!r}")
            value = float(nums[0])
    if not 0.0 <= value <= max_score:
        raise ValueError(f"judge's score {value:g} is outside [0, {max_score:g}]: {reply[:200]!r}")
    return value


@register_reward("vlm_judge")
class VlmJudgeReward:
    primary = "vlm_judge"

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str | None = None,
                 prompt_template: str = DEFAULT_TEMPLATE, max_score: float = 10.0, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 temperature: float = 0.0, max_tokens: int = 64, workers: int = 4):
        parsed = urlparse(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"vlm_judge: url must look like http://host:port/v1, got {url!r}")
        if not model:
            raise ValueError("vlm_judge: model= is required (the model name the endpoint serves)")
        if "{prompt}" not in prompt_template:
            raise ValueError("vlm_judge: prompt_template must contain {prompt}")
        try:
            prompt_template.format(prompt="x", max_score=max_score)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"vlm_judge: prompt_template is not a valid format string "
                             f"(only {{prompt}} and {{max_score}} are filled): {e!r}") from None
        if float(max_score) <= 0:
            raise ValueError(f"vlm_judge: max_score must be positive, got {max_score!r}")
        if not isinstance(retries, int) or retries < 0 or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"vlm_judge: retries must be >= 0 and workers >= 1, got {retries!r}, {workers!r}")
        url = str(url).rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.template, self.max_score = model, prompt_template, float(max_score)
        key = api_key if api_key is not None else os.environ.get(api_key_env or "", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.temperature, self.max_tokens, self.workers = float(temperature), int(max_tokens), workers

    def request(self, image: np.ndarray, prompt: str) -> dict:
        text = self.template.format(prompt=prompt, max_score=f"{self.max_score:g}")
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_image(image)}},
                    {"type": "text", "text": text}]}]}

    def judge(self, image: np.ndarray, prompt: str) -> float:
        reply = request_json(self.url, self.request(image, prompt), what="vlm_judge endpoint", timeout=self.timeout,
                             retries=self.retries, backoff=self.backoff, headers=self.headers)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"vlm_judge endpoint at {self.url} sent no choices[0].message.content: "
                               f"{str(reply)[:200]}") from None
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RuntimeError(f"vlm_judge endpoint at {self.url} sent non-text content: {str(content)[:200]}")
        try:
            return parse_score(content, self.max_score)
        except ValueError as e:
            raise RuntimeError(f"vlm_judge: {e}") from None

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        images = check_batch("vlm_judge", images, prompts, metadata)
        if self.workers == 1 or len(images) <= 1:
            raw = [self.judge(img, p) for img, p in zip(images, prompts)]
        else:
            with ThreadPoolExecutor(min(self.workers, len(images))) as ex:
                raw = list(ex.map(self.judge, images, prompts))
        raw = np.array(raw, dtype=np.float64)
        return {"vlm_judge": raw / self.max_score, "vlm_judge_raw": raw}
