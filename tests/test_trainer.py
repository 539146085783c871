"""Trainer: first-update ratio and rollout/training mismatch, exact resume, non-finite updates, run-directory artefacts."""

import json
import math

import pytest
import torch

from conftest import tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.sampling import transition_std
from tpgrpo.trainer import Trainer, TrainingAborted


def _trainer(tiny_model_path, run_dir, resume=None, **extra):
    extra.setdefault("reward.name", "jpeg_compressibility")  # varied rewards even from a random-weight model
    return Trainer(load_config(None, tiny_overrides(tiny_model_path, run_dir, **extra)), resume=resume,
                   log_trackers=False)


# Rollout vs training forward without recomputation: the same rows are evaluated in other batch compositions (main
# states + forks chunked to max_batch vs a train micro-batch), so float32 products may round differently on another
# CPU. The log-prob moves by mean((x' − μ)·δμ)/std², with δμ ≈ Δ·δv and |x' − μ| ≈ std: a relative velocity error δ
# moves it by about Δ·|v|·δ/std ≲ 10·δ on these schedules. A length-K float32 dot product reorders with relative error
# ≤ K·u (u = 2⁻²⁴ ≈ 6e-8; K ≤ 128 here: ≤ 8e-6 per layer, far less in practice), so |ρ − 1| stays well inside 1e-5 —
# TP-GRPO's clip range, the threshold that matters — and ~1e-7 is what is measured. A wrong noise, σ or kernel moves
# the log-prob by O(1).
ROLLOUT_TRAINING_TOL = 1e-5


@pytest.mark.parametrize("algorithm", ["tpgrpo", "flow_grpo", "tempflow_grpo"])
def test_recomputed_old_logprobs_make_the_first_update_ratio_exactly_one(tiny_model_path, tmp_path, algorithm):
    """By construction: the old log-probs come from the training forward in the training pass's own composition."""
    tr = _trainer(tiny_model_path, tmp_path, algorithm=algorithm, **{"sampling.kernel": "sde",
                  "training.recompute_old_logprobs": True, "tempflow.children": 2, "training.train_batch_size": 8})
    batch, _ = tr.collect(1)
    rollout = batch.log_probs.clone()
    info = tr.optimise(batch, 1)
    assert info["first_update_ratio_max_dev"] == 0.0 and info["first_update_clipfrac"] == 0.0
    # the recomputed values are the rollout's up to float rounding, and the measured mismatch is logged
    torch.testing.assert_close(batch.log_probs, rollout, rtol=0, atol=ROLLOUT_TRAINING_TOL)
    assert 0.0 <= info["old_logprob_max_dev"] < ROLLOUT_TRAINING_TOL and info["old_logprob_clipfrac"] == 0.0
    assert info["old_logprob_max_dev"] == pytest.approx(float((torch.exp(batch.log_probs - rollout) - 1).abs().max()),
                                                        abs=1e-12)


@pytest.mark.parametrize("algorithm", ["tpgrpo", "flow_grpo"])
def test_rollout_logprobs_match_the_training_forward_within_float32_rounding(tiny_model_path, tmp_path, algorithm):
    tr = _trainer(tiny_model_path, tmp_path, algorithm=algorithm, **{"sampling.kernel": "sde"})
    batch, _ = tr.collect(1)
    idx = torch.arange(len(batch.prompts))
    cond, uncond = tr.embed(batch.prompts), tr.uncond.expand(len(idx))
    with torch.no_grad():
        for w in range(len(batch.window)):
            logp, *_ = tr._step_terms(batch, idx, w, cond, uncond)
            assert (torch.exp(logp - batch.log_probs[:, w]) - 1).abs().max() < ROLLOUT_TRAINING_TOL
    info = tr.optimise(batch, 1)  # the first update is on-policy: its deviation is the mismatch, and it is logged
    assert 0.0 <= info["first_update_ratio_max_dev"] < ROLLOUT_TRAINING_TOL
    assert info["first_update_clipfrac"] == 0.0


def test_a_perturbed_old_logprob_shows_in_the_first_update_metrics(tiny_model_path, tmp_path):
    """The metrics can fail: old log-probs off by 1e-3 give |ρ − 1| ≈ 1e-3, beyond the clip range."""
    tr = _trainer(tiny_model_path, tmp_path, **{"training.train_batch_size": 8})
    batch, _ = tr.collect(1)
    batch.log_probs -= 1e-3
    info = tr.optimise(batch, 1)
    assert info["first_update_ratio_max_dev"] == pytest.approx(math.expm1(1e-3), rel=1e-2)
    assert info["first_update_clipfrac"] == 1.0


def test_resume_is_bit_identical(tiny_model_path, tmp_path):
    full = _trainer(tiny_model_path, tmp_path / "full", **{"training.epochs": 4})
    full.train()
    part = _trainer(tiny_model_path, tmp_path / "part", **{"training.epochs": 2})
    part.train()
    resumed = _trainer(tiny_model_path, tmp_path / "part", resume=True, **{"training.epochs": 4})
    assert resumed.epoch == 2
    resumed.train()
    a, b = full.lora_state(), resumed.lora_state()
    assert full.optimizer_steps == resumed.optimizer_steps > 0
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(full.ema.shadow, resumed.ema.shadow):
        assert torch.equal(x, y)
    recs = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3, 4]
    full_recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("reward_mean") for r in recs] == [r.get("reward_mean") for r in full_recs]
    assert recs[-1]["eval"] == full_recs[-1]["eval"]


def test_run_directory_artefacts(tiny_model_path, tmp_path):
    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path)), log_trackers=True)
    summary = tr.train()
    assert summary["epoch"] == 2
    for name in ["config.yaml", "metrics.jsonl", "reward_curve.png", "turning_points.png", "eval/epoch_0000.png",
                 "eval/epoch_0002.png", "checkpoints/latest", "checkpoints/epoch_000002/COMPLETE"]:
        assert (tmp_path / name).exists(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"reward_mean", "eval/partial", "time_rollout"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval" in recs[0] and "eval" in recs[-1]
    # T = 4, window of 2 starting at 0 (forks from x0, x1: 3 + 2 extra) or at 1 (forks from x1, x2: 2 + 1)
    assert recs[1]["evaluations_per_sample"] == {0: 4 + 3 + 2, 1: 4 + 2 + 1}[recs[1]["window_start"]]
    assert "dropped_samples" in recs[1] and "tp" in recs[1]


def test_nonfinite_update_is_skipped(tiny_model_path, tmp_path, monkeypatch):
    tr = _trainer(tiny_model_path, tmp_path, **{"training.max_nonfinite": 3, "training.train_batch_size": 8})
    batch, _ = tr.collect(1)
    batch.advantages[:] = 1.0
    before = tr.lora_state()
    import tpgrpo.trainer as T

    real = T.grpo_step_loss
    monkeypatch.setattr(T, "grpo_step_loss", lambda *a, **k: (lambda l, i: (l * float("nan"), i))(*real(*a, **k)))
    info = tr.optimise(batch, 1)
    assert info["skipped_updates"] == 1 and tr.nonfinite_in_row == 1
    after = tr.lora_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tr.nonfinite_in_row = 2
    with pytest.raises(TrainingAborted, match="non-finite"):
        tr.optimise(batch, 1)


def test_skipping_zero_advantage_rows_is_exact(tiny_model_path, tmp_path):
    """With β = 0 a (sample, step) with zero advantage contributes nothing; skipping it changes no update."""
    results = []
    for skip in (True, False):
        tr = _trainer(tiny_model_path, tmp_path / str(skip), **{"training.train_batch_size": 8, "training.max_grad_norm": 1e9,
                                                                "sampling.window_start_max": 0})
        batch, _ = tr.collect(1)
        batch.advantages[:] = torch.linspace(-1, 1, batch.advantages.numel()).view_as(batch.advantages)
        batch.advantages[::3, 0] = 0.0
        batch.advantages[1::3, 1] = 0.0  # no sample is all-zero (those are dropped before optimising)
        tr.skip_zero_advantages = skip
        tr.optimise(batch, 1)  # one micro-batch: the gradients of that update stay in .grad
        results.append([p.grad.clone() for p in tr.trainable])
    assert any(g.abs().sum() > 0 for g in results[0])
    # The two passes run the remaining rows in different batch compositions, so the gradients agree up to float32
    # summation order, not bit for bit. The log-prob gradient is (x' − μ)/std², and a rounding of μ (≈ u·|x|, u = 2⁻²⁴,
    # |x| ≲ 4) is relative to x' − μ ≈ std: a relative error of ≈ u·|x|/std per term, 100× that as the bound.
    # (Dropping one nonzero row of the 16 would move the gradient by several percent.)
    s = tr.cfg.sampling
    min_std = min(float(transition_std(s.kernel, tr.sigmas[i], tr.sigmas[i + 1], s.noise_level)) for i in (0, 1))
    rel_tol = 100 * 2.0 ** -24 * 4 / min_std
    for a, b in zip(*results):
        assert float((a - b).norm()) <= rel_tol * float(a.norm()) + 1e-12


def test_warns_about_nearly_deterministic_trained_steps(tiny_model_path, tmp_path):
    """At shift 1 the last step before σ = 0 goes to σ = 0.001: under cps its std is ~1000× smaller than the first."""
    with pytest.warns(UserWarning, match=r"trained step\(s\) \[8\]"):
        _trainer(tiny_model_path, tmp_path, **{"sampling.num_steps": 10, "sampling.window_size": 9,
                                               "sampling.window_start_max": 0, "sampling.kernel": "cps"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(tiny_model_path, tmp_path, **{"sampling.num_steps": 10, "sampling.window_size": 8,
                                               "sampling.window_start_max": 0, "sampling.kernel": "cps"})


def test_linear_lr_schedule_values_and_exact_resume(tiny_model_path, tmp_path):
    from tpgrpo.trainer import epoch_lr

    assert [epoch_lr(1e-3, "linear", e, 4) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert epoch_lr(1e-3, "constant", 3, 4) == 1e-3
    extra = {"training.epochs": 4, "training.lr_schedule": "linear"}
    full = _trainer(tiny_model_path, tmp_path / "full", **extra)
    full.train()
    recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in recs if "lr" in r] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    part = _trainer(tiny_model_path, tmp_path / "part", **extra)
    part._stopping = lambda: part.epoch >= 2  # as if interrupted after epoch 2 (checkpoint written on the way out)
    part.train()
    resumed = _trainer(tiny_model_path, tmp_path / "part", resume=True, **extra)
    assert resumed.epoch == 2
    resumed.train()
    a, b = full.lora_state(), resumed.lora_state()
    for k in a:
        assert torch.equal(a[k], b[k]), k
