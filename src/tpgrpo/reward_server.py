"""Reward HTTP server: ``tpgrpo serve-reward --reward NAME`` runs any registered scorer in its own process (or on
another machine) for ``RemoteReward`` clients. JSON + base64 images only — never pickle. Loopback by default.
Starlette (routing, requests, responses) served by uvicorn (HTTP/1.1 parsed by h11). User guide, flags, limits and
benchmark: ``docs/reward_server.md``.

Endpoints (the wire protocol of the earlier ``http.server`` version, unchanged):

* ``GET /health`` → ``{"status": "ok", "reward": NAME, "primary": SCORE, "max_batch": N, "max_request_bytes": B,
  ...}`` plus the other limits, ``batch_wait_ms`` and counters under ``"stats"``
* ``POST /score`` with ``{"images": [base64 PNG or JPEG, ...], "prompts": [str, ...], "metadata": [obj, ...]?}``
  → ``{"scores": {score_name: [float or null, ...]}, "primary": SCORE}``
* ``POST /validate`` with ``{"prompts": [...]}`` → ``{"ok": true}`` or 400 with the scorer's ``validate_prompts``
  message.

Batching: decoded /score requests wait in one queue served by a single scorer thread (never the event loop; one
scorer call at a time; ``validate_prompts`` runs there too). It merges the requests waiting together — up to
``batch_wait_ms`` after the oldest arrived, at most ``max_batch`` images, only images of the same size and only
requests that all send metadata or all send none — into ONE scorer call, then hands each request exactly its own
slice of the scores. If a merged call fails (or returns malformed scores), each of its requests is scored alone, so
only a bad request gets the error. A scorer must therefore score each image independently of the others in its
batch (as the client's own batch splitting already assumes).

Errors are JSON ``{"error": message}`` — every one, also unknown paths (404), wrong methods (405) and malformed
HTTP (400, 431): 400 for malformed JSON (also JSON nested too deep), wrong types, undecodable images, images of
different sizes, an image over ``max_image_pixels`` (refused from its header, before any pixel is decoded), a length
mismatch, ambiguous framing (Content-Length with Transfer-Encoding, conflicting Content-Lengths) and a scorer's
ValueError; 408 for a client too slow to send its request (``read_timeout``); 411 without Content-Length (or
chunked); 413 for more images than ``max_batch``, more pixels than ``max_request_pixels`` or a body over
``max_request_bytes`` (refused from the header, without reading the body); 500 when the scorer raises anything else
(the only case logged with a traceback); 503 over ``max_connections``, ``max_concurrency`` or the memory budget
(bodies and decoded pixels in flight: twice the per-request limits). The server keeps serving after every error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger("tpgrpo.reward_server")

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048  # a 4096x4096 image is refused from its header
DEFAULT_MAX_REQUEST_PIXELS = 128 * 1024 * 1024  # e.g. 128 images of 1024x1024 (384 MiB of decoded RGB)
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_BACKLOG = 2048
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
MIN_BODY_RATE = 1024 * 1024  # bytes/s a body must average (after the first read_timeout seconds)
# small requests are parsed (body up to this many bytes) and decoded (up to this many pixels) on the event loop: for
# them a thread hop and the GIL handover cost more than the work; bigger ones go to a decode thread pool
INLINE_DECODE_BYTES = 256 * 1024
INLINE_DECODE_PIXELS = 1024 * 1024
LINGER_SECONDS = 1.0  # after refusing a request whose body is unread, keep draining it this long ...
LINGER_BYTES = 4 * 1024 * 1024  # ... or up to this much, so the client sees the answer, not a reset
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # kept for callers of the old module constant


class BadRequest(Exception):
    """A client's mistake: answered ``{"error": msg}`` with ``status``, logged without a traceback. ``close``: the
    request body was not (completely) read, so the connection is closed after the answer."""

    def __init__(self, msg: str, status: int = 400, close: bool = False):
        super().__init__(msg)
        self.status, self.close = status, close


class _ClientGone(Exception):
    """The client disconnected before its request was read; nobody to answer."""


@dataclass(frozen=True)
class Limits:
    max_batch: int = DEFAULT_MAX_BATCH
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_inflight_bytes: int = 2 * DEFAULT_MAX_REQUEST_BYTES
    max_inflight_pixels: int = 2 * DEFAULT_MAX_REQUEST_PIXELS


# ---------------------------------------------------------------------------------------------------------------------
# Request parsing and image decoding (on the event loop for small requests, in a thread pool for big ones)


@dataclass
class ParsedScoreRequest:
    images: list  # opened (header read, pixels not decoded) PIL images, one per request image
    shape: tuple  # (height, width) shared by every image
    prompts: list
    metadata: list | None

    @property
    def pixels(self) -> int:
        return len(self.images) * self.shape[0] * self.shape[1]


def _loads(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8"))
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None


def _b64decode(b64: object, index: int) -> bytes:
    if not isinstance(b64, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(b64).__name__}")
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[-1]
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"images[{index}] is not valid base64") from None


def _open(raw: bytes, index: int, max_image_pixels: int) -> Image.Image:
    """Open (header only: no pixels decoded yet) and check the declared size against ``max_image_pixels``."""
    try:
        im = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError:
        raise BadRequest(f"images[{index}] is larger than Pillow's decompression-bomb limit") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadRequest(f"images[{index}] is not a decodable PNG or JPEG image ({type(e).__name__})") from None
    w, h = im.size
    if w < 1 or h < 1 or w * h > max_image_pixels:
        im.close()
        raise BadRequest(f"images[{index}] is {w}x{h}, over this server's limit of {max_image_pixels} pixels "
                         f"per image (max_image_pixels)")
    return im


def parse_score_request(body: bytes, limits: Limits | int) -> ParsedScoreRequest:
    """Validate a /score body and every image's header (format, size); decodes no pixels. ``limits`` may be a plain
    ``max_batch`` for the old call style."""
    if isinstance(limits, int):
        limits = Limits(max_batch=limits)
    req = _loads(body)
    if not isinstance(req, dict):
        raise BadRequest(f"request must be a JSON object, got {type(req).__name__}")
    images, prompts, metadata = req.get("images"), req.get("prompts"), req.get("metadata")
    del req
    if not isinstance(images, list):
        raise BadRequest("field 'images' must be a list of base64 images" + (" (missing)" if images is None else ""))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("field 'prompts' must be a list of strings" + (" (missing)" if prompts is None else ""))
    if metadata is not None and not isinstance(metadata, list):
        raise BadRequest("field 'metadata' must be a list (one entry per image) or absent")
    if len(images) > limits.max_batch:
        raise BadRequest(f"{len(images)} images is more than this server's max_batch of {limits.max_batch}", 413)
    if len(images) != len(prompts):
        raise BadRequest(f"{len(images)} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != len(images):
        raise BadRequest(f"{len(images)} images but {len(metadata)} metadata entries")
    if not images:
        raise BadRequest("field 'images' is empty")
    opened, sizes = [], set()
    for i in range(len(images)):
        raw = _b64decode(images[i], i)
        images[i] = None  # drop each base64 string as soon as it is decoded
        im = _open(raw, i, limits.max_image_pixels)
        sizes.add((im.height, im.width))
        opened.append(im)
    if len(sizes) > 1:
        raise BadRequest(f"images must all have the same size, got {sorted(sizes)}")
    parsed = ParsedScoreRequest(opened, sizes.pop(), prompts, metadata)
    if parsed.pixels > limits.max_request_pixels:
        raise BadRequest(f"{len(opened)} images of {parsed.shape[1]}x{parsed.shape[0]} are {parsed.pixels} pixels, "
                         f"over this server's limit of {limits.max_request_pixels} pixels per request "
                         f"(max_request_pixels); send fewer images per request", 413)
    return parsed


def decode_images(parsed: ParsedScoreRequest) -> np.ndarray:
    """Decode the (already size-checked) images straight into one uint8 [N, H, W, 3] array."""
    h, w = parsed.shape
    out = np.empty((len(parsed.images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(parsed.images):
        try:
            im.load()
            out[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data behind a valid header
            raise BadRequest(f"images[{i}] is not a decodable PNG or JPEG image ({type(e).__name__})") from None
        finally:
            im.close()
            parsed.images[i] = None
    return out


def decode_image(b64: str, index: int = 0, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One base64 PNG/JPEG → uint8 [H, W, 3] (BadRequest on anything else)."""
    im = _open(_b64decode(b64, index), index, max_image_pixels)
    return decode_images(ParsedScoreRequest([im], (im.height, im.width), [""], None))[0]


def _jsonable_scores(scores: dict, n: int) -> dict[str, list]:
    if not isinstance(scores, dict) or not scores:
        raise RuntimeError(f"scorer returned {type(scores).__name__}, expected a dict of score arrays")
    out = {}
    for k, v in scores.items():
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if len(arr) != n:
            raise RuntimeError(f"scorer returned {len(arr)} values of {k!r} for {n} images")
        out[str(k)] = [float(x) if math.isfinite(x) else None for x in arr]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Batching


class ScoreFailure:
    """A scorer error for one request: ``status`` 400 (the scorer's ValueError) or 500."""

    def __init__(self, status: int, msg: str):
        self.status, self.msg = status, msg


class _Item:
    __slots__ = ("images", "prompts", "metadata", "fn", "key", "n", "future", "loop", "t")

    def __init__(self, future, loop, images=None, prompts=None, metadata=None, fn=None):
        self.images, self.prompts, self.metadata, self.fn = images, prompts, metadata, fn
        self.future, self.loop, self.t = future, loop, time.monotonic()
        self.n = 0 if images is None else len(images)
        # requests merge only with the same image size and the same presence of metadata; calls never merge
        self.key = (images.shape[1:], metadata is None) if fn is None else object()


def _set_result(future, result) -> None:
    if not future.done():
        future.set_result(result)


class Batcher:
    """Merges concurrently waiting requests into one scorer call (see the module docstring). The queue and the
    scorer calls live in one dedicated thread, so the next call starts as soon as the previous one returns, however
    busy the event loop is; the event loop only enqueues requests and awaits their futures."""

    def __init__(self, scorer, max_batch: int, wait_s: float):
        self.scorer, self.max_batch, self.wait_s = scorer, max_batch, wait_s
        self.stats = {"requests": 0, "images": 0, "scorer_calls": 0, "merged_calls": 0, "fallbacks": 0,
                      "scorer_errors": 0}
        self._pending: collections.deque[_Item] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cv:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reward-scorer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cv.notify_all()
        for it in pending:
            it.loop.call_soon_threadsafe(_set_result, it.future,
                                         ScoreFailure(503, "the reward server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def _enqueue(self, **kw):
        loop = asyncio.get_running_loop()
        item = _Item(loop.create_future(), loop, **kw)
        with self._cv:
            if self._stopping:
                return ScoreFailure(503, "the reward server is shutting down")
            self._pending.append(item)
            self._cv.notify()
        return await item.future  # cancelled (client gone, shutdown): the scorer thread skips it

    async def submit(self, images: np.ndarray, prompts: list, metadata: list | None):
        """Scores (a dict of lists) or a ScoreFailure for this request alone."""
        return await self._enqueue(images=images, prompts=prompts, metadata=metadata)

    async def call(self, fn, *args):
        """Run ``fn(*args)`` in the scorer thread, between scorer calls (e.g. ``validate_prompts``); returns its
        result or the exception it raised."""
        return await self._enqueue(fn=lambda: fn(*args))

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch is due (None: stopping)."""
        with self._cv:
            while True:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return None
                head = self._pending[0]
                if head.future.done():  # cancelled while queued
                    self._pending.popleft()
                    continue
                if head.fn is not None:
                    return [self._pending.popleft()]
                deadline = head.t + self.wait_s
                while not self._stopping:
                    queued = sum(it.n for it in self._pending if it.key == head.key)
                    remaining = deadline - time.monotonic()
                    if queued >= self.max_batch or remaining <= 0:
                        break
                    self._cv.wait(remaining)
                if self._stopping:
                    return None
                batch, rest, total = [], collections.deque(), 0
                for it in self._pending:
                    if it.future.done():
                        continue
                    if it.key == head.key and total + it.n <= self.max_batch:
                        batch.append(it)
                        total += it.n
                    else:
                        rest.append(it)
                self._pending = rest
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch[0].fn is not None:
                try:
                    results = [batch[0].fn()]
                except Exception as e:  # noqa: BLE001 - handed to the request
                    results = [e]
            else:
                try:
                    results = self._score_items(batch)
                except Exception as e:  # noqa: BLE001 - a bug of ours; never leave a request hanging
                    log.exception("batching failed")
                    results = [ScoreFailure(500, f"scorer failed: {type(e).__name__}: {e}")] * len(batch)
            for it, res in zip(batch, results):
                try:
                    it.loop.call_soon_threadsafe(_set_result, it.future, res)
                except RuntimeError:  # its event loop is closed
                    pass

    # --- in the scorer thread ---

    def _call(self, images, prompts, metadata) -> dict:
        self.stats["scorer_calls"] += 1
        return _jsonable_scores(self.scorer(images, prompts, metadata), len(images))

    def _score_one(self, it: _Item):
        try:
            out = self._call(it.images, it.prompts, it.metadata)
        except ValueError as e:  # the scorer's input validation: the request is at fault
            log.info("scorer refused a request of %d images: %s: %s", it.n, type(e).__name__, e)
            return ScoreFailure(400, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - reported to the client, the server stays up
            self.stats["scorer_errors"] += 1
            log.exception("scorer failed on a request of %d images", it.n)
            return ScoreFailure(500, f"scorer failed: {type(e).__name__}: {e}")
        self.stats["requests"] += 1
        self.stats["images"] += it.n
        return out

    def _score_items(self, items: list[_Item]) -> list:
        if len(items) == 1:
            return [self._score_one(items[0])]
        images = np.concatenate([it.images for it in items])
        prompts = [p for it in items for p in it.prompts]
        metadata = None if items[0].metadata is None else [m for it in items for m in it.metadata]
        try:
            self.stats["merged_calls"] += 1
            merged = self._call(images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - find out which request is at fault
            self.stats["fallbacks"] += 1
            log.warning("scorer failed on a merged batch of %d requests (%s: %s); scoring each request alone",
                        len(items), type(e).__name__, e)
            del images
            return [self._score_one(it) for it in items]
        out, start = [], 0
        for it in items:
            out.append({k: v[start:start + it.n] for k, v in merged.items()})
            start += it.n
        self.stats["requests"] += len(items)
        self.stats["images"] += start
        return out


class _Budget:
    """An async FIFO counting semaphore over a resource amount (bytes or pixels in flight)."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._waiters: collections.deque = collections.deque()

    async def acquire(self, n: int, timeout: float) -> int:
        n = min(n, self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return n
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we gave up
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._grant()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.used += n
            fut.set_result(None)


# ---------------------------------------------------------------------------------------------------------------------
# The ASGI application


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, allow_nan=False).encode("utf-8")


def _raw_json_response(status: int, obj: dict) -> bytes:
    """A complete HTTP/1.1 response for the protocol layer (before or outside any request)."""
    from http import HTTPStatus

    body = _json_bytes(obj)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode("latin-1") + body


class _App:
    def __init__(self, scorer, name: str, limits: Limits, batch_wait_ms: float, decode_threads: int):
        self.scorer, self.name, self.limits = scorer, name, limits
        self.primary = scorer.primary
        self.batch_wait_ms = batch_wait_ms
        self.decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="reward-decode")
        self.batcher = Batcher(scorer, limits.max_batch, batch_wait_ms / 1000.0)
        self.in_flight = 0
        self.refused_busy = 0
        self.connections: set = set()  # filled by the protocol (uvicorn's server state)
        self.bytes_budget: _Budget | None = None
        self.pixel_budget: _Budget | None = None
        self.starlette = self._build()

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.batcher.stop(timeout=0)

    # --- responses ---

    @staticmethod
    def _json(status: int, obj: dict, close: bool = False, headers: dict | None = None):
        from starlette.responses import Response

        hdrs = dict(headers or {})
        if close:
            hdrs["connection"] = "close"
        return Response(_json_bytes(obj), status_code=status, media_type="application/json", headers=hdrs)

    def _error(self, request, status: int, msg: str, close: bool = False, headers: dict | None = None):
        log.info("%s %s -> %d: %s", request.method, request.scope.get("path", ""), status, msg)
        return self._json(status, {"error": msg}, close, headers)

    # --- routes ---

    def _build(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @__import__("contextlib").asynccontextmanager
        async def lifespan(app):
            self.bytes_budget = _Budget(self.limits.max_inflight_bytes)
            self.pixel_budget = _Budget(self.limits.max_inflight_pixels)
            self.batcher.start()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)

        async def http_error(request, exc: HTTPException):
            has_body = "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"
            path = request.scope.get("path", "")
            if exc.status_code == 404:
                msg = f"no such endpoint {request.method} {path}; use GET /health, POST /score or POST /validate"
            elif exc.status_code == 405:
                msg = f"method {request.method} is not allowed on {path} (allowed: {(exc.headers or {}).get('Allow')})"
            else:
                msg = str(exc.detail)
            return self._error(request, exc.status_code, msg, close=has_body, headers=exc.headers)

        async def internal_error(request, exc: Exception):
            return self._json(500, {"error": f"internal server error: {type(exc).__name__}"}, close=True)

        routes = []
        for path in ("/health", "/health/"):
            routes.append(Route(path, self.health, methods=["GET"]))
        for path in ("/score", "/score/"):
            routes.append(Route(path, self.score, methods=["POST"]))
        for path in ("/validate", "/validate/"):
            routes.append(Route(path, self.validate, methods=["POST"]))
        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={HTTPException: http_error, Exception: internal_error})
        app.router.redirect_slashes = False
        return app

    async def health(self, request):
        lim = self.limits
        return self._json(200, {
            "status": "ok", "reward": self.name, "primary": self.primary, "max_batch": lim.max_batch,
            "max_request_bytes": lim.max_request_bytes, "max_image_pixels": lim.max_image_pixels,
            "max_request_pixels": lim.max_request_pixels, "batch_wait_ms": self.batch_wait_ms,
            "max_concurrency": lim.max_concurrency, "max_connections": lim.max_connections,
            "stats": {**self.batcher.stats, "in_flight": self.in_flight, "connections": len(self.connections),
                      "refused_busy": self.refused_busy},
        })

    async def score(self, request):
        return await self._guarded(request, self._score)

    async def validate(self, request):
        return await self._guarded(request, self._validate)

    async def _guarded(self, request, fn):
        if self.in_flight >= self.limits.max_concurrency:
            self.refused_busy += 1
            return self._error(request, 503, f"server busy: {self.in_flight} requests in flight (max_concurrency "
                                             f"{self.limits.max_concurrency}); try again", close=True)
        self.in_flight += 1
        try:
            return await fn(request)
        except BadRequest as e:
            return self._error(request, e.status, str(e), close=e.close)
        except _ClientGone:
            return self._json(400, {"error": "client disconnected"}, close=True)  # not sent: nobody is listening
        except Exception as e:  # noqa: BLE001 - a bug of ours: log it, answer JSON, keep serving
            log.exception("internal error on %s %s", request.method, request.scope.get("path", ""))
            return self._json(500, {"error": f"internal server error: {type(e).__name__}: {e}"}, close=True)
        finally:
            self.in_flight -= 1

    async def _admit(self, request) -> int:
        """Check the framing headers, reserve the body's bytes; returns the Content-Length."""
        lim = self.limits
        te = request.headers.getlist("transfer-encoding")
        cl = request.headers.getlist("content-length")
        if te and cl:
            raise BadRequest("ambiguous framing: both Content-Length and Transfer-Encoding were sent", 400, True)
        if te:
            raise BadRequest("chunked requests are not supported; send Content-Length", 411, True)
        if len(set(cl)) > 1:
            raise BadRequest("ambiguous framing: conflicting Content-Length headers", 400, True)
        try:
            n = int(cl[0])
            if n < 0:
                raise ValueError
        except (IndexError, ValueError):
            raise BadRequest("a valid Content-Length header is required", 411, True) from None
        if n > lim.max_request_bytes:
            raise BadRequest(f"request body of {n} bytes is over this server's limit of {lim.max_request_bytes} "
                             f"bytes (max_request_bytes)", 413, True)
        return n

    async def _reserve(self, budget: _Budget, n: int, what: str) -> int:
        try:
            return await budget.acquire(n, self.limits.read_timeout)
        except asyncio.TimeoutError:
            self.refused_busy += 1
            raise BadRequest(f"server busy: too many {what} in flight; try again", 503, True) from None

    async def _read_body(self, request, n: int) -> bytearray:
        loop = asyncio.get_running_loop()
        timeout = self.limits.read_timeout
        deadline = loop.time() + timeout + n / MIN_BODY_RATE
        buf = bytearray()
        receive = request.receive
        while True:
            remaining = min(timeout, deadline - loop.time())
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise BadRequest(f"timed out reading the request body ({len(buf)} of {n} bytes after "
                                 f"{timeout:g} s without progress or too slow)", 408, True) from None
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            buf += msg.get("body", b"")
            if len(buf) > n:
                raise BadRequest("request body is longer than its Content-Length", 400, True)
            if not msg.get("more_body", False):
                break
        if len(buf) != n:
            raise _ClientGone()
        return buf  # a bytearray: copying it would double the peak memory of a big request

    async def _run_in(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _decode(self, fn, *args, inline: bool):
        """Parsing/decoding work: inline for small requests (a thread hop and the GIL handover cost more than the
        work), in the decode pool for big ones (keeps the event loop responsive)."""
        return fn(*args) if inline else await self._run_in(self.decode_pool, fn, *args)

    async def _score(self, request):
        n = await self._admit(request)
        nbytes = await self._reserve(self.bytes_budget, n, "request bytes")
        npix = 0
        try:
            body = await self._read_body(request, n)
            parsed = await self._decode(parse_score_request, body, self.limits, inline=n <= INLINE_DECODE_BYTES)
            del body
            npix = await self._reserve(self.pixel_budget, parsed.pixels, "image pixels")
            images = await self._decode(decode_images, parsed, inline=parsed.pixels <= INLINE_DECODE_PIXELS)
            prompts, metadata = parsed.prompts, parsed.metadata
            del parsed
            self.bytes_budget.release(nbytes)
            nbytes = 0
            result = await self.batcher.submit(images, prompts, metadata)
        finally:
            if nbytes:
                self.bytes_budget.release(nbytes)
            if npix:
                self.pixel_budget.release(npix)
        if isinstance(result, ScoreFailure):
            return self._error(request, result.status, result.msg)
        return self._json(200, {"scores": result, "primary": self.primary})

    async def _validate(self, request):
        n = await self._admit(request)
        nbytes = await self._reserve(self.bytes_budget, n, "request bytes")
        try:
            body = await self._read_body(request, n)
            prompts = await self._decode(_parse_validate, body, inline=n <= INLINE_DECODE_BYTES)
        finally:
            self.bytes_budget.release(nbytes)
        check = getattr(self.scorer, "validate_prompts", None)
        if check is not None:
            err = await self.batcher.call(check, prompts)  # in the scorer thread: models are rarely thread-safe
            if isinstance(err, ValueError):
                raise BadRequest(str(err))
            if isinstance(err, ScoreFailure):
                return self._error(request, err.status, err.msg)
            if isinstance(err, Exception):
                log.error("the scorer's validate_prompts failed: %s: %s", type(err).__name__, err, exc_info=err)
                return self._error(request, 500, f"validate_prompts failed: {type(err).__name__}: {err}")
        return self._json(200, {"ok": True})


def _parse_validate(body: bytes) -> list:
    req = _loads(body)
    prompts = req.get("prompts") if isinstance(req, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("field 'prompts' must be a list of strings")
    return prompts


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP protocol: uvicorn's h11 protocol with JSON protocol errors, a connection limit, a deadline for request
# heads (slowloris) and a lingering close (so a refused client reads our answer instead of a connection reset).


class _Transport:
    """Wraps the asyncio transport for the protocol below: ``write()``s made in one event-loop step go out as one
    ``send()`` (uvicorn writes a response's head and body separately: two syscalls, and two packets the client must
    wake up for), and ``close()`` first half-closes and drains for a moment (see LINGER_*)."""

    def __init__(self, transport, protocol, loop):
        self._t, self._p, self._loop = transport, protocol, loop
        self._out: list | None = None

    def __getattr__(self, name):
        return getattr(self._t, name)

    def write(self, data) -> None:
        if not data or self._p._lingering:  # nothing more goes out once the connection is being closed
            return
        if self._out is None:
            self._out = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._out.append(bytes(data))

    def flush(self) -> None:
        out, self._out = self._out, None
        if out and not self._t.is_closing():
            try:
                self._t.write(b"".join(out))
            except RuntimeError:  # e.g. after write_eof(): the connection is going anyway
                pass

    def is_closing(self) -> bool:
        return self._p._lingering or self._t.is_closing()

    def close(self) -> None:
        self.flush()
        self._p._linger()


def _make_protocol_class(app: _App):
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits = app.limits

    class RewardH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._real_transport = transport
            self._lingering = False
            self._drained = 0
            self._linger_timer = None
            self._head_timer = None
            self._head_cycle = None
            super().connection_made(_Transport(transport, self, self.loop))
            app.connections = self.connections
            if len(self.connections) > limits.max_connections:
                app.refused_busy += 1
                log.info("refused a connection: %d open (max_connections %d)", len(self.connections) - 1,
                         limits.max_connections)
                self.transport.write(_raw_json_response(503, {
                    "error": f"server busy: too many connections (max_connections {limits.max_connections}); "
                             f"try again"}))
                self._linger()
                return
            self._arm_head_timer()

        # --- deadline for the next request's head (request line + headers) ---

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(limits.read_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._lingering or self._real_transport.is_closing() or self.cycle is not self._head_cycle:
                return
            partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            if partial:
                log.info("closed a connection: request head incomplete after %g s", limits.read_timeout)
                self.transport.write(_raw_json_response(408, {
                    "error": f"timed out waiting for the request headers ({limits.read_timeout:g} s)"}))
                self._linger()
            else:
                self._real_transport.close()

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._drained += len(data)
                if self._drained > LINGER_BYTES:
                    self._real_transport.close()
                return
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._head_cycle:
                self._cancel_head_timer()  # a new request's head arrived; the app bounds its body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # also bounds an unread request body after an early answer

        def _should_upgrade(self) -> bool:  # no websockets here: an Upgrade header is ignored, without a warning
            return False

        # --- closing ---

        def _linger(self) -> None:
            if self._lingering:
                return
            self.transport.flush()  # before _lingering is set: what was written still goes out
            self._lingering = True
            self._cancel_head_timer()
            self._unset_keepalive_if_required()
            t = self._real_transport
            if t.is_closing():
                return
            try:
                if t.can_write_eof():
                    t.write_eof()
                t.resume_reading()
            except (OSError, RuntimeError):
                t.close()
                return
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, t.close)

        def timeout_keep_alive_handler(self) -> None:  # idle keep-alive connection: nothing to drain
            if not self._real_transport.is_closing() and not self._lingering:
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self._real_transport.close()

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._real_transport.close()
            else:
                self.cycle.keep_alive = False

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            super().connection_lost(exc)
            self._real_transport.close()

        def send_400_response(self, msg: str) -> None:
            """Malformed HTTP (h11 refused it): answer in JSON, naming h11's reason, then close."""
            exc = sys.exc_info()[1]
            status = 431 if getattr(exc, "error_status_hint", 400) == 431 else 400
            reason = str(exc) if isinstance(exc, h11.RemoteProtocolError) and str(exc) else msg
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's answer, if any, is dropped; it sees a disconnect
                cycle.message_event.set()
                if cycle.response_started:
                    self._linger()
                    return
            log.info("invalid HTTP request -> %d: %s", status, reason)
            self.transport.write(_raw_json_response(status, {"error": f"invalid HTTP request: {reason}"}))
            self._linger()

    return RewardH11Protocol


# ---------------------------------------------------------------------------------------------------------------------
# The server object


class _DropUvicornInvalidRequest(logging.Filter):
    """uvicorn warns "Invalid HTTP request received." for every malformed request, a client's mistake; the protocol
    below logs it at INFO with h11's reason instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def _quiet_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropUvicornInvalidRequest) for f in logger.filters):
        logger.addFilter(_DropUvicornInvalidRequest())


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, proto, _, addr = infos[0]
    # proto IPPROTO_TCP (not 0) matters: asyncio sets TCP_NODELAY only on accepted sockets that say TCP, and without
    # it every keep-alive response (headers and body are separate writes) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class RewardServer:
    """A bound, listening (not yet serving) reward server with the ``socketserver``-like surface the old
    ``http.server`` one had: ``serve_forever()`` (blocks; run it in a thread or the main thread), ``shutdown()``
    (from another thread: stops serving, returns when ``serve_forever`` has returned), ``server_close()`` and
    ``server_address`` (port 0 picks a free port: ``server.server_address[1]``)."""

    def __init__(self, app: _App, sock: socket.socket, backlog: int, keep_alive_timeout: float):
        import uvicorn

        self.app, self.socket = app, sock
        self.server_address = sock.getsockname()
        self.config = uvicorn.Config(
            app.starlette, lifespan="on", log_config=None, access_log=False, loop="asyncio",
            http=_make_protocol_class(app), ws="none", backlog=backlog, timeout_keep_alive=keep_alive_timeout,
            timeout_graceful_shutdown=3, server_header=False, headers=[("server", "tpgrpo-reward/2")])
        self._uvicorn = uvicorn.Server(self.config)
        self._serving = threading.Event()
        self._done = threading.Event()
        self._done.set()

    @property
    def stats(self) -> dict:
        return dict(self.app.batcher.stats)

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # noqa: ARG002 - socketserver compatibility
        self._done.clear()
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.app.close()


def make_server(scorer, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, name: str | None = None, *,
                batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                max_connections: int = DEFAULT_MAX_CONNECTIONS, backlog: int = DEFAULT_BACKLOG,
                read_timeout: float = DEFAULT_READ_TIMEOUT, keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
                max_inflight_bytes: int | None = None, max_inflight_pixels: int | None = None,
                decode_threads: int | None = None) -> RewardServer:
    """A ready (bound and listening, not yet serving) server; call ``serve_forever()`` (port 0 picks a free port:
    ``server.server_address[1]``). ``max_batch`` bounds both the images of one request and of one scorer call."""
    for key, value in (("max_batch", max_batch), ("max_request_bytes", max_request_bytes),
                       ("max_image_pixels", max_image_pixels), ("max_request_pixels", max_request_pixels),
                       ("max_concurrency", max_concurrency), ("max_connections", max_connections),
                       ("backlog", backlog)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    for key, value in (("read_timeout", read_timeout), ("keep_alive_timeout", keep_alive_timeout)):
        if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")
    if not isinstance(batch_wait_ms, (int, float)) or not 0 <= batch_wait_ms <= 10_000:
        raise ValueError(f"batch_wait_ms must be between 0 and 10000, got {batch_wait_ms!r}")
    primary = getattr(scorer, "primary", None)
    if not isinstance(primary, str):
        raise ValueError("the scorer has no 'primary' score name")
    limits = Limits(
        max_batch=max_batch, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels, max_concurrency=max_concurrency, max_connections=max_connections,
        read_timeout=float(read_timeout),
        max_inflight_bytes=max(max_inflight_bytes or 2 * max_request_bytes, max_request_bytes),
        max_inflight_pixels=max(max_inflight_pixels or 2 * max_request_pixels, max_request_pixels))
    _quiet_uvicorn()
    threads = decode_threads or max(1, min(4, os.cpu_count() or 1))
    app = _App(scorer, name or type(scorer).__name__, limits, float(batch_wait_ms), threads)
    try:
        sock = _bind(host, port, backlog)
    except BaseException:
        app.close()
        raise
    return RewardServer(app, sock, backlog, float(keep_alive_timeout))


def serve(scorer, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, name: str | None = None, log_level: str | None = None,
          **options) -> None:
    """Serve ``scorer`` until interrupted (``options``: the keyword-only arguments of :func:`make_server`);
    ``log_level`` (e.g. "info": every refused request) sets up logging to stderr when nothing else did."""
    if log_level is not None and not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(scorer, host, port, max_batch, max_request_bytes, name, **options)
    h, p = server.server_address[:2]
    lim = server.app.limits
    print(f"serving reward {name or type(scorer).__name__!s} (primary {scorer.primary!r}) on http://{h}:{p} "
          f"(max_batch {max_batch}, max_request_bytes {max_request_bytes}, batch_wait_ms "
          f"{server.app.batch_wait_ms:g}, max_image_pixels {lim.max_image_pixels}, max_request_pixels "
          f"{lim.max_request_pixels})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}, not loopback: anyone who can reach this port can use the scorer",
              flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--option must be key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise ValueError(f"--option key must be a name, got {key!r}")
    low = value.strip().lower()
    if low in ("true", "false"):
        return key, low == "true"
    if low in ("none", "null"):
        return key, None
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def _server_options(args) -> dict:
    """The make_server keyword options from the CLI flags (ValueError on a bad one)."""
    opts = dict(batch_wait_ms=getattr(args, "batch_wait_ms", DEFAULT_BATCH_WAIT_MS),
                max_image_pixels=getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
                max_request_pixels=getattr(args, "max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS),
                max_concurrency=getattr(args, "max_concurrency", DEFAULT_MAX_CONCURRENCY),
                max_connections=getattr(args, "max_connections", DEFAULT_MAX_CONNECTIONS),
                backlog=getattr(args, "backlog", DEFAULT_BACKLOG),
                read_timeout=getattr(args, "read_timeout", DEFAULT_READ_TIMEOUT),
                keep_alive_timeout=getattr(args, "keep_alive_timeout", DEFAULT_KEEP_ALIVE_TIMEOUT))
    for key in ("max_image_pixels", "max_request_pixels", "max_concurrency", "max_connections", "backlog"):
        if opts[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {opts[key]}")
    for key in ("read_timeout", "keep_alive_timeout"):
        if not (math.isfinite(opts[key]) and 0 < opts[key] <= 86400):
            raise ValueError(f"--{key.replace('_', '-')} must be a number of seconds in (0, 86400], got {opts[key]}")
    if not 0 <= opts["batch_wait_ms"] <= 10_000:
        raise ValueError(f"--batch-wait-ms must be between 0 and 10000, got {opts['batch_wait_ms']}")
    return opts


def cmd_serve_reward(args) -> int:
    from .rewards import build_reward

    try:
        options = dict(_parse_option(o) for o in args.option or [])
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        if not (math.isfinite(args.max_request_mb) and 0 < args.max_request_mb <= 1 << 20):
            raise ValueError(f"--max-request-mb must be a finite number in (0, 1048576], got {args.max_request_mb}")
        server_options = _server_options(args)
        scorer = build_reward(args.reward, **options)
    except TypeError as e:
        print(f"error: reward {args.reward!r}: bad --option: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        serve(scorer, args.host, args.port, args.max_batch, int(args.max_request_mb * 1024 * 1024), args.reward,
              log_level=getattr(args, "log_level", "warning"), **server_options)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


def add_serve_reward_parser(subparsers) -> None:
    """Add ``serve-reward`` to the CLI's subparsers."""
    p = subparsers.add_parser("serve-reward", help="serve a reward scorer over HTTP for reward.name=remote clients")
    p.add_argument("--reward", required=True, help="registered reward name (e.g. shapes, pickscore, ocr)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="most images per request, and per merged scorer call")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                   help="largest request body in MiB (bigger ones get 413 without being read)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help="how long a request may wait for others to share its scorer call (0: merge only what "
                        "is already queued)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="largest image (width x height), checked from its header before decoding")
    p.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                   help="most pixels (images x width x height) in one request (bigger ones get 413)")
    p.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                   help="most /score and /validate requests in progress at once (more get 503)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="most open connections (more get 503 and are closed)")
    p.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="listen backlog")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                   help="seconds a client may take to send its request headers, or pause while sending its body "
                        "(the body must also average 1 MiB/s after that); slower clients get 408")
    p.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="info also logs every refused request (one line each, never a traceback)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="constructor option for the reward, repeatable (e.g. --option model=/models/pickscore)")
    p.set_defaults(fn=cmd_serve_reward)
