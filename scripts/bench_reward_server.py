"""Throughput and latency of the reward server: the batching Starlette/uvicorn server (``tpgrpo.reward_server``)
against the old one-scorer-call-per-request ``http.server`` implementation (kept below as the baseline).

Each server runs in its own subprocess with a stand-in scorer whose cost is mostly per call (``--call-ms`` per call
plus ``--image-ms`` per image, like a GPU model). ``--clients`` threads each send ``--requests`` requests of
``--batch`` random ``--size``² images through the real client (``RemoteReward``: PNG + base64 + JSON over urllib)
and check that every score they get back is the one for their own images. Servers alternate within each of the
``--repeats`` repetitions, so both see the same machine state. Prints a table and, with ``--json``, writes it.

    python scripts/bench_reward_server.py --repeats 3 --json bench_reward_server.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


class SleepyScorer:
    """Stands in for a GPU model: a fixed cost per call plus a little per image; the score is each image's mean."""

    primary = "mean"

    def __init__(self, call_ms: float, image_ms: float):
        self.call_s, self.image_s = call_ms / 1000.0, image_ms / 1000.0
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        time.sleep(self.call_s + self.image_s * len(images))
        return {"mean": images.reshape(len(images), -1).mean(axis=1)}


# --- the baseline: the old http.server implementation of tpgrpo.reward_server (scoring path only) ---------------------

def make_legacy_server(scorer, host="127.0.0.1", port=0, max_batch=256, max_request_bytes=256 * 1024 * 1024,
                       name="legacy"):
    """The pre-uvicorn server, as it was: ThreadingHTTPServer, one thread per connection, one scorer call per request
    under a lock."""
    import base64
    import binascii
    import io
    import math
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    class BadRequest(Exception):
        def __init__(self, msg, status=400):
            super().__init__(msg)
            self.status = status

    def decode_image(b64, index):
        if not isinstance(b64, str):
            raise BadRequest(f"images[{index}] must be a base64 string")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{index}] is not valid base64") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format not in ("PNG", "JPEG"):
                    raise BadRequest(f"images[{index}] is {im.format}, expected PNG or JPEG")
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"images[{index}] is not decodable ({type(e).__name__})") from None

    def parse(body):
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise BadRequest("request must be a JSON object")
        images, prompts, metadata = req.get("images"), req.get("prompts"), req.get("metadata")
        if not isinstance(images, list) or not isinstance(prompts, list) or len(images) != len(prompts) or not images:
            raise BadRequest("bad images/prompts")
        if len(images) > max_batch:
            raise BadRequest("too many images", 413)
        arrays = [decode_image(b, i) for i, b in enumerate(images)]
        if len({a.shape for a in arrays}) > 1:
            raise BadRequest("images must all have the same size")
        return np.stack(arrays), prompts, metadata

    def jsonable(scores, n):
        out = {}
        for k, v in scores.items():
            arr = np.asarray(v, dtype=np.float64).reshape(-1)
            if len(arr) != n:
                raise RuntimeError("wrong length")
            out[str(k)] = [float(x) if math.isfinite(x) else None for x in arr]
        return out

    lock = threading.Lock()
    primary = scorer.primary

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _send(self, status, obj):
            body = json.dumps(obj, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, {"status": "ok", "reward": name, "primary": primary, "max_batch": max_batch,
                             "max_request_bytes": max_request_bytes})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(n)
            try:
                images, prompts, metadata = parse(body)
                with lock:
                    scores = scorer(images, prompts, metadata)
                self._send(200, {"scores": jsonable(scores, len(images)), "primary": primary})
            except BadRequest as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # noqa: BLE001
                self._send(500, {"error": f"scorer failed: {type(e).__name__}: {e}"})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


# --- server subprocess ------------------------------------------------------------------------------------------------

def run_server(kind: str, args) -> None:
    scorer = SleepyScorer(args.call_ms, args.image_ms)
    if kind == "old":
        server = make_legacy_server(scorer)
    else:
        from tpgrpo.reward_server import make_server

        server = make_server(scorer, "127.0.0.1", 0, max_batch=args.max_batch, name="sleepy",
                             batch_wait_ms=args.batch_wait_ms)
    print(f"PORT {server.server_address[1]}", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # exit when stdin closes
    server.serve_forever()


def start_server(kind: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", kind, "--call-ms", str(args.call_ms),
           "--image-ms", str(args.image_ms), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-batch", str(args.max_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


# --- clients ----------------------------------------------------------------------------------------------------------

class RawClient:
    """Pre-encoded PNG/JSON bodies POSTed over one keep-alive connection: measures the server, not the client."""

    def __init__(self, url: str, batches: list, prompts: list):
        import http.client

        from tpgrpo.rewards.http import encode_image

        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.connect()
        # like urllib3/requests: without it, Nagle holds the body (sent apart from the headers) until the server's
        # delayed ACK, ~40 ms on Linux, on every request of a keep-alive connection
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bodies = {id(b): json.dumps({"images": [encode_image(i) for i in b], "prompts": prompts}).encode()
                       for b in batches}

    def __call__(self, images, prompts) -> dict:
        self.conn.request("POST", "/score", body=self.bodies[id(images)], headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        reply = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {reply}")
        return {k: np.array(v, dtype=np.float64) for k, v in reply["scores"].items()}


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_clients(url: str, args, seed: int, server_pid: int | None = None) -> dict:
    from tpgrpo.rewards.remote import RemoteReward

    barrier = threading.Barrier(args.clients + 1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(cid: int) -> None:
        rng = np.random.default_rng(seed * 1000 + cid)
        batches = [rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
                   for _ in range(4)]
        prompts = [f"client {cid} image {j}" for j in range(args.batch)]
        if args.client == "remote":
            remote = RemoteReward(url, timeout=60, retries=0)
        else:
            remote = RawClient(url, batches, prompts)
        remote(batches[0], prompts)  # warm-up (connection path, imports)
        barrier.wait()
        mine = []
        for r in range(args.requests):
            imgs = batches[r % len(batches)]
            t = time.perf_counter()
            try:
                out = remote(imgs, prompts)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            mine.append(time.perf_counter() - t)
            want = imgs.reshape(len(imgs), -1).mean(axis=1)
            if not np.allclose(out["mean"], want):
                with lock:
                    errors.append(f"client {cid} got scores that are not its own")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0, c0, s0 = time.perf_counter(), time.process_time(), server_pid and proc_cpu_s(server_pid)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - c0
    server_cpu = proc_cpu_s(server_pid) - s0 if s0 is not None and server_pid else None
    lat = sorted(latencies)
    n_img = len(lat) * args.batch
    return {"images_per_s": n_img / wall, "requests": len(lat), "wall_s": wall,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "server_cpu_ms_per_request": 1000 * server_cpu / max(1, len(lat)) if server_cpu is not None else None,
            "client_cpu_ms_per_request": 1000 * client_cpu / max(1, len(lat)),
            "errors": errors[:5], "n_errors": len(errors)}


def server_calls(url: str) -> int | None:
    import urllib.request

    h = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
    return (h.get("stats") or {}).get("scorer_calls")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="images per request")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--requests", type=int, default=25, help="requests per client and repetition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--client", choices=["raw", "remote"], default="raw",
                    help="raw: pre-encoded bodies over a keep-alive connection per client (measures the server); "
                         "remote: tpgrpo's RemoteReward client (encodes PNGs, new connection per request)")
    ap.add_argument("--call-ms", type=float, default=20.0, help="scorer cost per call")
    ap.add_argument("--image-ms", type=float, default=0.25, help="scorer cost per image")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="new server's --batch-wait-ms")
    ap.add_argument("--max-batch", type=int, default=256, help="new server's --max-batch")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.serve:
        run_server(args.serve, args)
        return 0

    rows = {"old": [], "new": []}
    for rep in range(args.repeats):
        for kind in ("old", "new") if rep % 2 == 0 else ("new", "old"):
            proc, url = start_server(kind, args)
            try:
                res = run_clients(url, args, seed=rep, server_pid=proc.pid)
                if kind == "new":
                    res["scorer_calls"] = server_calls(url)
            finally:
                try:
                    proc.communicate(timeout=10)  # closes its stdin: it exits
                except subprocess.TimeoutExpired:
                    proc.kill()
            rows[kind].append(res)
            print(f"rep {rep + 1} {kind}: {res['images_per_s']:8.1f} images/s  p50 {res['p50_ms']:7.1f} ms  "
                  f"p99 {res['p99_ms']:7.1f} ms  ({res['requests']} requests, {res['n_errors']} errors"
                  + (f", {res['scorer_calls']} scorer calls incl. warm-up" if 'scorer_calls' in res else "")
                  + (f", CPU per request: server {res['server_cpu_ms_per_request']:.2f} ms"
                     if res.get("server_cpu_ms_per_request") is not None else "")
                  + f", clients {res['client_cpu_ms_per_request']:.2f} ms)",
                  flush=True)

    def med(kind, key):
        return statistics.median(r[key] for r in rows[kind])

    print(f"\n{args.client} clients: {args.clients} x {args.requests} requests x {args.batch} images of "
          f"{args.size}x{args.size}, "
          f"scorer {args.call_ms:g} ms/call + {args.image_ms:g} ms/image, {args.repeats} repetitions (medians):")
    print(f"{'server':<8}{'images/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for kind in ("old", "new"):
        print(f"{kind:<8}{med(kind, 'images_per_s'):>10.1f}{med(kind, 'p50_ms'):>10.1f}{med(kind, 'p99_ms'):>10.1f}")
    speedup = med("new", "images_per_s") / med("old", "images_per_s")
    print(f"throughput new/old: {speedup:.2f}x")
    errors = sum(r["n_errors"] for k in rows for r in rows[k])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "serve"}, "rows": rows,
                       "speedup": speedup, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                       "python": platform.python_version()}, f, indent=1)
    if errors:
        print(f"{errors} client errors, e.g. {[e for k in rows for r in rows[k] for e in r['errors']][:3]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
