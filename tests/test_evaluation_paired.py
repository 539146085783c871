"""Paired evaluation: the gain of a checkpoint over the base model on the same prompts and seeds."""

import json

import numpy as np
import pytest

from conftest import tiny_overrides
from test_config_cli import _assert_bad_input, _cli
from tpgrpo.evaluation import paired_gain


def _result(partial, strict, tags):
    return {"prompts": [f"p{i}" for i in range(len(tags))], "tags": tags,
            "scores": np.array(partial, float), "strict_scores": np.array(strict, float)}


def test_paired_gain_by_hand():
    tags = ["a", "a", "a", "b", "b"]
    base = _result([0.0, 0.5, 1.0, 0.0, 1.0], [0, 0, 1, 0, 1], tags)
    tuned = _result([1.0, 0.5, 0.5, 1.0, 1.0], [1, 0, 0, 1, 1], tags)
    g = paired_gain(base, tuned)
    # d_a = [1, 0, -0.5] (mean 1/6, var 7/12), d_b = [1, 0] (mean 1/2, var 1/2); overall = mean of tag means
    assert g["per_tag"]["a"]["partial"] == pytest.approx(1 / 6)
    assert g["per_tag"]["b"]["partial"] == pytest.approx(0.5)
    assert g["partial"] == pytest.approx((1 / 6 + 0.5) / 2)
    assert g["partial_se"] == pytest.approx(np.sqrt(7 / 12 / 3 + 0.5 / 2) / 2)
    assert g["strict"] == pytest.approx((0.0 + 0.5) / 2)  # a: +1 −1 → 0; b: +1, 0 → 0.5
    assert (g["strict_gained"], g["strict_lost"], g["n"]) == (2, 1, 5)


def test_paired_gain_rejects_different_items():
    a = _result([0.0, 1.0], [0, 1], ["a", "a"])
    b = dict(a, prompts=["x", "y"])
    with pytest.raises(ValueError, match="same items"):
        paired_gain(a, b)


def test_eval_paired_cli_reports_the_gain_over_the_base(tiny_model_path, tmp_path):
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(tiny_model_path, run, **{"training.lr": 3e-2})), log_trackers=False).train()
    over = [f"model.path={tiny_model_path}", "data.eval_per_tag=2"]
    res = _cli("eval", "-c", run / "config.yaml", "--lora", run, "--paired", *over, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    g = out["gain_over_base"]
    assert g["n"] == out["n"] == 12
    assert g["partial"] == pytest.approx(out["partial"] - out["base"]["partial"], abs=1e-12)
    assert g["strict"] == pytest.approx(out["strict"] - out["base"]["strict"], abs=1e-12)
    assert g["partial_se"] >= 0
    _assert_bad_input(_cli("eval", "--paired", *over, cwd=tmp_path), "--paired needs --lora")
