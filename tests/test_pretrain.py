"""`tpgrpo pretrain-shapes`: caption noise, initialisation from weights, exact resume, bad input."""

import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tpgrpo.shapes import pretrain as pretrain_module
from tpgrpo.shapes.grammar import TAGS, split_prompts
from tpgrpo.shapes.pretrain import PretrainConfig, _slots, draw_example, neighbours, pretrain


def test_neighbours_differ_in_exactly_one_slot_and_stay_in_the_split():
    train = split_prompts("train")
    train_texts = {p.text for p in train}
    near = neighbours(train)
    by_text = {p.text: p for p in train}
    assert set(near) == train_texts
    for text, others in near.items():
        p = by_text[text]
        for q in others:
            assert q.text in train_texts and q.tag == p.tag and q.text != p.text
            assert sum(a != b for a, b in zip(_slots(p), _slots(q))) == 1
    # hand-checked cases
    assert {q.text for q in near["two circles"]} == {"one circle", "three circles", "two triangles"}
    assert {q.text for q in near["a square"]} == {"a circle", "a triangle"}


def test_caption_noise_rate_and_targets():
    train = split_prompts("train")
    by_tag = {t: [p for p in train if p.tag == t] for t in TAGS}
    near = neighbours(train)
    rng = random.Random(0)
    n, wrong = 4000, 0
    for _ in range(n):
        scene, caption = draw_example(rng, by_tag, near, 0.3)
        if scene.text != caption:
            wrong += 1
            assert scene in near[caption]
    # prompts without neighbours stay exact, so the rate is at most 0.3
    assert 0.25 < wrong / n <= 0.33
    rng = random.Random(0)
    assert all(s.text == c for s, c in (draw_example(rng, by_tag, near, 0.0) for _ in range(500)))


def _weights(path):
    return load_file(str(path))


def test_resume_is_exact_and_init_loads_weights(tmp_path, tiny_model_path, monkeypatch):
    common = dict(batch_size=2, steps=4, ckpt_every=2, warmup=1, caption_noise=0.2, init=str(tiny_model_path))
    straight = pretrain(PretrainConfig(out=str(tmp_path / "a"), **common))

    # interrupted run: killed right after the state file of step 2 is written, then restarted
    save = pretrain_module._save_state

    def save_then_die(path, model, opt, step, rng, cfg):
        save(path, model, opt, step, rng, cfg)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(out=str(tmp_path / "b"), **common))
    monkeypatch.setattr(pretrain_module, "_save_state", save)
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "b"), **common))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # lr 0: the exported weights are exactly the initial ones
    same = pretrain(PretrainConfig(out=str(tmp_path / "c"), **{**common, "steps": 1, "lr": 0.0}))
    init, out = _weights(tiny_model_path), _weights(same)
    assert all(torch.equal(init[k], out[k]) for k in init)
    assert not all(torch.equal(init[k], a[k]) for k in init)


@pytest.mark.parametrize("args, field", [(["--caption-noise", "1.5"], "caption_noise"),
                                         (["--init", "/nonexistent.safetensors"], "init")])
def test_bad_pretrain_arguments_are_one_line_errors(args, field, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tpgrpo.cli", "pretrain-shapes", "--out", str(tmp_path), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert field in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
