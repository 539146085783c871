"""Faults (docs/design.md §10): atomic checkpoints under kill -9 and a full disk, SIGTERM mid-run, never a fake reward."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import tiny_overrides
from tpgrpo.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _payload(v: float):
    return {"lora": {"w": torch.full((4,), v)}, "ema": {"shadow.0": torch.full((4,), v)},
            "optimizer": {"state": {}, "param_groups": []},
            "state": {"epoch": int(v), "optimizer_steps": 0, "nonfinite_in_row": 0}}


def test_kill_9_while_writing_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _payload(1.0))
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {os.path.abspath(SRC)!r})
        import tpgrpo.checkpoint as C
        real = C.torch.save
        def slow_save(obj, f):
            real(obj, f)
            open({str(tmp_path / 'writing')!r}, 'w').close()
            time.sleep(60)
        C.torch.save = slow_save
        C.save_checkpoint({str(tmp_path)!r}, 2, {{"lora": {{"w": torch.ones(4)}}, "ema": {{"shadow.0": torch.ones(4)}},
                          "optimizer": {{}}, "state": {{"epoch": 2}}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists():
        assert time.time() < deadline and proc.poll() is None, "writer did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = find_latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "epoch_000001"
    assert load_checkpoint(latest)["state"]["epoch"] == 1
    # the half-written directory is never mistaken for a checkpoint, and the next save still works
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    save_checkpoint(tmp_path, 3, _payload(3.0))
    assert find_latest_checkpoint(tmp_path).name == "epoch_000003"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())  # the dead writer's


def test_full_disk_gives_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _payload(1.0))
    import tpgrpo.checkpoint as C

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(OSError, match="could not write checkpoint .*No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path, 2, _payload(2.0))
    assert find_latest_checkpoint(tmp_path).name == "epoch_000001"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "epoch_000001"


def test_sigterm_mid_run_checkpoints_and_resume_continues(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_model_path, run, **{"training.epochs": 50, "training.checkpoint_every": 1000,
                                                   "reward.name": "jpeg_compressibility"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "tpgrpo.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # eval record + epoch 1
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    ckpt = find_latest_checkpoint(run)
    assert ckpt is not None  # written although checkpoint_every is 1000
    stopped_at = load_checkpoint(ckpt)["state"]["epoch"]
    assert 1 <= stopped_at < 50
    args = [a if not a.startswith("training.epochs=") else f"training.epochs={stopped_at + 1}" for a in args]
    done = subprocess.run([sys.executable, "-m", "tpgrpo.cli", "train", *args, "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epochs = [json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines()]
    assert epochs == list(range(0, stopped_at + 2))


def test_a_failing_scorer_stops_training_with_its_error(tiny_model_path, tmp_path):
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer

    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path, **{"reward.name": "jpeg_compressibility"})),
                 log_trackers=False)

    class Broken:
        primary = "jpeg_compressibility"

        def __call__(self, images, prompts, metadata=None):
            raise RuntimeError("scorer exploded")

    tr.reward_fns = {"jpeg_compressibility": Broken()}
    with pytest.raises(RuntimeError, match="scorer exploded"):
        tr.collect(1)


def test_non_finite_reward_is_refused(tiny_model_path, tmp_path):
    import numpy as np

    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer, TrainingAborted

    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path, **{"reward.name": "jpeg_compressibility"})),
                 log_trackers=False)

    class NaN:
        primary = "jpeg_compressibility"

        def __call__(self, images, prompts, metadata=None):
            return {self.primary: np.full(len(images), np.nan)}

    tr.reward_fns = {"jpeg_compressibility": NaN()}
    with pytest.raises(TrainingAborted, match="non-finite"):
        tr.collect(1)
