"""Numerics that presets claim to share with the reference implementations, each transcribed in our own words from
the public code and compared on random inputs. Sources (repository @ commit, file, lines):

- FG  = yifan123/flow_grpo @ ac4c86e8cae0
- TP  = YunzeTong/TurningPoint-GRPO @ 994d26a63b65
- DG  = XueZeyue/DanceGRPO @ 15cc71d53cc2
- DIF = diffusers 0.42.1 (the version installed by `make install`)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tpgrpo.advantages import group_advantages
from tpgrpo.config import load_config
from tpgrpo.loss import grpo_step_loss
from tpgrpo.sampling import (flux_mu, kl_to_reference, log_prob, noise_scale, sigma_schedule, transition,
                             transition_std)

ROOT = Path(__file__).resolve().parents[1]
SD35_SIGMAS = sigma_schedule(10, 3.0)  # SD3.5-M: 10 training steps, static shift 3


def _states(seed: int, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(4)]


# --- 1. Flow-GRPO's KL under the sde kernel --------------------------------------------------------------------
def _flow_grpo_sde_step(x, v, sigma, sigma_next, a, sigma_1):
    """FG flow_grpo/diffusers_patch/sd3_sde_with_logprob.py L40–70: std_dev_t = a·sqrt(σ/(1 − σ)) with σ_1 (the
    scheduler's sigmas[1]) in the denominator at σ = 1; mean = x·(1 + s²/(2σ)·dt) + v·(1 + s²(1 − σ)/(2σ))·dt with
    dt = σ' − σ < 0. Returns (mean, std_dev_t)."""
    dt = sigma_next - sigma
    denominator = sigma_1 if sigma == 1 else sigma
    s = math.sqrt(sigma / (1 - denominator)) * a
    mean = x * (1 + s ** 2 / (2 * sigma) * dt) + v * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s


def _flow_grpo_kl(mean, mean_ref, std_dev_t):
    """FG scripts/train_sd3.py L895–896: mean over (C, H, W) of (μ − μ_ref)² divided by 2·std_dev_t², then the batch
    mean."""
    return (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2)).mean()


@pytest.mark.parametrize("i", range(9))
def test_flow_grpo_kl_normalisation_matches_the_reference(i):
    x, v, v_ref, _ = _states(i)
    sig, sig_next, a = float(SD35_SIGMAS[i]), float(SD35_SIGMAS[i + 1]), 0.7
    ref_mean, s = _flow_grpo_sde_step(x, v, sig, sig_next, a, float(SD35_SIGMAS[1]))
    ref_mean_ref, _ = _flow_grpo_sde_step(x, v_ref, sig, sig_next, a, float(SD35_SIGMAS[1]))
    mean, std = transition("sde", x, v, sig, sig_next, a)
    mean_ref, _ = transition("sde", x, v_ref, sig, sig_next, a)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    assert float(noise_scale("sde", sig, sig_next, a)) == pytest.approx(s, rel=1e-6)

    ours = kl_to_reference(mean, mean_ref, noise_scale("sde", sig, sig_next, a)).mean()
    assert float(ours) == pytest.approx(float(_flow_grpo_kl(ref_mean, ref_mean_ref, s)), rel=1e-4)
    # the true per-step Gaussian KL (training.kl_variance: transition) is 1/Δ_i times larger: 3.7–25× on SD3.5
    true_kl = kl_to_reference(mean, mean_ref, std).mean()
    assert float(true_kl) == pytest.approx(float(ours) / (sig - sig_next), rel=1e-4)


def test_kl_variance_setting_reaches_the_trainer(tiny_model_path, tmp_path):
    """The trainer's KL term under ``noise_scale`` is Δ_i times its KL under ``transition`` (sde kernel)."""
    from conftest import tiny_overrides
    from tpgrpo.trainer import Trainer

    kls = {}
    for kind in ("transition", "noise_scale"):
        cfg = load_config(None, tiny_overrides(tiny_model_path, tmp_path / kind, **{
            "sampling.kernel": "sde", "training.beta": 0.04, "training.kl_variance": kind,
            "reward.name": "jpeg_compressibility"}))
        tr = Trainer(cfg, log_trackers=False)
        batch, _ = tr.collect(1)
        with torch.no_grad():  # move the policy away from the reference (the adapters off)
            for p in tr.trainable:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        idx = torch.arange(len(batch.prompts))
        _, kl, _, _ = tr._step_terms(batch, idx, 0, tr.embed(batch.prompts), tr.uncond.expand(len(idx)))
        kls[kind] = kl.detach()
        i = batch.window[0]
        delta = float(tr.sigmas[i] - tr.sigmas[i + 1])
    assert float(kls["transition"].abs().sum()) > 0
    torch.testing.assert_close(kls["noise_scale"], kls["transition"] * delta, rtol=1e-4, atol=0)


def test_flow_grpo_presets_use_the_reference_kl():
    assert load_config(ROOT / "configs/sd35m_flow_grpo.yaml").training.kl_variance == "noise_scale"
    assert load_config(ROOT / "configs/sd35m_tempflow_grpo.yaml").training.kl_variance == "transition"


# --- 2. TP-GRPO's cps log-probability --------------------------------------------------------------------------
def _tp_grpo_cps_step(x, v, x_next, sigma, sigma_next, eta):
    """TP sd3_sde_with_logprob.py L69–88 (sde_type 'cps'): std = σ'·sin(η·π/2); x̂0 = x − σ·v; x̂1 = x + (1 − σ)·v;
    mean = x̂0·(1 − σ') + x̂1·sqrt(σ'² − std²); log_prob = mean over elements of −(x' − mean)² ("remove all
    constants")."""
    std = sigma_next * math.sin(eta * math.pi / 2)
    x0 = x - sigma * v
    x1 = x + v * (1 - sigma)
    mean = x0 * (1 - sigma_next) + x1 * math.sqrt(sigma_next ** 2 - std ** 2)
    return -((x_next - mean) ** 2).mean(dim=(1, 2, 3)), mean, std


@pytest.mark.parametrize("i", range(9))
def test_tp_grpo_cps_logprob_matches_the_reference(i):
    x, v, _, eps = _states(100 + i)
    sig, sig_next, eta = float(SD35_SIGMAS[i]), float(SD35_SIGMAS[i + 1]), 0.7
    mean, std = transition("cps", x, v, sig, sig_next, eta)
    x_next = mean + std * eps
    ref_logp, ref_mean, ref_std = _tp_grpo_cps_step(x, v, x_next, sig, sig_next, eta)
    assert float(transition_std("cps", sig, sig_next, eta)) == pytest.approx(ref_std, rel=1e-6)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_prob(x_next, mean, std, "mse"), ref_logp, rtol=1e-4, atol=1e-7)
    # the Gaussian variant is a different function of the same residual: its log-ratio is 1/(2·std²) times larger
    g = log_prob(x_next, mean, std, "gaussian")
    assert not torch.allclose(g, ref_logp, rtol=1e-2)


@pytest.mark.parametrize("preset", ["sd35m_tpgrpo", "flux_dev_tpgrpo"])
def test_tp_grpo_reference_presets_use_the_mse_logprob(preset):
    s = load_config(ROOT / f"configs/{preset}.yaml").sampling
    assert (s.kernel, s.logprob) == ("cps", "mse")


# --- 3. FLUX's schedule ----------------------------------------------------------------------------------------
def _flux_pipeline_sigmas(T: int, mu: float) -> torch.Tensor:
    """DIF pipelines/flux/pipeline_flux.py L823–840 (the same in TP flux_pipeline_with_logprob.py L110–126):
    sigmas = linspace(1, 1/T, T); the scheduler's set_timesteps(sigmas=…, mu=…) (DIF
    schedulers/scheduling_flow_match_euler_discrete.py) casts them to float32, applies the exponential time shift
    e^μ / (e^μ + (1/σ − 1)) and appends 0."""
    s = np.linspace(1.0, 1 / T, T).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([torch.from_numpy(shifted).float(), torch.zeros(1)])


@pytest.mark.parametrize("T,seq_len", [(6, 1024), (28, 1024), (16, 2025), (1, 4096)])
def test_flux_pipeline_schedule_matches_the_reference(T, seq_len):
    mu = flux_mu(seq_len)
    ours = sigma_schedule(T, mu=mu, spacing="flux_pipeline")
    assert torch.equal(ours, _flux_pipeline_sigmas(T, mu))  # the same fp32 operations in the same order
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    torch.testing.assert_close(sched.sigmas, ours, rtol=0, atol=1e-7)


def test_flux_pipeline_schedule_keeps_the_last_stochastic_step_stochastic():
    """T = 6 at 512²: the pipeline's σ before the final step is 0.273; the scheduler's default spacing gives 0.002,
    a nearly deterministic step."""
    pipe = sigma_schedule(6, mu=flux_mu(1024), spacing="flux_pipeline")
    assert pipe.tolist() == pytest.approx([1.0, 0.904, 0.790, 0.653, 0.484, 0.273, 0.0], abs=1e-3)
    assert float(sigma_schedule(6, mu=flux_mu(1024))[5]) < 0.01


# --- 4. DanceGRPO -----------------------------------------------------------------------------------------------
def _dance_advantages(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """DG fastvideo/train_grpo_flux.py L534–545 (use_group): per group of G, (r − r.mean()) / (r.std() + 1e-8), with
    torch's default (unbiased) std."""
    out = torch.zeros_like(rewards)
    for lo in range(0, len(rewards), G):
        r = rewards[lo:lo + G]
        out[lo:lo + G] = (r - r.mean()) / (r.std() + 1e-8)
    return out


def test_dance_grpo_advantages_match_the_reference():
    from tpgrpo.methods import ScoredRollout, build_method

    cfg = load_config(None, ["algorithm=dance_grpo", "training.group_size=12", "training.sample_batch_size=12",
                             "training.train_batch_size=12"])
    rewards = torch.rand(96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gid = torch.arange(96) // 12
    credit = build_method("dance_grpo", cfg).credit(ScoredRollout(rewards), gid, gid, list(range(5)),
                                                    torch.Generator().manual_seed(0))
    ref = _dance_advantages(rewards, 12)
    torch.testing.assert_close(credit.advantages[:, 0].double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(credit.advantages[:, 0], credit.advantages[:, 4])
    # rewards [0, 1]: ±1/√2 with the unbiased std (the population std would give ±0.9998)
    two = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), eps=1e-8, unbiased=True)
    assert two.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def _dance_multi_reward_loss(new_logp, old_logp, advantages, coefs, clip_range, adv_clip_max=5.0):
    """DG fastvideo/train_grpo_hunyuan.py L441–477: one ratio, and for each reward k its own PPO term
    mean(max(−A_k·ρ, −A_k·clip(ρ, 1 ± ε))) with A_k clamped to ±adv_clip_max; the loss is Σ_k coef_k·term_k."""
    ratio = torch.exp(new_logp - old_logp)
    total = 0.0
    for k, c in enumerate(coefs):
        a = advantages[:, k].clamp(-adv_clip_max, adv_clip_max)
        term = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)))
        total = total + c * term
    return total


def test_dance_grpo_per_reward_clipped_terms_match_the_reference():
    g = torch.Generator().manual_seed(5)
    logp, old = torch.randn(64, generator=g), torch.randn(64, generator=g)
    old = logp + 1e-4 * torch.randn(64, generator=g)  # ratios on both sides of a 1e-4 clip range
    adv = 2 * torch.randn(64, 2, generator=g)
    coefs = [1.0, 0.5]
    loss, info = grpo_step_loss(logp, old, adv, 1e-4, term_weights=torch.tensor(coefs))
    ref = _dance_multi_reward_loss(logp, old, adv, coefs, 1e-4)
    assert float(loss) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)  # a mean of ± terms: summation order
    assert 0 < float(info["clipfrac"]) < 1 and info["ratio"].shape == (64,)
    # summing the advantages first (reward.aggregate: advantage) is another loss once ratios are clipped
    summed, _ = grpo_step_loss(logp, old, adv @ torch.tensor(coefs), 1e-4)
    assert float(summed) != pytest.approx(float(ref), rel=1e-3)


def test_per_reward_clipped_terms_train_in_the_trainer(tiny_model_path, tmp_path):
    from conftest import tiny_overrides
    from tpgrpo.trainer import Trainer

    cfg = load_config(None, tiny_overrides(tiny_model_path, tmp_path, **{
        "algorithm": "dance_grpo", "reward.weights": "{jpeg_compressibility: 1.0, brightness: 0.5}",
        "reward.aggregate": "loss", "training.train_batch_size": 8}))
    tr = Trainer(cfg, log_trackers=False)
    batch, _ = tr.collect(1)
    assert batch.advantages.shape == (8, 2, 2)  # rows × window steps × rewards
    assert tr.loss_term_weights.tolist() == [1.0, 0.5]
    before = tr.lora_state()
    info = tr.optimise(batch, 1)
    assert math.isfinite(info["loss"]) and info["skipped_updates"] == 0
    assert any(not torch.equal(before[k], v) for k, v in tr.lora_state().items())


def _dance_flux_sigmas(T: int, shift: float) -> torch.Tensor:
    """DG fastvideo/train_grpo_flux.py L127–128 and L311–313: sd3_time_shift(shift, torch.linspace(1, 0, T + 1)) with
    sd3_time_shift(s, t) = s·t / (1 + (s − 1)·t)."""
    t = torch.linspace(1, 0, T + 1)
    return (shift * t) / (1 + (shift - 1) * t)


def test_dance_grpo_flux_schedule_matches_the_reference():
    assert torch.equal(sigma_schedule(16, 3.0, spacing="linspace"), _dance_flux_sigmas(16, 3.0))
    # …which is neither the FLUX pipeline's schedule at 720² nor the former preset's (exp(μ) = 2.2243 as a static
    # shift on the scheduler's default spacing: up to 0.16 apart in σ)
    dance = sigma_schedule(16, 3.0, spacing="linspace")
    assert float((dance - sigma_schedule(16, mu=flux_mu(2025), spacing="flux_pipeline")).abs().max()) > 0.05
    assert float((dance - sigma_schedule(16, 2.2243)).abs().max()) > 0.15
    cfg = load_config(ROOT / "configs/flux_dev_dance_grpo.yaml")
    assert (cfg.sampling.spacing, cfg.sampling.shift, cfg.sampling.num_steps) == ("linspace", 3.0, 16)
    assert (cfg.reward.aggregate, cfg.dance.unbiased_std, cfg.dance.std_eps) == ("loss", True, 1e-8)
