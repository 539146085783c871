"""The distributed engine (tpgrpo.engine, issue #18) on real 2-process gloo groups: FSDP2 full fine-tuning against
one process (final weights within float tolerance, about half the bytes per process), sharded checkpoints with
exact resume, consolidation into one file that loads into the model; DDP full fine-tuning."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from test_distributed import SPLIT, _torchrun
from tpgrpo.checkpoint import CheckpointError, consolidate_shards, is_sharded, load_checkpoint
from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer

FULL = {**SPLIT, "model.full_finetune": "true", "training.checkpoint_every": 1, "training.eval_every": 100}
CLI = ["-m", "tpgrpo.cli", "train"]


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(records):
    """Records without timings, and without evaluations (the interrupted run also evaluated its last epoch, 2)."""
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "eval"} for r in records]


def _close(got: dict, want: dict, rel=1e-5):
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff <= rel * scale, (diff, scale)


def test_fsdp2_full_finetune_matches_one_process_shards_memory_and_resumes_exactly(tiny_model_path, tmp_path):
    ov = lambda run, epochs, **kw: tiny_overrides(tiny_model_path, run, **{**FULL, "training.epochs": epochs, **kw})
    # the sharded run: 2 epochs, then resumed to 3
    run = tmp_path / "fsdp2"
    _torchrun(CLI + ov(run, 2, **{"distributed.strategy": "fsdp2"}))
    ck2 = run / "checkpoints" / "epoch_000002"
    assert is_sharded(ck2) and not (ck2 / "lora.safetensors").exists()
    assert sorted(p.name for p in (ck2 / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = _torchrun(CLI + ov(run, 3, **{"distributed.strategy": "fsdp2"}) + ["--resume"])
    assert resumed.stdout.count("resumed from") == 1
    # the same run without the interruption: bit-identical weights, EMA and metrics (same computation by construction)
    straight = tmp_path / "fsdp2_straight"
    _torchrun(CLI + ov(straight, 3, **{"distributed.strategy": "fsdp2"}))
    a = load_checkpoint(run / "checkpoints" / "epoch_000003")
    b = load_checkpoint(straight / "checkpoints" / "epoch_000003")
    for key in ("lora", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert _untimed(_records(run)[1:]) == _untimed(_records(straight)[1:])

    # one process, no engine: the same final weights up to float summation order
    single = tmp_path / "single"
    Trainer(load_config(None, ov(single, 3)), log_trackers=False).train()
    want = load_checkpoint(single / "checkpoints" / "epoch_000003")
    _close(a["lora"], want["lora"])
    _close(a["ema"], want["ema"])
    n_params = sum(v.numel() for v in want["lora"].values())
    assert len(want["lora"]) > 20 and n_params > 10_000  # every transformer weight trained

    # memory: parameters, gradients and Adam state per process ≈ ½ of the unsharded (= DDP's per-process) bytes
    sharded, full = _records(run)[1]["engine_bytes"], _records(single)[1]["engine_bytes"]
    assert full["params"] == 4 * n_params and full["grads"] == full["params"]
    assert full["optimizer"] == 2 * full["params"]  # exp_avg + exp_avg_sq
    for k in ("params", "grads", "optimizer"):
        assert 0.45 * full[k] <= sharded[k] <= 0.55 * full[k], (k, sharded[k], full[k])


def test_consolidation_writes_one_file_that_loads_into_the_model(tiny_model_path, tmp_path):
    from tpgrpo.cli import main
    from tpgrpo.models.toy import ShapesModel

    run = tmp_path / "fsdp2"
    _torchrun(CLI + tiny_overrides(tiny_model_path, run, **{**FULL, "training.epochs": 1,
                                                            "distributed.strategy": "fsdp2"}))
    ck = run / "checkpoints" / "epoch_000001"
    out = tmp_path / "transformer.safetensors"
    assert main(["consolidate", str(run), "--out", str(out)]) == 0
    weights = load_file(str(out))
    model = ShapesModel.load(tiny_model_path)
    missing, unexpected = model.transformer.load_state_dict(weights, strict=False)  # every weight, full shapes
    assert not unexpected and set(missing) == {n for n, _ in model.transformer.named_buffers()}  # buffers: not trained
    ema = consolidate_shards(ck)["ema"]
    names = list(consolidate_shards(ck)["lora"])
    assert all(torch.equal(weights[n], ema[f"shadow.{i}"]) for i, n in enumerate(names))
    assert main(["consolidate", str(ck), "--out", str(tmp_path / "raw.safetensors"), "--raw"]) == 0
    base = ShapesModel.load(tiny_model_path).transformer.state_dict()
    raw = load_file(str(tmp_path / "raw.safetensors"))
    assert any(not torch.equal(raw[n], base[n]) for n in raw)  # trained

    # a sharded checkpoint resumes only a sharded run: one line, exit 2
    cfg = load_config(None, tiny_overrides(tiny_model_path, run, **{**FULL, "training.epochs": 2}))
    with pytest.raises(CheckpointError, match="sharded .*fsdp2"):
        Trainer(cfg, resume=True, log_trackers=False)
    # a damaged shard is named
    shard = ck / "shards" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: checksum mismatch"):
        load_checkpoint(ck)


@pytest.mark.slow
def test_ddp_full_finetune_matches_one_process(tiny_model_path, tmp_path):
    run, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun(CLI + tiny_overrides(tiny_model_path, run, **{**FULL, "distributed.strategy": "ddp"}))
    Trainer(load_config(None, tiny_overrides(tiny_model_path, single, **FULL)), log_trackers=False).train()
    got, want = (load_checkpoint(r / "checkpoints" / "epoch_000002") for r in (run, single))
    _close(got["lora"], want["lora"])
    assert _records(run)[1]["engine_bytes"] == _records(single)[1]["engine_bytes"]  # DDP replicates


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"training.beta": "0.01"},                     # the KL reference, sharded too
                                   {"algorithm": "diffusion_nft"},                # old-policy weights, sharded
                                   {"model.full_finetune": "false", "training.lora_rank": "2"}],  # LoRA on FSDP2
                         ids=["kl_reference", "diffusion_nft", "lora"])
def test_fsdp2_matches_one_process(tiny_model_path, tmp_path, extra):
    run, single = tmp_path / "fsdp2", tmp_path / "single"
    _torchrun(CLI + tiny_overrides(tiny_model_path, run, **{**FULL, **extra, "distributed.strategy": "fsdp2"}))
    Trainer(load_config(None, tiny_overrides(tiny_model_path, single, **{**FULL, **extra})), log_trackers=False).train()
    got, want = (load_checkpoint(r / "checkpoints" / "epoch_000002") for r in (run, single))
    _close(got["lora"], want["lora"])
    _close(got["ema"], want["ema"])


def test_the_accelerate_launch_environment_picks_the_engine():
    from tpgrpo.engine import launcher_strategy

    assert launcher_strategy({}) == "single"  # one process
    assert launcher_strategy({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    with pytest.raises(ValueError, match="FSDP version 1"):  # never silently replicated instead of sharded
        launcher_strategy({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(ValueError, match="DeepSpeed"):
        launcher_strategy({"ACCELERATE_USE_DEEPSPEED": "true"})
