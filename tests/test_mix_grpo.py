"""MixGRPO (Tencent-Hunyuan/MixGRPO @ e5cdd6a): the sliding window, MixGRPO-Flash's compressed grid and its
DPM-Solver++ 2M steps, the rollout that uses them, credit, and exact resume. (The brightness learning check is in
tests/test_learning.py.)"""

import json
import math
from functools import partial

import pytest
import torch

from conftest import full_and_resumed, tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.methods.mix_grpo import MixGRPO, compressed_tail, sliding_window_start
from tpgrpo.rollout import RolloutPlan, initial_noise, make_generators, sample_rollout
from tpgrpo.sampling import dpm_solver_2m_step, sigma_schedule
from tpgrpo.trainer import Trainer


def test_sliding_window_follows_the_reference_schedule():
    """The reference's defaults (T = 25, window 4, interval 25, stride 1): iteration k (epoch k + 1) starts the window
    at ⌊k/25⌋ — iterations 0–24 → step 0, 25 → 1, 100 → 4, 275 → 11, 300 → 12 (grpo_states.py L87–99). Here it wraps
    at window_start_max (20 = T − 1 − 4) instead of truncating the window; stride 0 freezes it (Flash*)."""
    start = [sliding_window_start(k + 1, 0, 20, 25, 1) for k in (0, 24, 25, 100, 275, 300, 500, 524, 525)]
    assert start == [0, 0, 1, 4, 11, 12, 20, 20, 0]
    assert {sliding_window_start(e, 0, 20, 20, 0) for e in range(1, 500)} == {0}
    assert [sliding_window_start(e, 2, 4, 1, 2) for e in range(1, 6)] == [2, 4, 3, 2, 4]  # stride 2 over 3 positions


def test_flash_grid_matches_the_reference_arithmetic():
    """T = 25, shift 3, window [0–3], ratio 0.4: int(22 · 0.4) = 8 points, shift(linspace(1 − 4/25, 0, 8)) — the σ's
    the reference's sampling_utils.py L44–53 produces (after σ_4 = .9403 of the main grid)."""
    tail = compressed_tail(25, 3.0, 3, 0.4)
    expected = [0.9403, 0.8852, 0.8182, 0.7347, 0.6279, 0.4865, 0.2903, 0.0]
    assert tail.tolist() == pytest.approx(expected, abs=1e-4)
    assert tail[0].item() == pytest.approx(sigma_schedule(25, 3.0, spacing="linspace")[4].item(), abs=1e-6)
    assert len(compressed_tail(25, 3.0, 20, 0.2)) == 2  # int(max(5 · 0.2, 2)): at least one step to σ = 0


def _dpm_reference_form(x, v, s0, t, x0_prev, s1):
    """DPM-Solver++ 2M as the reference writes it (sampling_utils.py L515–520): x_t = (σ_t/σ_s)·x
    − α_t·(e^{−h} − 1)·(D0 + ½·D1), α = 1 − σ, λ = ln(α/σ), D0 = x̂0(s0), D1 = (x̂0(s0) − x̂0(s1)) / r0."""
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    h, h0 = lam(t) - lam(s0), lam(s0) - lam(s1)
    d0 = x - s0 * v
    d1 = (d0 - x0_prev) / (h0 / h)
    return (t / s0) * x - (1 - t) * (math.exp(-h) - 1) * (d0 + 0.5 * d1)


def test_dpm_step_equals_the_reference_form_and_is_euler_without_history():
    g = torch.Generator().manual_seed(0)
    x, v, x0_prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    ours = dpm_solver_2m_step(x, v, 0.6, 0.45, x0_prev, 0.8)
    torch.testing.assert_close(ours, _dpm_reference_form(x, v, 0.6, 0.45, x0_prev, 0.8), rtol=1e-5, atol=1e-6)
    euler = x - (0.6 - 0.45) * v
    assert torch.equal(dpm_solver_2m_step(x, v, 0.6, 0.45), euler)
    assert torch.equal(dpm_solver_2m_step(x, v, 0.6, 0.45, x0_prev, 1.0), euler)  # λ(1) = −∞: first order
    assert torch.equal(dpm_solver_2m_step(x, v, 0.3, 0.0, x0_prev, 0.6), x - 0.3 * v)  # the last step: first order


def test_dpm_solver_is_second_order_on_a_gaussian_flow():
    """Data N(0, c²): v(x, σ) = (σ − (1 − σ)c²)/m(σ)·x with m = (1 − σ)²c² + σ², and the exact flow scales x by
    sqrt(m(σ')/m(σ)). Halving the step size divides Euler's error by ≈ 2 and DPM-Solver++ 2M's by ≈ 4."""
    c2 = 0.25
    m = lambda s: (1 - s) ** 2 * c2 + s ** 2  # noqa: E731
    vel = lambda x, s: (s - (1 - s) * c2) / m(s) * x  # noqa: E731
    x_start, a, b = torch.tensor([1.0], dtype=torch.float64), 0.9, 0.1
    exact = x_start * math.sqrt(m(b) / m(a))

    def solve(n, second_order):
        sig = torch.linspace(a, b, n + 1, dtype=torch.float64).tolist()
        x, hist = x_start.clone(), (None, None)
        for s0, t in zip(sig[:-1], sig[1:]):
            v = vel(x, s0)
            x, hist = (dpm_solver_2m_step(x.double(), v, s0, t, *hist).double() if second_order else x - (s0 - t) * v,
                       (x - s0 * v, s0))
        return abs((x - exact).item())

    euler = [solve(n, False) for n in (16, 32)]
    dpm = [solve(n, True) for n in (16, 32)]
    assert 1.7 < euler[0] / euler[1] < 2.3
    assert 3.3 < dpm[0] / dpm[1] < 4.7
    assert dpm[1] < euler[1] / 10


def test_flash_rollout_runs_the_tail_with_dpm_and_keeps_the_window(tiny_model):
    """With a tail grid the main trajectory leaves the full grid after the window: T = 10, window [0, 1], a tail of 4
    σ's = 2 + 1 + 3 = 6 model calls instead of 10; the window's transitions and log-probs are those of the plain
    rollout from the same noise, and the final state is the DPM-Solver++ 2M continuation."""
    n = 2
    cond = tiny_model.encode_prompts(["a red circle", "two squares"])
    uncond = tiny_model.encode_prompts([""]).expand(n)
    sig = sigma_schedule(10, 3.0, spacing="linspace")
    tail = compressed_tail(10, 3.0, 1, 0.4)
    assert len(tail) == 3
    base = dict(sigmas=sig, kernel="sde", noise_level=0.7, window=[0, 1], guidance_scale=2.0, max_batch=64)

    def run(**kw):
        gens = make_generators([5, 6])
        return sample_rollout(tiny_model, RolloutPlan(**base, **kw), cond, uncond,
                              initial_noise(make_generators([1, 2]), tiny_model.latent_shape()), gens)

    plain, flash = run(), run(tail_sigmas=tail)
    assert plain.model_calls == 10 and flash.model_calls == 2 + len(tail) - 1
    assert torch.equal(plain.next_latents, flash.next_latents) and torch.equal(plain.log_probs, flash.log_probs)
    x2 = flash.next_latents[:, -1]
    with torch.no_grad():
        v1 = tiny_model.velocity(flash.window_latents[:, -1], sig[1], cond, uncond, 2.0)
        v2 = tiny_model.velocity(x2, tail[0], cond, uncond, 2.0)
        x3 = dpm_solver_2m_step(x2, v2, tail[0].item(), tail[1].item(), flash.window_latents[:, -1] - sig[1] * v1,
                                sig[1].item())
        v3 = tiny_model.velocity(x3, tail[1], cond, uncond, 2.0)
    torch.testing.assert_close(flash.final_latents, x3 - tail[1] * v3, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tail_sigmas"):
        run(tail_sigmas=tail[1:])


def test_credit_is_the_unbiased_group_advantage_on_every_window_step():
    """(r − mean_group)/(std_unbiased + 1e-8), train_grpo_flux.py L428–479: group [1, 2, 3] → [−1, 0, 1]."""
    cfg = load_config(None, ["algorithm=mix_grpo"])
    from tpgrpo.methods.base import ScoredRollout

    c = MixGRPO(cfg).credit(ScoredRollout(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])), torch.tensor([0, 0, 0, 1, 1, 1]),
                            None, [2, 3], None)
    torch.testing.assert_close(c.advantages, torch.tensor([[-1.0] * 2, [0.0] * 2, [1.0] * 2, [0.0] * 2, [0.0] * 2,
                                                          [0.0] * 2]), rtol=1e-6, atol=1e-6)


def test_flash_needs_the_linspace_grid():
    with pytest.raises(ValueError, match="mix.flash_ratio"):
        load_config(None, ["algorithm=mix_grpo", "mix.flash_ratio=0.4", "sampling.spacing=scheduler"])


def _trainer(model, run, resume=None, **extra):
    ov = {"algorithm": "mix_grpo", "sampling.num_steps": 6, "sampling.window_size": 2, "sampling.window_start_max": 3,
          "sampling.spacing": "linspace", "mix.shift_interval": 1, "mix.flash_ratio": 0.5,
          "reward.name": "jpeg_compressibility", **extra}
    return Trainer(load_config(None, tiny_overrides(model, run, **ov)), resume=resume, log_trackers=False)


def test_the_window_slides_over_epochs_and_resume_is_exact(tiny_model_path, tmp_path):
    full, resumed = full_and_resumed(partial(_trainer, tiny_model_path), tmp_path, epochs=3, stop=2)
    a, b = full.lora_state(), resumed.lora_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["window_start"] for r in recs if "window_start" in r] == [0, 1, 2]
