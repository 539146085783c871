"""The lockstep fork engine (docs/design.md §4): model-call counts, lockstep == one-at-a-time, R_0 == pure ODE."""

import numpy as np
import pytest
import torch

from tpgrpo.rollout import RolloutPlan, completion_path, initial_noise, make_generators, sample_ode, sample_rollout
from tpgrpo.sampling import sigma_schedule


def _setup(model, n=3, T=10, seed=0):
    cond = model.encode_prompts(["a red circle", "two squares", "a circle left of a square"][:n])
    uncond = model.encode_prompts([""]).expand(n)
    gens = make_generators([seed * 100 + i for i in range(n)])
    noise = initial_noise(gens, model.latent_shape())
    return cond, uncond, noise, gens, sigma_schedule(T, 3.0)


def _plan(sig, **kw):
    base = dict(sigmas=sig, kernel="cps", noise_level=0.7, window=range(0, 9), fork_window_states=True,
                guidance_scale=3.0, max_batch=64)
    base.update(kw)
    return RolloutPlan(**base)


def test_lockstep_uses_55_evaluations_in_10_calls(tiny_model):
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig), cond, uncond, noise, gens)
    assert ro.evaluations_per_sample == 55
    assert ro.model_calls == 10
    assert ro.fork_latents.shape == (3, 9, 3, 32, 32)
    assert ro.window_latents.shape == ro.next_latents.shape == (3, 9, 3, 32, 32)
    assert torch.equal(ro.window_latents[:, 1:], ro.next_latents[:, :-1])
    assert ro.log_probs.shape == (3, 9) and torch.isfinite(ro.log_probs).all()


def test_flow_grpo_rollout_uses_10_evaluations(tiny_model):
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig, fork_window_states=False, kernel="sde"), cond, uncond, noise, gens)
    assert ro.evaluations_per_sample == 10 and ro.fork_latents is None


def test_lockstep_equals_one_state_at_a_time(tiny_model):
    cond, uncond, noise, _, sig = _setup(tiny_model)
    a = sample_rollout(tiny_model, _plan(sig), cond, uncond, noise, make_generators([0, 1, 2]))
    b = sample_rollout(tiny_model, _plan(sig, completion="sequential"), cond, uncond, noise, make_generators([0, 1, 2]))
    assert b.evaluations_per_sample == 64  # the reference's cost: no velocity reuse, one origin after another
    torch.testing.assert_close(a.final_latents, b.final_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.fork_latents, b.fork_latents, rtol=0, atol=1e-5)
    ia = tiny_model.decode(a.fork_latents.flatten(0, 1)).astype(int)
    ib = tiny_model.decode(b.fork_latents.flatten(0, 1)).astype(int)
    assert np.abs(ia - ib).max() <= 1 and (ia == ib).mean() > 0.999


def test_R0_fork_is_the_pure_ode_sample_from_the_same_noise(tiny_model):
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig), cond, uncond, noise, gens)
    ode = sample_ode(tiny_model, sig, cond, uncond, noise, 3.0)
    torch.testing.assert_close(ro.fork_latents[:, 0], ode, rtol=0, atol=1e-5)
    # and the SDE trajectory itself differs from it (the window is stochastic)
    assert (ro.final_latents - ode).abs().max() > 1e-2


def test_fork_k_continues_the_main_state_with_the_ode(tiny_model):
    """Fork k is the ODE completion of the main state before window step k (here k = 4)."""
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig), cond, uncond, noise, gens)
    x = ro.window_latents[:, 4]
    for i in range(4, 10):
        x = x - (sig[i] - sig[i + 1]) * tiny_model.velocity(x, float(sig[i]), cond, uncond, 3.0)
    torch.testing.assert_close(ro.fork_latents[:, 4], x, rtol=0, atol=1e-5)


def test_window_states_and_logprobs_are_consistent(tiny_model):
    """log_probs[w] is the log-density of window_latents[w+1] given window_latents[w] under the kernel."""
    from tpgrpo.sampling import log_prob, transition

    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig, window=range(2, 6)), cond, uncond, noise, gens)
    for w, i in enumerate(range(2, 6)):
        x = ro.window_latents[:, w]
        v = tiny_model.velocity(x, float(sig[i]), cond, uncond, 3.0)
        mean, std = transition("cps", x, v, float(sig[i]), float(sig[i + 1]), 0.7)
        torch.testing.assert_close(log_prob(ro.next_latents[:, w], mean, std), ro.log_probs[:, w])


def test_results_do_not_depend_on_batching(tiny_model):
    cond, uncond, noise, _, sig = _setup(tiny_model)
    a = sample_rollout(tiny_model, _plan(sig), cond, uncond, noise, make_generators([0, 1, 2]))
    b = sample_rollout(tiny_model, _plan(sig, max_batch=4), cond, uncond, noise, make_generators([0, 1, 2]))
    one = sample_rollout(tiny_model, _plan(sig), cond.index(slice(1, 2)), uncond.index(slice(1, 2)), noise[1:2],
                         make_generators([1]))
    torch.testing.assert_close(a.final_latents, b.final_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.final_latents[1:2], one.final_latents, rtol=0, atol=1e-5)


def test_completion_path():
    assert completion_path(3, 10, None) == list(range(3, 11))
    assert completion_path(0, 10, 3) == [0, 3, 7, 10]
    assert completion_path(8, 10, 5) == [8, 9, 10]


def test_coarse_completion_costs_fewer_calls(tiny_model):
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    ro = sample_rollout(tiny_model, _plan(sig, completion_steps=2), cond, uncond, noise, make_generators([0, 1, 2]))
    # main 10 + per fork: a 2-step path whose first step reuses the main velocity → 1 extra evaluation each,
    # except forks from state 8 (a single remaining ODE step after it: path [8, 9, 10]) which need 1 as well.
    assert ro.evaluations_per_sample == 10 + 9
    seq = sample_rollout(tiny_model, _plan(sig, completion_steps=2, completion="sequential"), cond, uncond, noise,
                         make_generators([0, 1, 2]))
    torch.testing.assert_close(ro.fork_latents, seq.fork_latents, rtol=0, atol=1e-5)


def test_window_must_not_reach_the_final_step(tiny_model):
    cond, uncond, noise, gens, sig = _setup(tiny_model)
    with pytest.raises(ValueError, match="final step"):
        sample_rollout(tiny_model, _plan(sig, window=range(0, 10)), cond, uncond, noise, gens)
