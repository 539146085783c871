"""Data-parallel training (docs/design.md §8) with real 2-process gloo groups launched by torchrun: the same samples,
advantages and evaluation as one process, training that matches one process up to float summation order,
checkpoints written once, resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
TORCHRUN = Path(sys.executable).with_name("torchrun")
# 12 samples in groups of 4 over 2 processes: process 0 owns samples 0-5, process 1 owns 6-11, so prompt group 1
# (samples 4-7) spans both; train micro-batches of 4 mix rows of both processes.
SPLIT = {"reward.name": "jpeg_compressibility", "training.prompts_per_epoch": 3, "training.group_size": 4,
         "training.sample_batch_size": 2, "training.train_batch_size": 4,
         "data.eval_batch_size": 2}  # 6 evaluation items in 3 chunks: both processes evaluate

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _overrides(model_path, run_dir, **extra):
    return tiny_overrides(model_path, run_dir, **{**SPLIT, **extra})


@pytest.mark.parametrize("algorithm", ["tpgrpo", "flow_grpo", "mix_grpo", "flow_grpo+grpo_guard",
                                       pytest.param("tempflow_grpo", marks=pytest.mark.slow)])
def test_two_processes_compute_the_single_process_advantages(tiny_model_path, tmp_path, algorithm):
    algorithm, guard = algorithm.removesuffix("+grpo_guard"), algorithm.endswith("+grpo_guard")
    extra = {"algorithm": algorithm, "tempflow.children": 2, "training.grpo_guard": guard}
    out = tmp_path / "dist.pt"
    _torchrun([str(TESTS / "dist_worker.py"), str(out), *_overrides(tiny_model_path, tmp_path / "dist", **extra)])
    got = torch.load(out, weights_only=False)
    assert got["world_size"] == 2
    rows = 12 * (2 if algorithm == "tempflow_grpo" else 1)
    assert got["row_offsets"] == [0, rows // 2]

    single = Trainer(load_config(None, _overrides(tiny_model_path, tmp_path / "single", **extra)), log_trackers=False)
    batch, info = single.collect(1)
    # every process rolled out exactly the samples one process would have (same per-sample seeds) ...
    assert got["prompts"] == batch.prompts
    for name in ("states", "next_states", "log_probs"):
        assert torch.equal(got[name], getattr(batch, name)), name
    # ... and the credit computed on the gathered rewards is the single-process credit
    torch.testing.assert_close(got["advantages"], batch.advantages, rtol=0, atol=1e-6)
    assert got["advantages"].abs().sum() > 0
    assert (got["train_mask"] is None) == (batch.train_mask is None)
    if batch.train_mask is not None:
        assert torch.equal(got["train_mask"], batch.train_mask)
    assert (got["old_means"] is None) == (batch.old_means is None) == (not guard)
    if guard:  # GRPO-Guard's transition means, rolled out where the sample is
        assert torch.equal(got["old_means"], batch.old_means)
    assert got["reward_mean"] == pytest.approx(info["reward_mean"], abs=1e-12)
    # evaluation split over processes (every other item) gives the single-process result
    assert got["eval"] == single.evaluate(0, grid=False)


def test_two_process_training_matches_one_process_and_resumes(tiny_model_path, tmp_path):
    common = {"training.checkpoint_every": 1, "training.eval_every": 2}
    run = tmp_path / "dist"
    cli = ["-m", "tpgrpo.cli", "train"]
    first = _torchrun(cli + _overrides(tiny_model_path, run, **common, **{"training.epochs": 2}))
    assert first.stdout.count("run directory:") == 1  # only the main process reports
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000001", "epoch_000002", "latest"]  # no leftovers
    resumed = _torchrun(cli + _overrides(tiny_model_path, run, **common, **{"training.epochs": 3}) + ["--resume"])
    assert resumed.stdout.count("resumed from") == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000001", "epoch_000002", "epoch_000003", "latest"]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # logged once, by the main process

    single_dir = tmp_path / "single"
    Trainer(load_config(None, _overrides(tiny_model_path, single_dir, **common, **{"training.epochs": 3})),
            log_trackers=False).train()
    expected = [json.loads(ln) for ln in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(expected) == len(records)
    for a, b in zip(records[1:], expected[1:]):  # rewards of the same samples; losses up to float summation order
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9)
        for k in ("grad_norm", "ratio_mean", "clipfrac", "dropped_samples"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-9), (a["epoch"], k)
    assert records[-1]["eval"]["partial"] == pytest.approx(expected[-1]["eval"]["partial"], abs=1e-6)
    for name in ("lora", "ema"):
        got = load_file(str(ckpts / "epoch_000003" / f"{name}.safetensors"))
        want = load_file(str(single_dir / "checkpoints" / "epoch_000003" / f"{name}.safetensors"))
        assert got.keys() == want.keys()
        scale = max(float(v.abs().max()) for v in want.values())
        diff = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_batch_arithmetic_must_split_over_processes(tiny_model_path, tmp_path, monkeypatch):
    import tpgrpo.distributed as dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    cfg = load_config(None, _overrides(tiny_model_path, tmp_path, **{"training.sample_batch_size": 4}))
    with pytest.raises(ValueError, match=r"training\.sample_batch_size: 2 processes .* 12 samples"):
        Trainer._check_world(cfg)
    Trainer._check_world(load_config(None, _overrides(tiny_model_path, tmp_path)))  # 12 = 2 × 2 × 3: fine


def test_helpers_are_the_identity_for_one_process():
    import tpgrpo.distributed as dist

    dist.init()  # no WORLD_SIZE: nothing is initialised
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.arange(6.0)
    assert dist.all_gather_tensor(t) is t
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.reduce_metrics({"a": 2.0, "b": 3.0}, maxima=("b",)) == {"a": 2.0, "b": 3.0}
    assert dist.shard(12) == (0, 12)
    assert dist.any_true(False) is False
    dist.barrier()


def _worker_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of torchrun; read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == torchrun_pid else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_signal_to_one_process_stops_all_at_the_same_epoch(tiny_model_path, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    args = _overrides(tiny_model_path, run, **{"training.epochs": 50, "training.checkpoint_every": 1000})
    proc = subprocess.Popen([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(_free_port()), "-m", "tpgrpo.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    pid = _worker_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # only rank 1 hears it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert (run / "checkpoints").is_dir(), (out, err[-3000:])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].removeprefix("epoch_"))
    assert 1 <= stopped_at < 50
    epochs = [json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines()]
    assert epochs == list(range(stopped_at + 1))
