"""The reward HTTP server and its client, on loopback, serving the real shapes scorer."""

import base64
import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

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
