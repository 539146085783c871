"""TempFlow-GRPO and DanceGRPO on the shared engine (docs/design.md §3.2, §3.3), and reward aggregation."""

import pytest
import torch

from conftest import tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.credit import noise_aware_weights
from tpgrpo.methods import ScoredRollout, build_method
from tpgrpo.rollout import RolloutPlan, initial_noise, make_generators, sample_ode, sample_rollout
from tpgrpo.sampling import flux_mu, log_prob, sigma_schedule, transition, transition_std
from tpgrpo.trainer import Trainer


def _trainer(path, run_dir, **extra):
    extra.setdefault("reward.name", "jpeg_compressibility")
    return Trainer(load_config(None, tiny_overrides(path, run_dir, **extra)), log_trackers=False)


@pytest.mark.parametrize("sigmas", [sigma_schedule(10, 3.0), sigma_schedule(28, mu=flux_mu(1024))],
                         ids=["sd35-10-shift3", "flux-dynamic"])
@pytest.mark.parametrize("kind,noise", [("sde", 0.7), ("cps", 0.7), ("dance", 0.3)])
def test_noise_aware_weights_follow_the_schedule(sigmas, kind, noise):
    steps = list(range(len(sigmas) - 2))  # all but the final step
    w = noise_aware_weights(sigmas, steps, kind=kind, noise_level=noise)
    assert w.shape == (len(steps),)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    std = torch.stack([transition_std(kind, float(sigmas[i]), float(sigmas[i + 1]), noise) for i in steps]).double()
    torch.testing.assert_close(w.double(), std / std.mean(), rtol=1e-5, atol=1e-6)
    if kind == "sde":  # Flow-GRPO's std is not constant over a shifted schedule: weights differ from 1
        assert float(w.max() - w.min()) > 0.05


def test_tempflow_rollout_children(tiny_model):
    n, C = 2, 3
    cond = tiny_model.encode_prompts(["a red circle", "two squares"])
    uncond = tiny_model.encode_prompts([""]).expand(n)
    sig = sigma_schedule(6, 1.0)
    noise = initial_noise(make_generators([0, 1]), tiny_model.latent_shape())
    plan = RolloutPlan(sigmas=sig, kernel="sde", noise_level=0.7, window=[1, 3], branch_children=C,
                       guidance_scale=2.0)
    ro = sample_rollout(tiny_model, plan, cond, uncond, noise, make_generators([5, 6]))
    # the main trajectory is pure ODE
    torch.testing.assert_close(ro.final_latents, sample_ode(tiny_model, sig, cond, uncond, noise, 2.0), rtol=0, atol=1e-5)
    assert ro.child_next_latents.shape == (n, 2, C, 3, 32, 32)
    assert ro.child_final_latents.shape == (n, 2, C, 3, 32, 32)
    # main 6 + children: C × (remaining ODE steps after the branch step): C·(6−2) + C·(6−4)
    assert ro.evaluations_per_sample == 6 + C * 4 + C * 2
    # children are distinct SDE draws from the same main state, with consistent log-probs
    for k, i in enumerate([1, 3]):
        x = ro.window_latents[:, k]
        v = tiny_model.velocity(x, float(sig[i]), cond, uncond, 2.0)
        mean, std = transition("sde", x, v, float(sig[i]), float(sig[i + 1]), 0.7)
        for c in range(C):
            torch.testing.assert_close(log_prob(ro.child_next_latents[:, k, c], mean, std), ro.child_log_probs[:, k, c])
        assert (ro.child_next_latents[:, k, 0] - ro.child_next_latents[:, k, 1]).abs().max() > 1e-3


def test_tempflow_seed_groups_never_mix():
    cfg = load_config(None, ["algorithm=tempflow_grpo", "tempflow.children=3", "sampling.kernel=sde"])
    m = build_method("tempflow_grpo", cfg)
    n, W, C = 4, 9, 3
    R = torch.zeros(n, W, C)
    R[0] = 100.0  # a huge reward on one seed must not leak into the others
    R[1, :, 0] = 1.0
    credit = m.credit(ScoredRollout(torch.zeros(n), child_rewards=R), torch.zeros(n, dtype=torch.long),
                      torch.zeros(n, dtype=torch.long), list(range(W)), torch.Generator())
    adv = credit.advantages.view(n, C, W)
    assert torch.equal(adv[0], torch.zeros(C, W))          # all children equal → 0
    assert torch.equal(adv[2:], torch.zeros(2, C, W))
    assert (adv[1, 0] > 0).all() and (adv[1, 1:] < 0).all()
    torch.testing.assert_close(adv[1].sum(0), torch.zeros(W), atol=1e-6, rtol=0)
    assert credit.step_weights.shape == (W,)


@pytest.mark.parametrize("children,equal", [(1, False), (3, True)])
def test_tempflow_policy_loss_is_zero_with_one_child_or_equal_rewards(tiny_model_path, tmp_path, children, equal):
    tr = _trainer(tiny_model_path, tmp_path, algorithm="tempflow_grpo", **{"tempflow.children": children,
                                                                          "sampling.kernel": "sde"})
    if equal:
        tr.reward_fns = {"jpeg_compressibility": _Constant()}
    batch, _ = tr.collect(1)
    assert batch.advantages.shape == (8 * children, 2)
    assert torch.equal(batch.advantages, torch.zeros_like(batch.advantages))
    before = tr.lora_state()
    tr.skip_zero_advantages = False
    info = tr.optimise(batch, 1)
    assert info["loss"] == 0.0 or info["dropped_samples"] == 8 * children
    assert all(torch.equal(before[k], tr.lora_state()[k]) for k in before)


class _Constant:
    primary = "jpeg_compressibility"

    def __call__(self, images, prompts, metadata=None):
        import numpy as np

        return {self.primary: np.full(len(images), 0.5)}


def test_tempflow_trains_end_to_end(tiny_model_path, tmp_path):
    tr = _trainer(tiny_model_path, tmp_path, algorithm="tempflow_grpo",
                  **{"tempflow.children": 2, "sampling.kernel": "sde", "training.epochs": 1})
    batch, info = tr.collect(1)
    assert batch.states.shape[:2] == (16, 2) and batch.step_weights is not None
    # the weights come from the schedule the trainer actually samples with
    torch.testing.assert_close(batch.step_weights, noise_aware_weights(tr.sigmas, batch.window, kind="sde",
                                                                       noise_level=0.7).float())
    before = tr.lora_state()
    tr.optimise(batch, 1)
    assert any(not torch.equal(before[k], v) for k, v in tr.lora_state().items())


def test_dance_same_noise_within_groups(tiny_model_path, tmp_path):
    tr = _trainer(tiny_model_path, tmp_path, algorithm="dance_grpo",
                  **{"sampling.kernel": "dance", "sampling.noise_level": 0.3, "sampling.same_noise": True})
    prompts, group_ids, _, _, noise, _ = tr.epoch_inputs(1)
    G = 4
    for g in range(2):
        block = noise[g * G:(g + 1) * G]
        assert all(torch.equal(block[0], block[j]) for j in range(G))
    assert not torch.equal(noise[0], noise[G])


def test_dance_trains_the_configured_fraction_of_steps(tiny_model_path, tmp_path):
    tr = _trainer(tiny_model_path, tmp_path, algorithm="dance_grpo",
                  **{"sampling.kernel": "dance", "sampling.noise_level": 0.3, "sampling.window_size": 3,
                     "sampling.num_steps": 6, "dance.timestep_fraction": 0.6})
    batch, _ = tr.collect(1)
    assert batch.train_mask.shape == (8, 3)
    assert (batch.train_mask.sum(1) == 1).all()  # int(0.6 · 3) = 1 step per trajectory, as the reference floors
    m = build_method("dance_grpo", tr.cfg)
    masks = m.trained_steps_mask(200, 10, torch.Generator().manual_seed(0))
    assert (masks.sum(1) == 6).all() and masks.float().mean(0).min() > 0.4  # every step gets trained sometimes


def test_advantage_level_aggregation_differs_from_reward_level(tiny_model_path, tmp_path):
    from tpgrpo.advantages import group_advantages

    weights = "{jpeg_compressibility: 1.0, jpeg_incompressibility: 0.5}"
    r1 = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 6.0], dtype=torch.float64)
    r2 = torch.tensor([9.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 20.0], dtype=torch.float64)
    groups = torch.arange(8) // 4
    scored = {"jpeg_compressibility": ScoredRollout(r1), "jpeg_incompressibility": ScoredRollout(r2)}
    out = {}
    for agg in ("advantage", "reward"):
        tr = _trainer(tiny_model_path, tmp_path / agg, algorithm="flow_grpo",
                      **{"reward.weights": weights, "reward.aggregate": agg})
        out[agg] = tr.credit(scored, groups, groups, [0, 1], torch.Generator()).advantages[:, 0].double()
    expect_adv = group_advantages(r1, groups) + 0.5 * group_advantages(r2, groups)
    expect_rew = group_advantages(r1 + 0.5 * r2, groups)
    torch.testing.assert_close(out["advantage"], expect_adv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["reward"], expect_rew, rtol=1e-6, atol=1e-6)
    assert (out["advantage"] - out["reward"]).abs().max() > 0.1
