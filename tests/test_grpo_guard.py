"""GRPO-Guard (arXiv 2510.22319): the normalised ratio and the 1/Δt reweighting, transcribed from the official code
(yifan123/flow_grpo @ 2e2f712, scripts/train_sd3_GRPO_Guard.py L915–939) with the per-sample bias of issue #244 (as
VeRL-Omni's verl_omni/trainer/diffusion/diffusion_algos.py L527–549), checked by hand; the option in the trainer.
(The brightness learning check is in tests/test_learning.py.)"""

import math

import pytest
import torch

from conftest import full_and_resumed, tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.loss import clipped_policy_loss, guard_log_ratio, guard_step_weight
from tpgrpo.sampling import log_prob
from tpgrpo.trainer import Trainer

# a hand-made case: 2 samples × 2 latent dims at two steps; rollout means 0, x' = s·ε, current means μ = Δ
STEPS = [  # (s, Δt, ε, Δ)
    (0.1, 0.04, [[1.0, -0.5], [0.5, 1.0]], [[0.03, 0.02], [0.02, 0.03]]),
    (0.05, 0.01, [[-1.0, 2.0], [2.0, 0.0]], [[0.01, 0.02], [-0.02, 0.05]]),
]


def _step(s, eps, delta):
    eps, mu = torch.tensor(eps), torch.tensor(delta, requires_grad=True)
    x_next, mu_old = s * eps, torch.zeros(2, 2)
    lp_old, lp = log_prob(x_next, mu_old, s), log_prob(x_next, mu, s)
    return eps, mu, mu_old, lp_old, lp


def test_normalised_ratio_by_hand_and_its_gradient():
    """log r̂ = s·(log r + mean(Δ²)/(2s²)) = mean(ε·Δ): step 0 [0.0100, 0.0200], step 1 [0.0150, −0.0200]; plain ratios
    [1.0698, 1.1823] and [1.2840, 0.5016]. Its gradient in μ is ε/D (the bias is not detached)."""
    expected = [[0.0100, 0.0200], [0.0150, -0.0200]]
    plain = [[1.069830, 1.182345], [1.284025, 0.501576]]
    for (s, _, eps, delta), want, want_plain in zip(STEPS, expected, plain):
        eps_t, mu, mu_old, lp_old, lp = _step(s, eps, delta)
        assert torch.exp(lp - lp_old).tolist() == pytest.approx(want_plain, rel=1e-5)
        r = guard_log_ratio(lp, lp_old, mu, mu_old, s)
        assert r.tolist() == pytest.approx(want, abs=1e-6)
        assert r.tolist() == pytest.approx((eps_t * torch.tensor(delta)).mean(1).tolist(), abs=1e-6)
        r.sum().backward()
        torch.testing.assert_close(mu.grad, eps_t / 2)


def test_guarded_loss_by_hand():
    """A = [+1, −1], clip 0.01: step 0 r̂ = [1.010050, 1.020201] → mean(max(−A·r̂, −A·clip r̂)) = (−1.01 + 1.020201)/2,
    × 1/0.04 = 0.127517; step 1 r̂ = [1.015113, 0.980199] → (−1.01 + 0.99)/2 × 1/0.01 = −1.0."""
    adv = torch.tensor([1.0, -1.0])
    losses = []
    for s, dt, eps, delta in STEPS:
        _, mu, mu_old, lp_old, lp = _step(s, eps, delta)
        r = guard_log_ratio(lp, lp_old, mu, mu_old, s)
        loss, _ = clipped_policy_loss(r, torch.zeros(2), adv, 0.01, weights=torch.full((2,), 1 / dt))
        losses.append(loss.mean().item())
    assert losses == pytest.approx([0.127517, -1.0], abs=1e-5)
    assert guard_step_weight(0.7, 0.66) == pytest.approx(25.0)


def test_the_bias_is_per_sample_not_the_batch_mean():
    """The official code's `.mean(dim=())` averaged the bias over the batch (issue #244): step 1 would give log r̂ =
    [0.021, −0.026]. Per sample it is [0.015, −0.020]."""
    s, _, eps, delta = STEPS[1]
    _, mu, mu_old, lp_old, lp = _step(s, eps, delta)
    assert guard_log_ratio(lp, lp_old, mu, mu_old, s).tolist() != pytest.approx([0.021, -0.026], abs=1e-4)


def test_on_policy_ratio_is_one_and_per_sample_stds_broadcast():
    g = torch.Generator().manual_seed(0)
    mu, x = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    s = torch.tensor([0.3, 0.2, 0.1])
    lp = log_prob(x, mu, s.view(3, 1, 1, 1))
    assert torch.equal(guard_log_ratio(lp, lp, mu, mu, s.view(3, 1, 1, 1)), torch.zeros(3))


@pytest.mark.parametrize("bad", [["algorithm=diffusion_nft"], ["algorithm=flow_grpo", "sampling.logprob=mse"]])
def test_guard_needs_a_gaussian_log_prob_method(bad):
    with pytest.raises(ValueError, match="training.grpo_guard"):
        load_config(None, ["training.grpo_guard=true", *bad])


@pytest.mark.parametrize("algorithm", ["flow_grpo", "tempflow_grpo"])
def test_the_trainer_trains_the_guarded_loss_on_policy(tiny_model_path, tmp_path, algorithm):
    """The rollout keeps each window transition's mean; the first update is on policy (r̂ = 1 up to the float
    difference of the rollout's and the training pass's batch compositions) and the epoch updates the LoRA weights
    (TempFlow-GRPO: its children share their state's mean)."""
    ov = {"algorithm": algorithm, "training.grpo_guard": True, "sampling.kernel": "sde", "sampling.logprob": "gaussian",
          "training.clip_range": 1e-3, "training.epochs": 1, "reward.name": "jpeg_compressibility",
          "tempflow.children": 2, "training.train_batch_size": 4 * (2 if algorithm == "tempflow_grpo" else 1)}
    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **ov)), log_trackers=False)
    batch, _ = tr.collect(1)
    assert batch.old_means is not None and batch.old_means.shape == batch.next_states.shape
    before = tr.lora_state()
    info = tr.optimise(batch, 1)
    assert info["first_update_ratio_max_dev"] < 1e-5 and math.isfinite(info["loss"])
    after = tr.lora_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_with_the_guard_is_exact(tiny_model_path, tmp_path):
    def make(run, resume=None, **extra):
        ov = {"algorithm": "flow_grpo", "training.grpo_guard": True, "sampling.kernel": "sde",
              "reward.name": "jpeg_compressibility", "training.clip_range": 1e-3, **extra}
        return Trainer(load_config(None, tiny_overrides(tiny_model_path, run, **ov)), resume=resume,
                       log_trackers=False)

    full, resumed = full_and_resumed(make, tmp_path, epochs=3, stop=2)
    a, b = full.lora_state(), resumed.lora_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
