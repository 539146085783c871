"""Your own reward by import path (``reward.name: module:attr`` or ``file.py:attr``), the Python API, and the
example in examples/ training on the built-in world and behind the reward server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from tpgrpo.rewards import build_reward

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = f"{ROOT / 'examples' / 'colourfulness_reward.py'}:Colourfulness"


def _images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_example_file_reward_scores_with_options():
    scorer = build_reward(EXAMPLE, background=200)
    grey = np.full((1, 8, 8, 3), 128, np.uint8)
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    out = scorer(np.concatenate([grey, red]), ["a", "b"])
    assert out["colourfulness"].tolist() == pytest.approx([0.0, 1.0])
    assert out["drawn_share"].tolist() == pytest.approx([1.0, 1.0])


def test_module_attribute_path_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "def red(images, prompts, metadata=None):\n"
        "    return {'red': np.asarray(images)[..., 0].mean(axis=(1, 2)) / 255.0}\n"
        "red.primary = 'red'\n"
        "def make(scale=1.0):\n"
        "    def score(images, prompts, metadata=None):\n"
        "        return {'scaled': scale * np.ones(len(prompts))}\n"
        "    score.primary = 'scaled'\n"
        "    return score\n")
    monkeypatch.chdir(tmp_path)
    assert build_reward("my_rewards:red").primary == "red"               # a scorer object
    assert build_reward("my_rewards:make", scale=2.0)(_images(), ["a"] * 3)["scaled"].tolist() == [2.0] * 3


@pytest.mark.parametrize("name, needle", [
    ("no_such_module_xyz:score", "cannot import no_such_module_xyz"),
    ("examples/missing_file.py:X", "file not found"),
    (f"{ROOT / 'examples' / 'colourfulness_reward.py'}:Nope", "no attribute 'Nope'"),
    ("json:__doc__", "not callable"),
    ("json:JSONDecoder", "must be a scorer"),
    (":x", "module:attribute"),
    ("broken_mod:x", "ZeroDivisionError"),
])
def test_bad_import_paths_are_one_line_errors(name, needle, tmp_path, monkeypatch):
    (tmp_path / "broken_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        build_reward(name)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_options_for_a_custom_reward(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bad options"):
        build_reward(EXAMPLE, no_such_option=1)


def test_cli_bad_reward_path_exits_2_with_one_line(tmp_path, capsys):
    from tpgrpo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(ROOT / "configs" / "default.yaml"), f"run_dir={tmp_path / 'r'}",
              "reward.name=no_such_module_xyz:score"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "no_such_module_xyz" in err


def test_python_api_trains_the_built_in_world_with_the_example_reward(tiny_model_path, tmp_path):
    """The README's Python example, on the tiny model: a config built in code, a custom reward, two epochs."""
    from tpgrpo import Config, Trainer, load_config

    cfg = load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **{"reward.name": EXAMPLE}))
    assert isinstance(cfg, Config)
    summary = Trainer(cfg, log_trackers=False).train()
    assert summary["epoch"] == 2 and 0.0 <= summary["eval_after"]["partial"] <= 1.0
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "colourfulness_mean" in recs[1] and "drawn_share_mean" in recs[1]
    built = Config(algorithm="flow_grpo", training={"epochs": 3}, reward={"name": EXAMPLE})
    assert built.training.epochs == 3 and built.reward.name == EXAMPLE


def test_a_scorer_returning_the_wrong_shape_stops_training_with_its_name(tiny_model_path, tmp_path, monkeypatch):
    (tmp_path / "bad_scorer.py").write_text(
        "import numpy as np\n"
        "def short(images, prompts, metadata=None):\n"
        "    return {'short': np.zeros(1)}\n"
        "short.primary = 'short'\n")
    monkeypatch.chdir(tmp_path)
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer, TrainingAborted

    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run",
                                                  **{"reward.name": "bad_scorer:short"})), log_trackers=False)
    with pytest.raises(TrainingAborted, match="'short' has 1 values for 4 images"):
        tr.collect(1)


def test_custom_reward_behind_the_reward_server():
    from tpgrpo.reward_server import make_server
    from tpgrpo.rewards.remote import RemoteReward

    scorer = build_reward(EXAMPLE)
    srv = make_server(scorer, "127.0.0.1", 0, name=EXAMPLE)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        remote = RemoteReward(url=f"http://127.0.0.1:{srv.server_address[1]}")
        images = _images(4)
        got = remote(images, ["a"] * 4)
        np.testing.assert_allclose(got["colourfulness"], scorer(images, ["a"] * 4)["colourfulness"], rtol=0,
                                   atol=1e-12)
    finally:
        srv.shutdown()
        srv.server_close()
