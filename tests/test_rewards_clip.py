"""CLIP score, PickScore and the LAION aesthetic head on tiny random CLIP models loaded from local directories
(with the committed fixture tokenizer), plus the VLM judge against a canned OpenAI-compatible server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from tpgrpo.rewards import build_reward
from tpgrpo.rewards.aesthetic import expected_head_shapes
from tpgrpo.rewards.clip_common import CLIP_MEAN, CLIP_STD, ClipPreprocessor

TOKENIZER = Path(__file__).parent / "fixtures" / "tokenizers" / "clip"
PROMPTS = ["a photo of a cat", "a red circle to the left of a blue square", "a photo of a cat", "zebra!"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=1100, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=1095, eos_token_id=1096, pad_token_id=1096)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(path)
    CLIPTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40}, "crop_size": {"height": 32,
        "width": 32}, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}))
    return path


def _images(n, h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_fixture_tokenizer_is_a_clip_tokenizer():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    ids = tok("A Photo of a CAT")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                                              "<|endoftext|>"]
    assert (tok.bos_token, tok.eos_token, tok.model_max_length) == ("<|startoftext|>", "<|endoftext|>", 77)
    assert tok.decode(tok("zebra quokka!")["input_ids"], skip_special_tokens=True) == "zebra quokka !"
    assert sum(f.stat().st_size for f in TOKENIZER.iterdir()) < 200_000


def test_preprocessing_matches_clip():
    pre = ClipPreprocessor(size=40, crop_size=32)
    img = np.zeros((60, 80, 3), np.uint8)
    img[:] = (255, 128, 0)
    x = pre(img[None])
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    want = (np.array([255, 128, 0]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[0, :, 5, 5], want, rtol=1e-5)
    # center crop: a marker in the image center survives, one in the far left corner does not
    img2 = np.zeros((40, 80, 3), np.uint8)
    img2[18:22, 38:42] = 255
    img2[:4, :4] = 255
    y = ClipPreprocessor(size=40, crop_size=40, resample=0)(img2[None])[0]  # nearest: exact pixels
    assert y[0, 20, 20] > 1.0 and y[0, 0, 0] < 0


def test_clip_score_from_local_dir(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    reward = build_reward("clip_score", model=str(tiny_clip))
    assert reward.clip.preprocess.size == 40 and reward.clip.preprocess.crop_size == 32  # read from the dir
    images = _images(4)
    out = reward(images, PROMPTS)
    assert set(out) == {"clip_score", "clip_cosine"} and reward.primary == "clip_score"
    for v in out.values():
        assert v.shape == (4,) and v.dtype == np.float64 and np.isfinite(v).all()
    np.testing.assert_allclose(out["clip_score"], 100 * out["clip_cosine"] / 30)
    assert np.all(np.abs(out["clip_cosine"]) <= 1 + 1e-6)
    np.testing.assert_array_equal(reward(images, PROMPTS)["clip_score"], out["clip_score"])  # deterministic
    # batching and prompt de-duplication do not change scores
    small = build_reward("clip_score", model=str(tiny_clip), batch_size=1)
    np.testing.assert_allclose(small(images, PROMPTS)["clip_score"], out["clip_score"], rtol=1e-5, atol=1e-6)
    # the same numbers as transformers' own CLIPModel forward
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    px = torch.from_numpy(reward.clip.preprocess(images))
    with torch.no_grad():
        logits = model(**tok(PROMPTS, padding=True, return_tensors="pt"), pixel_values=px).logits_per_image
        cos = logits.diagonal() / model.logit_scale.exp()
    np.testing.assert_allclose(out["clip_cosine"], cos.numpy(),
                               rtol=1e-4, atol=1e-6)


def test_pickscore_from_local_dir(tiny_clip):
    reward = build_reward("pickscore", model=str(tiny_clip))
    out = reward(_images(4), PROMPTS)
    assert reward.primary == "pickscore" and out["pickscore"].shape == (4,) and np.isfinite(out["pickscore"]).all()
    np.testing.assert_allclose(out["pickscore"], out["pickscore_raw"] / 26)
    clip = build_reward("clip_score", model=str(tiny_clip))(_images(4), PROMPTS)
    np.testing.assert_allclose(out["pickscore_raw"], reward.clip.logit_scale * clip["clip_cosine"], rtol=1e-5)


def test_clip_rewards_reject_bad_input(tiny_clip, tmp_path):
    reward = build_reward("clip_score", model=str(tiny_clip))
    with pytest.raises(ValueError, match="clip_score: 3 images but 2 prompts"):
        reward(_images(3), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"clip_score: images must be an array \[N, H, W, 3\]"):
        reward(_images(2)[..., 0], PROMPTS[:2])
    with pytest.raises(ValueError, match="pickscore: cannot load CLIP model from"):
        build_reward("pickscore", model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_reward("clip_score", model=str(tiny_clip), dtype="float8")


def _save_head(path, dim, bad=None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_head_shapes(dim).items()}
    if bad:
        tensors.update(bad)
    save_file(tensors, str(path))
    return path


def test_aesthetic_head_from_safetensors(tiny_clip, tmp_path):
    head = _save_head(tmp_path / "head.safetensors", 16)
    reward = build_reward("aesthetic", model=str(tiny_clip), head=str(head))
    images = _images(3)
    out = reward(images, ["x", "y", "z"])
    assert reward.primary == "aesthetic" and out["aesthetic"].shape == (3,) and np.isfinite(out["aesthetic"]).all()
    np.testing.assert_array_equal(reward(images, ["x", "y", "z"])["aesthetic"], out["aesthetic"])
    # by hand: normalised CLIP image embedding through the linear layers
    from safetensors.torch import load_file

    w = load_file(str(head))
    emb = reward.clip.image_embeds(images)
    np.testing.assert_allclose(emb.norm(dim=-1).numpy(), 1.0, rtol=1e-5)  # the head sees L2-normalised embeddings
    x = emb
    for i in (0, 2, 4, 6, 7):
        x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    np.testing.assert_allclose(out["aesthetic"], x[:, 0].double().numpy(), rtol=1e-5)
    # the original .pth format is read with weights_only=True
    torch.save(w, tmp_path / "head.pth")
    out2 = build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "head.pth"))(images, ["x"] * 3)
    np.testing.assert_allclose(out2["aesthetic"], out["aesthetic"])


def test_aesthetic_head_rejects_wrong_files(tiny_clip, tmp_path):
    wrong_dim = _save_head(tmp_path / "l14.safetensors", 768)  # a ViT-L/14 head on a 16-dim CLIP
    with pytest.raises(ValueError, match=r"tensor layers.0.weight has shape \[1024, 768\], expected \[1024, 16\]"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(wrong_dim))
    bad = _save_head(tmp_path / "bad.safetensors", 16, {"layers.7.weight": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match=r"layers.7.weight has shape \[2, 16\], expected \[1, 16\]"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(bad))
    renamed = _save_head(tmp_path / "renamed.safetensors", 16, {"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra.weight'\]"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(renamed))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read head weights"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="head= is required"):
        build_reward("aesthetic", model=str(tiny_clip))
    with pytest.raises(ValueError, match="does not exist"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "nope.safetensors"))


# --- VLM judge -------------------------------------------------------------------------------------------------

@pytest.fixture()
def judge_server():
    """A tiny OpenAI-compatible chat-completions server replying with canned content."""
    state = {"replies": [], "requests": [], "status": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, dict(self.headers), body))
            status = state["status"].pop(0) if state["status"] else 200
            reply = state["replies"].pop(0) if len(state["replies"]) > 1 else state["replies"][0]
            data = json.dumps(reply if isinstance(reply, dict) else
                              {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", state
    srv.shutdown()
    srv.server_close()


def test_vlm_judge_parses_scores(judge_server):
    import base64
    import io

    from PIL import Image

    url, state = judge_server
    state["replies"] = ["Score: 7", "I'd rate it 8/10.", "9"]
    reward = build_reward("vlm_judge", url=url, model="tiny-vlm", workers=1, api_key="sk-test")
    images = _images(3, 16, 16)
    out = reward(images, ["a cat", "a dog", "a bird"])
    np.testing.assert_allclose(out["vlm_judge_raw"], [7, 8, 9])
    np.testing.assert_allclose(out["vlm_judge"], [0.7, 0.8, 0.9])
    path, headers, body = state["requests"][0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-vlm"
    assert headers["Authorization"] == "Bearer sk-test"
    parts = body["messages"][0]["content"]
    data_url = next(p for p in parts if p["type"] == "image_url")["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, images[0])  # lossless
    assert '"a cat"' in next(p for p in parts if p["type"] == "text")["text"]


def test_vlm_judge_retries_5xx_then_succeeds(judge_server):
    url, state = judge_server
    state["replies"], state["status"] = [{"error": {"message": "overloaded"}}, "Score: 4"], [503]
    reward = build_reward("vlm_judge", url=url, model="m", retries=2, backoff=0.01, workers=1)
    assert reward(_images(1, 8, 8), ["x"])["vlm_judge_raw"][0] == 4


@pytest.mark.parametrize("reply, match", [
    ("What a lovely picture!", "cannot parse a score.*no number"),
    ("3 cats and 4 dogs", "2 numbers"),
    ("Score: 42", "outside \\[0, 10\\]"),
    ({"choices": []}, "sent no choices\\[0\\].message.content"),
    ({"id": "x"}, "sent no choices"),
])
def test_vlm_judge_malformed_reply_is_a_clear_error(judge_server, reply, match):
    url, state = judge_server
    state["replies"] = [reply]
    reward = build_reward("vlm_judge", url=url, model="m", retries=0, workers=1)
    with pytest.raises(RuntimeError, match=match):
        reward(_images(1, 8, 8), ["x"])


def test_vlm_judge_errors(judge_server):
    url, state = judge_server
    state["replies"], state["status"] = [{"error": {"message": "model not found"}}], [404]
    with pytest.raises(RuntimeError, match="rejected the request: HTTP 404: model not found"):
        build_reward("vlm_judge", url=url, model="m", retries=3, workers=1)(_images(1, 8, 8), ["x"])
    with pytest.raises(ValueError, match="model= is required"):
        build_reward("vlm_judge", url=url)
    with pytest.raises(ValueError, match="must contain {prompt}"):
        build_reward("vlm_judge", url=url, model="m", prompt_template="rate this")
    with pytest.raises(ValueError, match="url must look like"):
        build_reward("vlm_judge", url="localhost:8000", model="m")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        build_reward("vlm_judge", url=url, model="m")(_images(2, 8, 8), ["x"])
