"""Reward HTTP server: ``tpgrpo serve-reward --reward NAME`` runs any registered scorer in its own process (or on
another machine) for ``RemoteReward`` clients. JSON + base64 images only — never pickle. Loopback by default.

Endpoints:

* ``GET /health`` → ``{"status": "ok", "reward": NAME, "primary": SCORE, "max_batch": N, "max_request_bytes": B}``
* ``POST /score`` with ``{"images": [base64 PNG or JPEG, ...], "prompts": [str, ...], "metadata": [obj, ...]?}``
  → ``{"scores": {score_name: [float or null, ...]}, "primary": SCORE}``
* ``POST /validate`` with ``{"prompts": [...]}`` → ``{"ok": true}`` or 400 with the scorer's ``validate_prompts``
  message.

Errors are JSON ``{"error": message}``: 400 for malformed JSON, wrong types, undecodable images, images of
different sizes or a length mismatch (and for a scorer's ValueError); 411 without Content-Length; 413 for more
images than ``max_batch`` or a body over ``max_request_bytes`` (refused from the header, without reading it);
500 when the scorer raises anything else. The server keeps serving after every error. Scoring calls are
serialised with a lock (models are rarely thread-safe); requests are decoded concurrently.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

log = logging.getLogger("tpgrpo.reward_server")

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class BadRequest(Exception):
    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def decode_image(b64: str, index: int) -> np.ndarray:
    if not isinstance(b64, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(b64).__name__}")
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[-1]
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"images[{index}] is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in ("PNG", "JPEG"):
                raise BadRequest(f"images[{index}] is {im.format}, expected PNG or JPEG")
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadRequest(f"images[{index}] is {im.width}x{im.height}, over {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadRequest(f"images[{index}] is not a decodable PNG or JPEG image ({type(e).__name__})") from None


def parse_score_request(body: bytes, max_batch: int) -> tuple[np.ndarray, list[str], list | None]:
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest(f"request must be a JSON object, got {type(req).__name__}")
    images, prompts, metadata = req.get("images"), req.get("prompts"), req.get("metadata")
    if not isinstance(images, list):
        raise BadRequest("field 'images' must be a list of base64 images" + (" (missing)" if images is None else ""))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("field 'prompts' must be a list of strings" + (" (missing)" if prompts is None else ""))
    if metadata is not None and not isinstance(metadata, list):
        raise BadRequest("field 'metadata' must be a list (one entry per image) or absent")
    if len(images) > max_batch:
        raise BadRequest(f"{len(images)} images is more than this server's max_batch of {max_batch}", 413)
    if len(images) != len(prompts):
        raise BadRequest(f"{len(images)} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != len(images):
        raise BadRequest(f"{len(images)} images but {len(metadata)} metadata entries")
    if not images:
        raise BadRequest("field 'images' is empty")
    arrays = [decode_image(b, i) for i, b in enumerate(images)]
    if len({a.shape for a in arrays}) > 1:
        raise BadRequest(f"images must all have the same size, got {sorted({a.shape[:2] for a in arrays})}")
    return np.stack(arrays), prompts, metadata


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


def make_server(scorer, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, name: str | None = None) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server; call ``serve_forever()`` (port 0 picks a free port:
    ``server.server_address[1]``)."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
    primary = getattr(scorer, "primary", None)
    if not isinstance(primary, str):
        raise ValueError("the scorer has no 'primary' score name")
    reward_name = name or type(scorer).__name__
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "tpgrpo-reward/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route the per-request log through logging (quiet by default)
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, obj: dict, close: bool = False) -> None:
            body = json.dumps(obj, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, msg: str, close: bool = False) -> None:
            log.info("%s %s -> %d: %s", self.command, self.path, status, msg)
            self._send(status, {"error": msg}, close)

        def _refuse_body(self, status: int, msg: str) -> None:
            """Answer without reading the (unread) body, then linger briefly so the client sees the reply."""
            self._error(status, msg, close=True)
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                deadline, drained = time.monotonic() + 1.0, 0
                while time.monotonic() < deadline and drained < 4 * 1024 * 1024:
                    chunk = self.connection.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "reward": reward_name, "primary": primary, "max_batch": max_batch,
                                 "max_request_bytes": max_request_bytes})
            else:
                self._error(404, f"no such endpoint GET {self.path}; use GET /health or POST /score")

        def _read_body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._refuse_body(411, "chunked requests are not supported; send Content-Length")
                return None
            length = self.headers.get("Content-Length")
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except (TypeError, ValueError):
                self._refuse_body(411, "a valid Content-Length header is required")
                return None
            if n > max_request_bytes:
                self._refuse_body(413, f"request body of {n} bytes is over this server's limit of "
                                       f"{max_request_bytes} bytes (max_request_bytes)")
                return None
            body = self.rfile.read(n)
            if len(body) != n:
                self.close_connection = True
                return None
            return body

        def do_POST(self):
            path = self.path.rstrip("/")
            if path not in ("/score", "/validate"):
                self._refuse_body(404, f"no such endpoint POST {self.path}; use POST /score")
                return
            body = self._read_body()
            if body is None:
                return
            try:
                if path == "/validate":
                    self._validate(body)
                    return
                images, prompts, metadata = parse_score_request(body, max_batch)
            except BadRequest as e:
                self._error(e.status, str(e))
                return
            try:
                with lock:
                    scores = scorer(images, prompts, metadata)
                out = _jsonable_scores(scores, len(images))
            except ValueError as e:  # the scorer's input validation: the request is at fault
                self._error(400, f"{type(e).__name__}: {e}")
                return
            except Exception as e:  # noqa: BLE001 - reported to the client, the server stays up
                log.exception("scorer failed")
                self._error(500, f"scorer failed: {type(e).__name__}: {e}")
                return
            self._send(200, {"scores": out, "primary": primary})

        def _validate(self, body: bytes) -> None:
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise BadRequest(f"request body is not valid JSON: {e}") from None
            prompts = req.get("prompts") if isinstance(req, dict) else None
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise BadRequest("field 'prompts' must be a list of strings")
            check = getattr(scorer, "validate_prompts", None)
            if check is not None:
                try:
                    check(prompts)
                except ValueError as e:
                    raise BadRequest(str(e)) from None
            self._send(200, {"ok": True})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(scorer, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, name: str | None = None) -> None:
    """Serve ``scorer`` until interrupted."""
    server = make_server(scorer, host, port, max_batch, max_request_bytes, name)
    h, p = server.server_address[:2]
    print(f"serving reward {name or type(scorer).__name__!s} (primary {scorer.primary!r}) on http://{h}:{p} "
          f"(max_batch {max_batch}, max_request_bytes {max_request_bytes})", flush=True)
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


def cmd_serve_reward(args) -> int:
    import sys

    from .rewards import build_reward

    try:
        options = dict(_parse_option(o) for o in args.option or [])
        if args.max_batch < 1 or args.max_request_mb <= 0:
            raise ValueError("--max-batch must be >= 1 and --max-request-mb > 0")
        scorer = build_reward(args.reward, **options)
    except TypeError as e:
        print(f"error: reward {args.reward!r}: bad --option: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        serve(scorer, args.host, args.port, args.max_batch, int(args.max_request_mb * 1024 * 1024), args.reward)
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
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most images per request")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                   help="largest request body in MiB (bigger ones get 413 without being read)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="constructor option for the reward, repeatable (e.g. --option model=/models/pickscore)")
    p.set_defaults(fn=cmd_serve_reward)
