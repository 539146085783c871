"""The reward HTTP server (Starlette + uvicorn) and its client, on loopback: the real shapes scorer, batching of
concurrent requests, per-request fallback on scorer errors, and a barrage of hostile requests against a server
subprocess (every answer a JSON error, bounded memory, still healthy afterwards)."""

import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tpgrpo.reward_server import _parse_option, add_serve_reward_parser, make_server
from tpgrpo.rewards import build_reward
from tpgrpo.rewards.http import encode_image
from tpgrpo.rewards.remote import RemoteReward

PROMPTS = ["a red circle", "a circle right of a square", "a yellow circle and a blue square", "a red circle"]


def _images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    imgs = np.full((n, size, size, 3), 255, np.uint8)
    for img in imgs:  # a few coloured blobs so the detector has something to find
        for _ in range(2):
            y, x = rng.integers(4, size - 20, 2)
            img[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
    return imgs


@pytest.fixture()
def serve():
    servers = []

    def start(scorer, **kw):
        srv = make_server(scorer, "127.0.0.1", 0, name=kw.pop("name", "shapes"), **kw)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _post(url, body: bytes, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def _payload(images, prompts, **extra):
    return json.dumps({"images": [encode_image(i) for i in images], "prompts": prompts, **extra}).encode()


def test_scores_match_in_process_scorer(serve):
    scorer = build_reward("shapes")
    _, url = serve(scorer)
    client = RemoteReward(url, timeout=10)
    assert client.primary == scorer.primary == "shapes_partial"
    assert client.reward_name == "shapes"
    images = _images(len(PROMPTS))
    remote, local = client(images, PROMPTS), scorer(images, PROMPTS)
    assert set(remote) == set(local)
    for k in local:
        assert remote[k].dtype == np.float64
        np.testing.assert_array_equal(remote[k], local[k])


def test_health_and_validate(serve):
    _, url = serve(build_reward("shapes"), max_batch=7)
    h = json.loads(__import__("urllib.request").request.urlopen(url + "/health", timeout=5).read())
    assert h["status"] == "ok" and h["reward"] == "shapes" and h["primary"] == "shapes_partial"
    assert h["max_batch"] == 7
    client = RemoteReward(url, timeout=5)
    client.validate_prompts(PROMPTS)
    with pytest.raises(ValueError, match="zebra.*not in the shapes grammar"):
        client.validate_prompts(["a purple zebra"])


def test_client_splits_batches_over_max_batch(serve):
    scorer = build_reward("shapes")
    _, url = serve(scorer, max_batch=3)
    images, prompts = _images(8), (PROMPTS * 2)
    out = RemoteReward(url, timeout=10)(images, prompts)
    np.testing.assert_array_equal(out["shapes_partial"], scorer(images, prompts)["shapes_partial"])


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompts": ["a red circle"]}).encode(), "images"),
    (json.dumps({"images": ["AAAA"]}).encode(), "prompts"),
    (json.dumps({"images": "abc", "prompts": ["a red circle"]}).encode(), "images"),
    (json.dumps({"images": ["%%%not base64%%%"], "prompts": ["a red circle"]}).encode(), "base64"),
    (json.dumps({"images": [base64.b64encode(b"hello, not an image").decode()], "prompts": ["a red circle"]}).encode(),
     "decodable"),
    (json.dumps({"images": [encode_image(_images(1)[0])] * 2, "prompts": ["a red circle"]}).encode(),
     "2 images but 1 prompts"),
    (json.dumps({"images": [encode_image(_images(1)[0])], "prompts": ["a red circle"], "metadata": [{}, {}]}).encode(),
     "metadata"),
    (json.dumps({"images": [encode_image(_images(1)[0])], "prompts": ["a purple zebra"]}).encode(), "zebra"),
])
def test_malformed_requests_get_400_and_server_keeps_serving(serve, body, needle):
    _, url = serve(build_reward("shapes"))
    status, reply = _post(url, body)
    assert status == 400, reply
    assert needle in reply["error"]
    out = RemoteReward(url, timeout=5)(_images(1), ["a red circle"])  # still serving
    assert out["shapes_partial"].shape == (1,)


def test_images_of_different_sizes_rejected(serve):
    _, url = serve(build_reward("shapes"))
    imgs = [encode_image(_images(1, 64)[0]), encode_image(_images(1, 32)[0])]
    status, reply = _post(url, json.dumps({"images": imgs, "prompts": PROMPTS[:2]}).encode())
    assert status == 400 and "same size" in reply["error"]


def test_jpeg_images_accepted(serve):
    _, url = serve(build_reward("shapes"))
    status, reply = _post(url, json.dumps({"images": [encode_image(_images(1)[0], "JPEG")],
                                           "prompts": ["a red circle"]}).encode())
    assert status == 200 and len(reply["scores"]["shapes_partial"]) == 1


def test_too_many_images_refused(serve):
    _, url = serve(build_reward("shapes"), max_batch=2)
    status, reply = _post(url, _payload(_images(3), PROMPTS[:3]))
    assert status == 413 and "max_batch of 2" in reply["error"]


def test_oversized_request_refused_with_413(serve):
    _, url = serve(build_reward("shapes"), max_request_bytes=20_000)
    noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)  # incompressible
    big = _payload(noise, PROMPTS)
    assert len(big) > 40_000
    status, reply = _post(url, big)
    assert status == 413 and "limit of 20000 bytes" in reply["error"]
    # the client knows the limit from /health: it splits the batch, and refuses one image that cannot fit
    client = RemoteReward(url, timeout=5)
    assert client(noise, PROMPTS)["shapes_partial"].shape == (4,)
    huge = np.random.default_rng(1).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="over the server's request limit of 20000 bytes"):
        client(huge, ["a red circle"])


def test_oversized_request_refused_without_reading_the_body(serve):
    _, url = serve(build_reward("shapes"), max_request_bytes=10_000)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # announce 10 GB, send nothing: the answer must come from the header alone
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000000\r\n\r\n")
        t = time.monotonic()
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"over this server's limit" in reply
    assert time.monotonic() - t < 3


def test_missing_content_length_refused(serve):
    _, url = serve(build_reward("shapes"))
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 411")


def test_unreachable_server_raises_clearly_after_retries():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"reward server at {url}/health is unreachable: .*after 3 attempts"):
        RemoteReward(url, timeout=2, retries=2, backoff=0.01)
    client = RemoteReward(url, timeout=2, retries=1, backoff=0.01, check=False, primary="shapes_partial")
    with pytest.raises(RuntimeError, match="unreachable"):
        client(_images(2), PROMPTS[:2])
    assert time.monotonic() - t < 5


class Exploding:
    primary = "boom"

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        raise RuntimeError("detector crashed")


def test_scorer_exception_gives_500_and_client_raises(serve):
    scorer = Exploding()
    _, url = serve(scorer, name="exploding")
    status, reply = _post(url, _payload(_images(1), ["a red circle"]))
    assert status == 500 and "detector crashed" in reply["error"]
    client = RemoteReward(url, timeout=5, retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match="HTTP 500: scorer failed: RuntimeError: detector crashed"):
        client(_images(1), ["a red circle"])
    assert scorer.calls == 1 + 3  # retried, never turned into zeros


def test_wrong_primary_and_metadata_passthrough(serve):
    seen = {}

    class Echo:
        primary = "echo"

        def __call__(self, images, prompts, metadata=None):
            seen["metadata"] = metadata
            return {"echo": np.arange(len(images), dtype=np.float64), "nan": np.full(len(images), np.nan)}

    _, url = serve(Echo(), name="echo")
    with pytest.raises(ValueError, match="expected primary score 'pickscore'"):
        RemoteReward(url, primary="pickscore")
    out = RemoteReward(url)(_images(2), ["a", "b"], [{"tag": 1}, {"tag": 2}])
    np.testing.assert_array_equal(out["echo"], [0.0, 1.0])
    assert np.isnan(out["nan"]).all()  # non-finite scores arrive as NaN (the trainer then aborts), not 0
    assert seen["metadata"] == [{"tag": 1}, {"tag": 2}]


def test_client_validates_inputs():
    client = RemoteReward("http://127.0.0.1:9", check=False, primary="x")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        client(_images(2), ["a red circle"])
    with pytest.raises(ValueError, match="uint8"):
        client(_images(1).astype(np.float32), ["a red circle"])
    with pytest.raises(ValueError, match="url"):
        RemoteReward("localhost:8000")


def test_cli_parser_and_options():
    import argparse

    ap = argparse.ArgumentParser()
    add_serve_reward_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["serve-reward", "--reward", "ocr", "--port", "0", "--option", "psm=7",
                          "--option", "substring=false", "--option", "model=/m/x"])
    assert args.reward == "ocr" and args.host == "127.0.0.1" and args.port == 0
    assert dict(map(_parse_option, args.option)) == {"psm": 7, "substring": False, "model": "/m/x"}
    with pytest.raises(ValueError, match="key=value"):
        _parse_option("psm7")
    rc = args.fn(ap.parse_args(["serve-reward", "--reward", "nope"]))
    assert rc == 2


def test_build_reward_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"reward 'ocr': unknown option\(s\) bogus; its options: backend, lang"):
        build_reward("ocr", bogus=1)
    with pytest.raises(ValueError, match="reward 'shapes': unknown option.*model; its options: none"):
        build_reward("shapes", model="x")


# --- batching ---------------------------------------------------------------------------------------------------------


class Recorder:
    """A tiny scorer: each image's score is its mean pixel value; records every call (sizes, shapes, metadata,
    thread) and checks that calls never overlap."""

    primary = "mean"

    def __init__(self, fail_on=None, sleep=0.0):
        self.calls, self.fail_on, self.sleep = [], fail_on or {}, sleep
        self._busy = threading.Lock()

    def __call__(self, images, prompts, metadata=None):
        assert self._busy.acquire(blocking=False), "two scorer calls at once"
        try:
            self.calls.append({"n": len(images), "shape": images.shape[1:], "metadata": metadata is not None,
                               "thread": threading.current_thread().name, "prompts": list(prompts)})
            time.sleep(self.sleep)
            for prompt, exc in self.fail_on.items():
                if prompt in prompts:
                    raise exc
            return {"mean": images.reshape(len(images), -1).mean(axis=1), "n": np.full(len(images), len(images))}
        finally:
            self._busy.release()


def _flat(value, n, size):
    return np.full((n, size, size, 3), value, np.uint8)


def _concurrently(fns, timeout=20):
    """Run the callables at the same moment (a barrier), return their results (or exceptions) in order."""
    barrier = threading.Barrier(len(fns))

    def run(fn):
        barrier.wait(timeout)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - returned to the test
            return e

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns, timeout=timeout))


def test_concurrent_requests_are_merged_into_fewer_scorer_calls(serve):
    scorer = Recorder()
    _, url = serve(scorer, name="rec", max_batch=64, batch_wait_ms=500)
    clients = [RemoteReward(url, timeout=10) for _ in range(8)]

    def request(cid):
        def go():
            images = np.concatenate([_flat(10 * cid + j, 1, 16) for j in range(3)])
            return clients[cid](images, [f"c{cid}"] * 3)
        return go

    results = _concurrently([request(c) for c in range(8)])
    for cid, out in enumerate(results):
        assert not isinstance(out, Exception), out
        np.testing.assert_array_equal(out["mean"], [10 * cid, 10 * cid + 1, 10 * cid + 2])  # its own scores
    assert sum(c["n"] for c in scorer.calls) == 24
    assert len(scorer.calls) < 8, scorer.calls  # merged (all 8 arrive well within the 500 ms window)
    assert max(c["n"] for c in scorer.calls) > 3
    assert {c["thread"] for c in scorer.calls} == {"reward-scorer"}  # one worker thread, never the event loop
    h = _health(url)
    assert h["stats"]["merged_calls"] >= 1 and h["stats"]["requests"] == 8 and h["stats"]["images"] == 24
    assert h["batch_wait_ms"] == 500


def test_only_same_size_and_same_metadata_requests_are_merged(serve):
    scorer = Recorder()
    _, url = serve(scorer, name="rec", max_batch=4, batch_wait_ms=500)

    def request(cid):
        size, meta = (16 if cid % 2 else 24), cid % 4 >= 2
        def go():
            images = _flat(cid, 2, size)
            return RemoteReward(url, timeout=10)(images, [f"c{cid}"] * 2, [{"cid": cid}] * 2 if meta else None)
        return go

    results = _concurrently([request(c) for c in range(12)])
    for cid, out in enumerate(results):
        assert not isinstance(out, Exception), out
        np.testing.assert_array_equal(out["mean"], [cid, cid])
        assert out["n"].max() <= 4  # max_batch bounds the merged call too
    assert len(scorer.calls) < 12
    for call in scorer.calls:  # every call holds one image size and one kind of metadata
        cids = {int(p[1:]) for p in call["prompts"]}
        assert len({(16 if c % 2 else 24) for c in cids}) == 1 and call["shape"][0] == (16 if min(cids) % 2 else 24)
        assert len({c % 4 >= 2 for c in cids}) == 1 and call["metadata"] == (min(cids) % 4 >= 2)


def test_a_failing_merged_call_is_retried_per_request(serve):
    scorer = Recorder(fail_on={"boom": RuntimeError("detector crashed"), "bad": ValueError("cannot score 'bad'")})
    _, url = serve(scorer, name="rec", batch_wait_ms=500)
    prompts = ["ok0", "boom", "ok1", "bad", "ok2"]

    def request(i):
        return lambda: _post(url, _payload(_flat(i, 2, 8), [prompts[i]] * 2))

    results = _concurrently([request(i) for i in range(len(prompts))])
    for i, (status, reply) in enumerate(results):
        if prompts[i] == "boom":
            assert status == 500 and "detector crashed" in reply["error"]
        elif prompts[i] == "bad":
            assert status == 400 and "cannot score 'bad'" in reply["error"]
        else:
            assert status == 200, reply
            assert reply["scores"]["mean"] == [i, i] and reply["scores"]["n"] == [2, 2]  # scored alone
    merged = [c for c in scorer.calls if len(set(c["prompts"])) > 1]
    assert merged, scorer.calls  # the merged call was tried first, then each request alone
    assert sum(1 for c in scorer.calls if set(c["prompts"]) == {"ok0"}) == 1


def test_big_requests_are_parsed_and_decoded_in_worker_threads(serve, monkeypatch):
    import tpgrpo.reward_server as rs

    seen = []
    for name in ("parse_score_request", "decode_images"):
        real = getattr(rs, name)
        monkeypatch.setattr(rs, name, lambda *a, _real=real, _name=name: (
            seen.append((_name, threading.current_thread().name.startswith("reward-decode"))), _real(*a))[1])
    _, url = serve(Recorder(), name="rec")
    noise = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)  # ~500 kB of JSON
    flat = _flat(7, 2, 1024)  # 2 Mpx in a few kB of PNG
    small = _flat(3, 2, 32)
    for images in (noise, flat, small):
        out = RemoteReward(url, timeout=10)(images, ["a", "b"])
        np.testing.assert_allclose(out["mean"], images.reshape(2, -1).mean(axis=1))
    assert seen == [("parse_score_request", True), ("decode_images", False),  # a big body, few pixels
                    ("parse_score_request", False), ("decode_images", True),  # a small body, many pixels
                    ("parse_score_request", False), ("decode_images", False)]  # small: on the event loop


def test_scorer_output_of_wrong_length_falls_back_then_500(serve):
    class Short:
        primary = "x"

        def __call__(self, images, prompts, metadata=None):
            return {"x": np.zeros(max(1, len(images) - 1))}  # one value short

    _, url = serve(Short(), name="short", batch_wait_ms=0)
    status, reply = _post(url, _payload(_flat(0, 1, 8), ["a"]))
    assert status == 200 and reply["scores"]["x"] == [0.0]
    status, reply = _post(url, _payload(_flat(0, 3, 8), ["a"] * 3))
    assert status == 500 and "2 values of 'x' for 3 images" in reply["error"]


# --- hardening (in process) -------------------------------------------------------------------------------------------


def _png_header(w, h):
    """A tiny PNG whose header declares w x h pixels (its pixel data is a few bytes, far too short)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _read_response(s):
    """(status, headers, body) of one HTTP response on socket s, or None when the server closed it unanswered."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                assert not buf, f"connection closed in the middle of an answer: {buf[:300]!r}"
                return None
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers["content-length"])
        while len(body) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        assert not buf, f"connection reset in the middle of an answer: {buf[:300]!r}"
        return None
    return int(lines[0].split()[1]), headers, body[:n]


def _health(url):
    return json.loads(__import__("urllib.request").request.urlopen(url + "/health", timeout=5).read())


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:  # e.g. HTTP 503 while the server is still over a limit
            pass
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def _port(url):
    return int(url.rsplit(":", 1)[1])


def _raw(port, data: bytes, timeout=10.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # refused mid-send: the answer may still be there to read
        return _read_response(s)


def _post_raw(body: bytes, path=b"/score", extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path, len(body), extra)) + body


def _assert_json_error(resp, status=None):
    assert resp is not None, "closed without an answer"
    code, headers, body = resp
    assert 400 <= code < 600, (code, body[:300])
    assert status is None or code == status, (code, body[:300])
    assert headers.get("content-type") == "application/json", (code, headers, body[:300])
    err = json.loads(body)
    assert isinstance(err, dict) and isinstance(err.get("error"), str) and err["error"], err
    return err["error"]


def _score_body(images, prompts=None, **extra):
    prompts = prompts if prompts is not None else ["a"] * len(images)
    return json.dumps({"images": images, "prompts": prompts, **extra}).encode()


@pytest.mark.parametrize("request_bytes, status, needle", [
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400,
     "conflicting Content-Length"),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", 400, "ambiguous framing"),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    (_post_raw(b"[" * 100_000), 400, "nested too deeply"),
    (_post_raw(b'{"images": [' + b"1" * 5000 + b'], "prompts": ["a"]}'), 400, "not valid JSON"),
    (_post_raw(b"\xff\xfe{}"), 400, "not valid JSON"),
    (_post_raw(_score_body([_b64(_png_header(4096, 4096))])), 400, "4096x4096, over this server's limit"),
    (_post_raw(_score_body([_b64(_png_header(100_000, 100_000))])), 400, "images[0]"),
    (_post_raw(_score_body([_b64(_png_header(2048, 2048))] * 40)), 413, "max_request_pixels"),
    (_post_raw(_score_body([_b64(b"GIF89a" + b"\x00" * 40)])), 400, "not a decodable PNG or JPEG"),
    (_post_raw(_score_body([_b64(_png_header(64, 64))])), 400, "not a decodable PNG or JPEG"),  # truncated pixels
    (_post_raw(b"{}", b"/nope"), 404, "no such endpoint POST /nope"),
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint GET /nope"),
    (b"PUT /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, "not allowed"),
    (b"GET /score HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    (b"HELLO THERE\r\n\r\n", 400, "invalid HTTP request"),
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad\x00: 1\r\n\r\n", 400, "invalid HTTP request"),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
])
def test_every_refusal_is_a_json_error(serve, request_bytes, status, needle):
    _, url = serve(Recorder(), name="rec")
    err = _assert_json_error(_raw(_port(url), request_bytes), status)
    assert needle in err
    assert _raw(_port(url), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # still serving


def test_a_4096_png_is_refused_from_its_header_before_decoding(serve, monkeypatch):
    from PIL import ImageFile

    loaded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (loaded.append(im.size), real_load(im))[1])
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(buf, format="PNG")  # a real one: small file, 48 MiB of pixels
    _, url = serve(Recorder(), name="rec")
    status, reply = _post(url, _score_body([_b64(buf.getvalue())]))
    assert status == 400 and "4096x4096, over this server's limit of 4194304 pixels" in reply["error"]
    assert (4096, 4096) not in loaded  # never decoded
    _, url = serve(Recorder(), name="rec", max_image_pixels=100)
    status, reply = _post(url, _payload(_flat(0, 1, 16), ["a"]))
    assert status == 400 and "16x16, over this server's limit of 100 pixels" in reply["error"]


def test_slow_clients_are_cut_off(serve):
    _, url = serve(Recorder(), name="rec", read_timeout=0.5)
    port, t = _port(url), time.monotonic()
    # headers but never the body; half the headers; nothing at all; a body dribbled too slowly
    no_body = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    half_head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Len"

    def dribble():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(no_body)
            try:
                for _ in range(8):
                    time.sleep(0.2)
                    s.sendall(b" ")
            except OSError:
                pass
            return _read_response(s)

    results = _concurrently([lambda: _raw(port, no_body), lambda: _raw(port, half_head), lambda: _raw(port, b""),
                             dribble])
    assert "timed out reading the request body" in _assert_json_error(results[0], 408)
    assert "timed out waiting for the request headers" in _assert_json_error(results[1], 408)
    assert results[2] is None  # an idle connection is just closed
    assert "timed out reading the request body" in _assert_json_error(results[3], 408)
    assert time.monotonic() - t < 5


def test_over_the_connection_and_concurrency_limits_answers_503_json(serve):
    release = threading.Event()

    class Blocking(Recorder):
        def __call__(self, images, prompts, metadata=None):
            release.wait(10)
            return super().__call__(images, prompts, metadata)

    _, url = serve(Blocking(), name="rec", max_connections=4, max_concurrency=1)
    port = _port(url)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    try:
        answers = []
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(_read_response(s))
        assert [a[0] for a in answers[:4]] == [200] * 4
        for a in answers[4:]:
            assert "too many connections" in _assert_json_error(a, 503)
    finally:
        for s in socks:
            s.close()
    _wait_for(lambda: _health(url)["stats"]["connections"] <= 1)  # the server saw those connections go
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, url, _payload(_flat(1, 1, 8), ["a"]))  # holds the only slot
        _wait_for(lambda: _health(url)["stats"]["in_flight"] == 1)
        status, reply = _post(url, _payload(_flat(2, 1, 8), ["a"]))
        assert status == 503 and "server busy" in reply["error"]
        release.set()
        assert first.result(10)[0] == 200


# --- hostile requests against a server subprocess ---------------------------------------------------------------------

SERVER_MAIN = """
import argparse, sys
from tpgrpo.reward_server import add_serve_reward_parser
ap = argparse.ArgumentParser()
add_serve_reward_parser(ap.add_subparsers(dest="cmd"))
args = ap.parse_args(sys.argv[1:])
sys.exit(args.fn(args))
"""


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hostile_requests():
    good = encode_image(_images(1, 32)[0])
    png64 = io.BytesIO()
    Image.fromarray(_images(1, 64)[0]).save(png64, format="PNG")
    truncated = png64.getvalue()[: len(png64.getvalue()) // 2]
    gif, bmp = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    Image.new("RGB", (8, 8)).save(bmp, format="BMP")
    bodies = [
        b"{not json", b"", b"[1, 2]", b"null", b'"just a string"', b'{"images": ', b"\xff\xfe\x00\x01", b"[" * 100_000,
        b'{"a": ' * 30_000, b'{"images": [' + b"9" * 5000 + b'], "prompts": ["a"]}', b"NaN", b"{}" * 1000,
        _score_body("abc"), _score_body([1]), _score_body([good], [1]), _score_body([good], "a"),
        _score_body([good], metadata="x"), _score_body([good], metadata=[1, 2]), _score_body([], []),
        _score_body([good, good], ["a"]), _score_body([None]), _score_body([{"x": 1}]), _score_body([[good]]),
        json.dumps({"images": [good]}).encode(), json.dumps({"prompts": ["a"]}).encode(),
        _score_body(["%%%not base64%%%"]), _score_body(["AAA"]), _score_body(["data:image/png;base64,@@@"]),
        _score_body(["A" * 1001]), _score_body([_b64(b"hello, not an image")]), _score_body([_b64(gif.getvalue())]),
        _score_body([_b64(bmp.getvalue())]), _score_body([_b64(os.urandom(2000))]), _score_body([_b64(b"\x89PNG")]),
        _score_body([_b64(truncated)]), _score_body([_b64(_png_header(4096, 4096))]),
        _score_body([_b64(_png_header(3000, 3000))]), _score_body([_b64(_png_header(65535, 65535))]),
        _score_body([_b64(_png_header(1, 10_000_000))]), _score_body([_b64(_png_header(0, 0))]),
        _score_body([_b64(_png_header(2048, 2048))] * 40), _score_body([_b64(_png_header(8, 8))] * 300),
        _score_body([_b64(_png_header(8, 8)), _b64(_png_header(16, 16))]),
        _score_body([good], ["a purple zebra"]),
    ]
    reqs = [_post_raw(b) for b in bodies]
    reqs += [
        _post_raw(b"{}", b"/validate"), _post_raw(b'{"prompts": ["a purple zebra"]}', b"/validate"),
        _post_raw(b'{"prompts": "x"}', b"/validate"), _post_raw(b"[" * 50_000, b"/validate"),
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HELLO\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", _post_raw(b"{}", b"/nope"),
        b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b"GET /score HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ]
    return reqs


def test_hostile_requests_get_json_errors_and_memory_stays_bounded(tmp_path):
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    stderr = open(tmp_path / "server.err", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_MAIN, "serve-reward", "--reward", "shapes", "--port", "0", "--read-timeout", "1",
         "--keep-alive-timeout", "1", "--max-connections", "64", "--max-concurrency", "16", "--max-request-mb", "2"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving reward shapes" in line, (line, open(tmp_path / "server.err").read())
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        url = f"http://127.0.0.1:{port}"
        client = RemoteReward(url, timeout=10)
        client(_images(4), PROMPTS)  # warm up before the baseline
        rss0 = _rss_mb(proc.pid)

        reqs = _hostile_requests() * 5
        assert len(reqs) >= 300

        def slow(kind):
            def go():
                if kind == "no body":
                    return _raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
                if kind == "half head":
                    return _raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nCont")
                return _raw(port, b"")
            return go

        slow_fns = [slow(k) for k in ("no body", "half head", "silent") for _ in range(8)]
        t = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            slow_futs = [pool.submit(fn) for fn in slow_fns]
            answers = list(pool.map(lambda r: _raw(port, r), reqs, timeout=60))
            slow_answers = [f.result(30) for f in slow_futs]
        statuses = [_assert_json_error(a) and a[0] for a in answers]  # every one a JSON error, none unanswered
        assert len(statuses) == len(reqs)
        print("hostile statuses", {c: statuses.count(c) for c in sorted(set(statuses))})
        for kind, a in zip(["no body"] * 8 + ["half head"] * 8 + ["silent"] * 8, slow_answers):
            if a is not None:  # cut off: 408 in JSON, or just closed
                assert "timed out" in _assert_json_error(a, 408), kind
        assert time.monotonic() - t < 30

        # many connections at once, over max_connections: the excess get 503 JSON, the rest their 400
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(120)]
        try:
            for s in socks:
                try:
                    s.sendall(_post_raw(b"{broken"))
                except OSError:
                    pass
            crowd = [_read_response(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        codes = [a[0] for a in crowd if a is not None and _assert_json_error(a)]
        print("crowd", {c: codes.count(c) for c in sorted(set(codes))}, "slow", [a and a[0] for a in slow_answers])
        assert 503 in codes and 400 in codes, codes
        assert len(codes) >= 100  # nearly all answered (a refused one may see a reset instead)

        time.sleep(1.5)  # cut-off connections drain
        h = _health(url)
        assert h["status"] == "ok" and h["stats"]["in_flight"] == 0
        assert client(_images(2), PROMPTS[:2])["shapes_partial"].shape == (2,)  # still scoring
        growth = _rss_mb(proc.pid) - rss0
        print(f"RSS {rss0:.0f} MB -> {rss0 + growth:.0f} MB")
        assert growth < 300, f"server RSS grew by {growth:.0f} MB"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    stderr.seek(0)
    log = stderr.read()
    stderr.close()
    assert "Traceback" not in log, log[-3000:]
