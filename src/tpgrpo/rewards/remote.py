"""Client for a reward served by ``tpgrpo serve-reward`` (see ``tpgrpo.reward_server``): any scorer, e.g. a
GenEval-style detector, running in another process or on another machine.

Images go as base64 PNG (lossless) in JSON — never pickle. On construction the client asks the server's
``/health`` for the reward's primary score name and its limits, so a server that is down fails before training
with one clear line; batches larger than the server's ``max_batch`` (or its request-size limit) are split.
Connection errors, timeouts and HTTP 5xx are retried ``retries`` times with exponential backoff (``backoff``,
2·backoff, ...); then ``RuntimeError("reward server at URL is unreachable: ...")`` — never zeros.

Options: ``url`` (e.g. ``http://127.0.0.1:8000``), ``timeout`` (seconds per request), ``retries``, ``backoff``,
``primary`` (expected primary score name; checked against the server), ``check`` (query /health now; default
True — with False, ``primary`` is required), ``image_format`` (``png`` or ``jpeg``).
"""

from __future__ import annotations

from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from .base import check_batch, register_reward
from .http import HttpError, encode_image, request_json


@register_reward("remote")
class RemoteReward:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, primary: str | None = None, check: bool = True, image_format: str = "png"):
        parsed = urlparse(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote reward: url must look like http://host:port, got {url!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"remote reward: retries must be a non-negative integer, got {retries!r}")
        if float(timeout) <= 0 or float(backoff) < 0:
            raise ValueError(f"remote reward: timeout must be > 0 and backoff >= 0, got {timeout!r}, {backoff!r}")
        if str(image_format).lower() not in ("png", "jpeg"):
            raise ValueError(f"remote reward: image_format must be png or jpeg, got {image_format!r}")
        self.url = str(url).rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.image_format = str(image_format).upper()
        self.max_batch: int | None = None
        self.max_request_bytes: int | None = None
        self.reward_name: str | None = None
        self.primary = primary
        if check:
            self.health()
        elif primary is None:
            raise ValueError("remote reward: primary= is required when check=False")

    def _request(self, path: str, payload: dict | None = None) -> dict:
        return request_json(self.url + path, payload, what="reward server", timeout=self.timeout,
                             retries=self.retries, backoff=self.backoff)

    def health(self) -> dict:
        h = self._request("/health")
        if h.get("status") != "ok" or not isinstance(h.get("primary"), str):
            raise RuntimeError(f"reward server at {self.url} is not healthy: {h}")
        if self.primary is not None and self.primary != h["primary"]:
            raise ValueError(f"remote reward: expected primary score {self.primary!r} but the server at {self.url} "
                             f"serves {h.get('reward')!r} with primary {h['primary']!r}")
        self.primary, self.reward_name = h["primary"], h.get("reward")
        self.max_batch = h.get("max_batch")
        self.max_request_bytes = h.get("max_request_bytes")
        return h

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Ask the server whether its scorer can score these prompts (ValueError with its message if not)."""
        try:
            self._request("/validate", {"prompts": list(prompts)})
        except HttpError as e:
            if e.status == 400:
                raise ValueError(e.detail) from None
            raise

    def _chunks(self, encoded: list[str], prompts: list[str], metadata):
        limit_n = self.max_batch or len(encoded)
        limit_b = (self.max_request_bytes or 0) * 0.95 - 1024
        start, size = 0, 0
        for i, (img, p) in enumerate(zip(encoded, prompts)):
            item = len(img) + 4 * len(p.encode("utf-8")) + 64
            if limit_b > 0 and item > limit_b:
                raise ValueError(f"remote reward: one image is {len(img)} bytes encoded, over the server's "
                                 f"request limit of {self.max_request_bytes} bytes")
            if i > start and (i - start >= limit_n or (limit_b > 0 and size + item > limit_b)):
                yield start, i
                start, size = i, 0
            size += item
        if start < len(encoded):
            yield start, len(encoded)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata=None) -> dict[str, np.ndarray]:
        images = check_batch("remote reward", images, prompts, metadata)
        prompts = list(prompts)
        encoded = [encode_image(img, self.image_format) for img in images]
        parts: list[dict] = []
        for a, b in self._chunks(encoded, prompts, metadata):
            payload = {"images": encoded[a:b], "prompts": prompts[a:b]}
            if metadata is not None:
                payload["metadata"] = list(metadata[a:b])
            reply = self._request("/score", payload)
            scores = reply.get("scores")
            if not isinstance(scores, dict) or not scores:
                raise RuntimeError(f"reward server at {self.url} sent no scores: {str(reply)[:200]}")
            for k, v in scores.items():
                if not isinstance(v, list) or len(v) != b - a:
                    got = len(v) if isinstance(v, list) else type(v).__name__
                    raise RuntimeError(f"reward server at {self.url} sent {k!r} with {got} values for {b - a} images")
            if self.primary is None:
                self.primary = reply.get("primary")
            parts.append(scores)
        out = {k: np.array([np.nan if x is None else x for part in parts for x in part[k]], dtype=np.float64)
               for k in parts[0]}
        if self.primary not in out:
            raise RuntimeError(f"reward server at {self.url} sent no {self.primary!r} score (got {sorted(out)})")
        return out
