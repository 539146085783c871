"""Trackers through accelerate: tensorboard by default, wandb on request (tested offline: no network needed)."""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer

wandb = pytest.importorskip("wandb")


def test_wandb_offline_run_gets_scalars_eval_grids_and_the_resolved_config(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **{
        "reward.name": "jpeg_compressibility", "training.eval_every": 1, "logging.trackers": "[tensorboard, wandb]",
        "logging.wandb_mode": "offline", "logging.project": "tpgrpo-tests", "logging.run_name": "offline-check"}))
    tr = Trainer(cfg)
    run = tr.tracker.get_tracker("wandb", unwrap=True)  # the wandb Run; record what the tracker sends it
    sent, real_log = [], run.log
    run.log = lambda data, **kw: (sent.append((kw.get("step"), data)), real_log(data, **kw))[1]
    tr.train()
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert dict(run.config)["training"]["epochs"] == 2  # the resolved configuration, nested
    assert dict(run.config)["reward"]["name"] == "jpeg_compressibility"
    scalars = {step: d for step, d in sent if "reward_mean" in d}
    assert sorted(scalars) == [1, 2] and "eval/partial" in scalars[2] and "time_rollout" in scalars[1]
    grids = [step for step, d in sent if "eval/grid" in d]
    assert grids == [0, 1, 2] and isinstance(next(d for _, d in sent if "eval/grid" in d)["eval/grid"][0], wandb.Image)
    [offline] = list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # written offline, nothing sent anywhere
    assert list(offline.glob("run-*.wandb"))
    assert len(list((offline / "files" / "media" / "images" / "eval").glob("grid_*.png"))) == 3


def test_wandb_tracker_without_wandb_installed_is_a_one_line_error(tiny_model_path, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **{"logging.trackers": "[wandb]"}))
    with pytest.raises(ValueError, match="logging.trackers: wandb is not installed"):
        Trainer(cfg)
