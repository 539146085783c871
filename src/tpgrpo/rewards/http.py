"""Small JSON-over-HTTP client (stdlib urllib) with timeouts, retries and exponential backoff.

Connection errors, timeouts, HTTP 5xx and 429 are retried ``retries`` times, sleeping ``backoff · 2**attempt``
seconds in between; other HTTP errors (4xx) are not retried. Every failure raises a one-line RuntimeError naming
the service and URL — a failed request never becomes a score."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


class HttpError(RuntimeError):
    def __init__(self, msg: str, status: int | None = None, detail: str = ""):
        super().__init__(msg)
        self.status, self.detail = status, detail or msg


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "error" in obj:
            err = obj["error"]
            text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:500]


def request_json(url: str, payload: dict | None = None, *, what: str, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, headers: dict | None = None) -> dict:
    """POST ``payload`` as JSON (GET when None) and return the decoded JSON object of the reply."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    hdrs = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=data, headers=hdrs, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            msg = _error_text(e.read() or b"")
            if e.code >= 500 or e.code == 429:
                last = HttpError(f"{what} at {url} failed: HTTP {e.code}: {msg}", e.code, msg)
                continue
            raise HttpError(f"{what} at {url} rejected the request: HTTP {e.code}: {msg}", e.code, msg) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            last = HttpError(f"{what} at {url} is unreachable: {' '.join(str(reason).split()) or type(e).__name__}")
            continue
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HttpError(f"{what} at {url} sent a reply that is not JSON: {body[:200]!r}") from None
        if not isinstance(obj, dict):
            raise HttpError(f"{what} at {url} sent a JSON {type(obj).__name__}, expected an object")
        return obj
    tries = f" (after {retries + 1} attempts)" if retries else ""
    raise HttpError(f"{last}{tries}", last.status, last.detail)


def encode_image(image: np.ndarray, fmt: str = "PNG") -> str:
    """uint8 [H, W, 3] → base64 (no data: prefix) of its PNG (lossless) or JPEG encoding."""
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt, **extra)
    return base64.b64encode(buf.getvalue()).decode("ascii")
