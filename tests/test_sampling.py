"""Tests for tpgrpo.sampling: schedules, step kernels, log-probabilities, KL (docs/design.md §2).

Expected values are computed by hand from the docs/design.md §2 formulas (or by diffusers / torch.distributions), never by
calling the function under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tpgrpo.sampling import (
    KINDS,
    flux_mu,
    is_stochastic,
    kl_to_reference,
    log_prob,
    sigma_schedule,
    step,
    timestep_from_sigma,
    transition,
    transition_std,
)

# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps, shift", [(10, 3.0), (40, 3.0), (1, 3.0), (1, 1.0), (7, 1.0), (16, 2.5)])
def test_static_shift_schedule_equals_diffusers(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = sigma_schedule(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0


@pytest.mark.parametrize("num_steps, image_seq_len", [(28, 1024), (6, 1024), (1, 4096), (50, 256)])
def test_dynamic_shift_schedule_equals_diffusers(num_steps, image_seq_len):
    mu = flux_mu(image_seq_len)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(num_steps, mu=mu)
    assert torch.equal(sigma_schedule(num_steps, mu=mu), scheduler.sigmas)


def test_schedule_shapes_and_one_step():
    assert sigma_schedule(1, 3.0).tolist() == [1.0, 0.0]
    sigmas = sigma_schedule(40, 3.0)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # Static shift pushes the schedule towards noise: the shifted sigmas lie above the unshifted ones.
    assert bool((sigmas[1:-1] > sigma_schedule(40, 1.0)[1:-1]).all())


def test_flux_mu_is_the_linear_interpolation():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    # Halfway in sequence length, halfway in shift.
    assert flux_mu((256 + 4096) / 2) == pytest.approx((0.5 + 1.15) / 2)
    # 512x512 FLUX: 1024 tokens → 0.5 + 0.65 * 768 / 3840 = 0.63.
    assert flux_mu(1024) == pytest.approx(0.63)


@pytest.mark.parametrize("num_steps, shift", [(0, 3.0), (-1, 1.0), (10, 0.0), (10, -3.0), (2.5, 1.0)])
def test_schedule_rejects_bad_arguments(num_steps, shift):
    with pytest.raises(ValueError):
        sigma_schedule(num_steps, shift)


def test_timestep_from_sigma():
    assert timestep_from_sigma(0.25) == 250.0
    t = timestep_from_sigma(torch.tensor([1.0, 0.5], dtype=torch.bfloat16))
    assert t.dtype == torch.float32 and t.tolist() == [1000.0, 500.0]


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed kernels
# ----------------------------------------------------------------------------------------------------------------

X = torch.tensor([[1.0, -2.0]])
V = torch.tensor([[0.5, 1.0]])


def _check(kind, sigma, sigma_next, noise_level, mean_expected, std_expected):
    mean, std = transition(kind, X, V, sigma, sigma_next, noise_level)
    torch.testing.assert_close(mean, torch.tensor([mean_expected]), atol=1e-6, rtol=0)
    assert std.shape == (1, 1)
    assert std.item() == pytest.approx(std_expected, abs=1e-6)
    assert transition_std(kind, sigma, sigma_next, noise_level).item() == pytest.approx(std_expected, abs=1e-6)


def test_ode_hand_case():
    # σ = 0.5 → 0.25, Δ = 0.25: x − Δ·v = [1 − 0.125, −2 − 0.25].
    _check("ode", 0.5, 0.25, 0.7, [0.875, -2.25], 0.0)


def test_sde_hand_case():
    # a = 0.5, σ = 0.5 → 0.25 (Δ = 0.25): s = 0.5·sqrt(0.5/0.5) = 0.5, s²/(2σ) = 0.25.
    # x + (1−σ)v = [1.25, −1.5]; bracket = v + 0.25·[1.25, −1.5] = [0.8125, 0.625];
    # mean = x − 0.25·bracket = [0.796875, −2.15625]; std = 0.5·sqrt(0.25) = 0.25.
    _check("sde", 0.5, 0.25, 0.5, [0.796875, -2.15625], 0.25)


def test_sde_at_sigma_one_uses_the_next_sigma_in_the_denominator():
    # a = 0.5, σ = 1 → σ_1 = 0.75 (Δ = 0.25): s = 0.5·sqrt(1/(1 − 0.75)) = 1 (not 1/0), s²/(2σ) = 0.5.
    # x + (1−σ)v = x = [1, −2]; bracket = v + 0.5·x = [1, 0]; mean = x − 0.25·[1, 0] = [0.75, −2];
    # std = 1·sqrt(0.25) = 0.5.
    _check("sde", 1.0, 0.75, 0.5, [0.75, -2.0], 0.5)


def test_dance_hand_case():
    # η = 0.5, σ = 0.8 → 0.6 (Δ = 0.2): constant s = 0.5, s²/(2σ) = 0.25/1.6 = 0.15625.
    # x + 0.2·v = [1.1, −1.8]; bracket = v + 0.15625·[1.1, −1.8] = [0.671875, 0.71875];
    # mean = x − 0.2·bracket = [0.865625, −2.14375]; std = 0.5·sqrt(0.2).
    _check("dance", 0.8, 0.6, 0.5, [0.865625, -2.14375], 0.5 * math.sqrt(0.2))
    # The sde kernel at the same σ uses s = a·sqrt(0.8/0.2) = 2a instead: with a = 0.25 it coincides.
    _check("sde", 0.8, 0.6, 0.25, [0.865625, -2.14375], 0.5 * math.sqrt(0.2))


def test_cps_hand_case():
    # η = 1/3 → cos(π/6) = √3/2, sin(π/6) = 1/2; σ = 0.5 → σ' = 0.25.
    # x̂0 = x − 0.5v = [0.75, −2.5]; x̂1 = x + 0.5v = [1.25, −1.5];
    # mean = 0.75·x̂0 + 0.25·(√3/2)·x̂1; std = 0.25·1/2 = 0.125.
    c = math.sqrt(3) / 2
    mean_expected = [0.75 * 0.75 + 0.25 * c * 1.25, 0.75 * -2.5 + 0.25 * c * -1.5]
    _check("cps", 0.5, 0.25, 1 / 3, mean_expected, 0.125)
    # Final step σ' = 0: the mean is x̂0 and the std is exactly 0.
    _check("cps", 0.5, 0.0, 0.7, [0.75, -2.5], 0.0)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (1.0, 0.0), (0.5, 0.3), (0.2, 0.0), (0.01, 0.005)])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_level_zero_is_the_euler_step(kind, sigma, sigma_next):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    v = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    euler = x - (sigma - sigma_next) * v  # fp32, like the module
    mean, std = transition(kind, x, v, sigma, sigma_next, 0.0)
    torch.testing.assert_close(mean, euler, atol=1e-6, rtol=0)
    assert bool((std == 0).all())
    x_next, _, _ = step(kind, x, v, sigma, sigma_next, 0.0)
    torch.testing.assert_close(x_next, euler, atol=1e-6, rtol=0)
    # The ode kernel ignores the noise level.
    torch.testing.assert_close(transition("ode", x, v, sigma, sigma_next, 0.9)[0], euler, atol=1e-6, rtol=0)


def test_cps_preserves_the_noise_coefficient():
    # With x = (1−σ)x0 + σε and the exact velocity v = ε − x0: x̂0 = x0, x̂1 = ε, so
    # mean = (1−σ')x0 + σ'cos(ηπ/2)ε, and the total noise coefficient sqrt((σ'cos)² + std²) = σ'.
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    eta = 0.7
    for sigma, sigma_next in [(1.0, 0.9), (0.6, 0.45), (0.3, 0.1)]:
        x = (1 - sigma) * x0 + sigma * eps
        mean, std = transition("cps", x, eps - x0, sigma, sigma_next, eta)
        cos = math.cos(eta * math.pi / 2)
        torch.testing.assert_close(mean, (1 - sigma_next) * x0 + sigma_next * cos * eps, atol=1e-6, rtol=0)
        assert std.shape == (2, 1)
        for row_std in std.flatten().tolist():
            assert math.hypot(sigma_next * cos, row_std) == pytest.approx(sigma_next, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Per-sample sigmas, step, dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, noise_level", [("ode", 0.0), ("sde", 0.7), ("cps", 0.7), ("dance", 0.3)])
def test_per_sample_sigmas_match_scalar_sigmas_row_by_row(kind, noise_level):
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    sigma = torch.tensor([1.0, 0.5, 0.8])
    sigma_next = torch.tensor([0.75, 0.25, 0.6])
    mean, std = transition(kind, x, v, sigma, sigma_next, noise_level)
    assert mean.shape == x.shape and std.shape == (3, 1, 1)
    torch.testing.assert_close(transition_std(kind, sigma, sigma_next, noise_level), std.reshape(3))
    x_next = x + 0.1 * torch.randn(3, 2, 4, generator=g)
    std_for_logp = std.clamp_min(1e-3)  # ode has std 0; only the broadcasting is under test here
    logp = log_prob(x_next, mean, std_for_logp)
    for i in range(3):
        mean_i, std_i = transition(kind, x[i : i + 1], v[i : i + 1], sigma[i].item(), sigma_next[i].item(), noise_level)
        torch.testing.assert_close(mean[i : i + 1], mean_i, atol=1e-6, rtol=0)
        torch.testing.assert_close(std[i : i + 1], std_i)
        logp_i = log_prob(x_next[i : i + 1], mean_i, std_i.clamp_min(1e-3))
        torch.testing.assert_close(logp[i : i + 1], logp_i)


def test_step_adds_std_times_noise_and_uses_the_generator():
    x, v = X.repeat(2, 1), V.repeat(2, 1)
    noise = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    x_next, mean, std = step("sde", x, v, 0.5, 0.25, 0.5, noise=noise)
    # Hand case above: mean [0.796875, −2.15625], std 0.25.
    expected = torch.tensor([[0.796875 + 0.25, -2.15625 - 0.25], [0.796875 + 0.125, -2.15625 + 0.5]])
    torch.testing.assert_close(x_next, expected, atol=1e-6, rtol=0)

    a, _, _ = step("cps", x, v, 0.5, 0.25, 0.7, generator=torch.Generator().manual_seed(7))
    b, _, _ = step("cps", x, v, 0.5, 0.25, 0.7, generator=torch.Generator().manual_seed(7))
    c, _, _ = step("cps", x, v, 0.5, 0.25, 0.7, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    mean, std = transition("cps", x, v, 0.5, 0.25, 0.7)
    torch.testing.assert_close(a, mean + std * drawn)

    # Deterministic steps do not draw noise.
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    step("ode", x, v, 0.5, 0.25, 0.7, generator=g)
    step("sde", x, v, 0.5, 0.25, 0.0, generator=g)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs_give_fp32_outputs(kind, dtype):
    x, v = X.to(dtype), V.to(dtype)
    x_next, mean, std = step(kind, x, v, torch.tensor(0.5, dtype=dtype), 0.25, 0.5)
    assert x_next.dtype == mean.dtype == std.dtype == torch.float32
    assert transition_std(kind, torch.tensor([0.5], dtype=dtype), 0.25, 0.5).dtype == torch.float32
    assert log_prob(x_next.to(dtype), mean.to(dtype), 0.3, kind="mse").dtype == torch.float32
    assert log_prob(x_next.to(dtype), mean.to(dtype), torch.tensor(0.3, dtype=dtype)).dtype == torch.float32
    assert kl_to_reference(mean.to(dtype), x.to(dtype), 0.3).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities and KL
# ----------------------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_normal_averaged_over_elements():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(4, 3, 5, 5, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0]).reshape(4, 1, 1, 1)
    x_next = mean + std * torch.randn(4, 3, 5, 5, generator=g)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
    logp = log_prob(x_next, mean, std)
    assert logp.shape == (4,)
    torch.testing.assert_close(logp, expected)
    # A per-sample [B] std (as from transition_std) is per row, not aligned with the last dim.
    torch.testing.assert_close(log_prob(x_next, mean, std.reshape(4)), expected)
    # A scalar std broadcasts too.
    expected_scalar = torch.distributions.Normal(mean, 0.5).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob(x_next, mean, 0.5), expected_scalar)


def test_log_prob_hand_values():
    x_next = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    mean = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    # mse: −mean((x'−μ)²) = −(1 + 4)/2, −(0 + 4)/2.
    torch.testing.assert_close(log_prob(x_next, mean, 1.0, kind="mse"), torch.tensor([-2.5, -2.0]))
    # gaussian, std 2: −(d²/8) − log 2 − ½log 2π averaged: row 0 d² = 1, 4; row 1 d² = 0, 4.
    c = -math.log(2.0) - 0.5 * math.log(2 * math.pi)
    expected = torch.tensor([c - (1 + 4) / 8 / 2, c - (0 + 4) / 8 / 2])
    torch.testing.assert_close(log_prob(x_next, mean, 2.0), expected)


def test_log_prob_and_kl_carry_gradients_to_the_velocity():
    v = V.clone().requires_grad_(True)
    x_next = torch.tensor([[0.9, -2.0]])
    mean, std = transition("sde", X, v, 0.5, 0.25, 0.5)
    (log_prob(x_next, mean, std).sum() + kl_to_reference(mean, mean.detach() + 0.1, std).sum()).backward()
    assert v.grad is not None and bool(torch.isfinite(v.grad).all()) and bool((v.grad != 0).all())


def test_kl_to_reference():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean_ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    std = torch.tensor([0.5, 1.0]).reshape(2, 1)
    # Row 0: (1 + 4)/(2·0.25) averaged over 2 = 5; row 1: (0 + 9)/(2·1) averaged = 2.25.
    torch.testing.assert_close(kl_to_reference(mean, mean_ref, std), torch.tensor([5.0, 2.25]))
    torch.testing.assert_close(kl_to_reference(mean, mean_ref, std.reshape(2)), torch.tensor([5.0, 2.25]))
    torch.testing.assert_close(kl_to_reference(mean, mean, std), torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind"):
        transition("euler", X, V, 0.5, 0.25, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        transition("sde", X, V, 0.5, 0.25, -0.1)
    with pytest.raises(ValueError, match="sigma_next"):
        transition("sde", X, V, 0.5, 0.5, 0.7)
    with pytest.raises(ValueError, match="sigma_next"):
        transition("ode", X.repeat(2, 1), V.repeat(2, 1), torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.4]), 0.0)
    with pytest.raises(ValueError, match="sigma_next"):
        transition_std("cps", 0.2, 0.3, 0.7)
    with pytest.raises(ValueError):
        transition("cps", X, V, 0.5, 0.25, 1.5)  # η beyond 1 would flip the sign of cos(ηπ/2)
    with pytest.raises(ValueError):
        transition("sde", X, V, 1.2, 0.25, 0.7)  # σ > 1
    with pytest.raises(ValueError):
        transition("sde", X, V, torch.tensor([0.5, 0.4, 0.3]), 0.25, 0.7)  # 3 sigmas for a batch of 1
    with pytest.raises(ValueError, match="kind"):
        step("flow", X, V, 0.5, 0.25, 0.7)
    mean, std = transition("cps", X, V, 0.5, 0.0, 0.7)  # final step: std 0
    with pytest.raises(ValueError, match="deterministic"):
        log_prob(X, mean, std)
    with pytest.raises(ValueError, match="deterministic"):
        log_prob(X, mean, torch.tensor([[0.0]]))
    with pytest.raises(ValueError):
        log_prob(X, mean, 1.0, kind="laplace")
    with pytest.raises(ValueError):
        kl_to_reference(mean, X, 0.0)


def test_is_stochastic():
    assert is_stochastic("sde", 0.5, 0.7)
    assert is_stochastic("cps", torch.tensor(0.1), 0.7)
    assert is_stochastic("dance", torch.tensor([0.3, 0.2]), 0.3)
    assert not is_stochastic("ode", 0.5, 0.7)
    assert not is_stochastic("sde", 0.5, 0.0)
    assert not is_stochastic("cps", 0.0, 0.7)  # std σ'·sin(ηπ/2) = 0
    assert not is_stochastic("sde", 0.0, 0.7)  # the final step is never stochastic nor trained (docs/design.md §2)
    assert not is_stochastic("dance", torch.tensor([0.3, 0.0]), 0.3)
    with pytest.raises(ValueError):
        is_stochastic("euler", 0.5, 0.7)


def test_transition_std_agrees_with_noise_aware_weights():
    from tpgrpo.credit.noise_weights import noise_aware_weights

    sigmas = sigma_schedule(10, 3.0)
    steps = list(range(9))
    for kind, noise_level in [("sde", 0.7), ("cps", 0.7), ("dance", 0.3)]:
        std = transition_std(kind, sigmas[:9], sigmas[1:10], noise_level)
        assert bool((std > 0).all())
        torch.testing.assert_close(std / std.mean(), noise_aware_weights(sigmas, steps, kind, noise_level))


# ----------------------------------------------------------------------------------------------------------------
# Marginals on a 1-D Gaussian data distribution
# ----------------------------------------------------------------------------------------------------------------
#
# Data x0 ~ N(m, s²), noise ε ~ N(0, 1) independent, x_σ = (1−σ)x0 + σε, v = ε − x0.
# (x_σ, v) is jointly Gaussian:
#   E[x_σ] = (1−σ)m,  Var[x_σ] = (1−σ)²s² + σ² =: M(σ),
#   E[v] = −m,        Cov[v, x_σ] = Cov[ε − x0, (1−σ)x0 + σε] = σ − (1−σ)s²,
# so Gaussian conditioning gives the exact (marginal) velocity field
#   v*(x, σ) = E[ε − x0 | x_σ = x] = −m + (σ − (1−σ)s²)/M(σ) · (x − (1−σ)m).
# Under v* every kernel is affine-Gaussian in x: x' = A·x + b + std·z. Two consequences used below:
#   * the marginal mean is preserved exactly by every kind: E[x] + (1−σ)E[v*] = (1−σ)m − (1−σ)m = 0 kills the
#     sde/dance correction, the Euler part gives (1−σ)m + Δm = (1−σ')m, and cps gives (1−σ')m + σ'cos·0;
#   * the exact discrete-time moments follow μ' = A·μ + b, Var' = A²·Var + std² (A, b read off the kernel at two
#     points), which separates discretisation error (deterministic) from Monte Carlo error.

DATA_MEAN, DATA_STD = 0.7, 0.5
NUM_PATHS, NUM_STEPS = 200_000, 100


@pytest.fixture
def one_thread():
    """Thousands of small (200k-element) ops gain nothing from intra-op threads, and on a busy CPU the thread
    hand-offs make them tens of times slower; run them on one thread and restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _marginal_var(sigma):
    return (1 - sigma) ** 2 * DATA_STD**2 + sigma**2


def _exact_velocity(x, sigma):
    slope = (sigma - (1 - sigma) * DATA_STD**2) / _marginal_var(sigma)
    return -DATA_MEAN + slope * (x - (1 - sigma) * DATA_MEAN)


def _discrete_moments(kind, noise_level, sigmas):
    """Exact mean/variance after each step of the affine-Gaussian chain under v* (starting from N(0, 1))."""
    mu, var, out = 0.0, 1.0, []
    two_points = torch.tensor([[0.0, 1.0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        mean, std = transition(kind, two_points, _exact_velocity(two_points, sigma), sigma, sigma_next, noise_level)
        slope, offset = (mean[0, 1] - mean[0, 0]).item(), mean[0, 0].item()
        mu, var = slope * mu + offset, slope**2 * var + std.item() ** 2
        out.append((mu, var))
    return out


def _relative_variance_errors(kind, noise_level, num_steps):
    sigmas = sigma_schedule(num_steps).tolist()
    moments = _discrete_moments(kind, noise_level, sigmas)
    for (mu, _), s in zip(moments, sigmas[1:]):
        assert mu == pytest.approx((1 - s) * DATA_MEAN, abs=1e-5)  # the mean is preserved exactly
    return [var / _marginal_var(s) - 1 for (_, var), s in zip(moments, sigmas[1:])], sigmas[1:]


def test_discretisation_error_of_the_kernels():
    # Euler (ode) and dance at a small η: first-order error, ≤ 3.5% of the variance at 100 steps, halving at 200.
    for kind, noise_level in [("ode", 0.0), ("dance", 0.3)]:
        err_100, _ = _relative_variance_errors(kind, noise_level, 100)
        err_200, _ = _relative_variance_errors(kind, noise_level, 200)
        worst_100, worst_200 = max(map(abs, err_100)), max(map(abs, err_200))
        assert worst_100 < 0.035
        assert 0.4 < worst_200 / worst_100 < 0.6
    # sde, a = 0.7: at σ = 1 the σ_1 substitution gives s² = a²/Δ, so the first step is
    # x' = (1 − Δ − a²/2)·x + Δm + a·z: a variance overshoot ≈ a⁴/4 that does not shrink with the step count.
    # Later steps contract it away: ≤ 11% everywhere, ≤ 3.5% once σ ≤ 0.5, ≤ 1% once σ ≤ 0.1.
    a = 0.7
    err, sigmas_next = _relative_variance_errors("sde", a, 100)
    delta = 1 - sigmas_next[0]  # diffusers spacing: (1 − 0.001)/99, not 1/100
    first_var = (1 - delta - a**2 / 2) ** 2 + a**2
    assert err[0] == pytest.approx(first_var / _marginal_var(1 - delta) - 1, abs=1e-6)
    assert max(map(abs, err)) < 0.11
    assert max(abs(e) for e, s in zip(err, sigmas_next) if s <= 0.5) < 0.035
    assert max(abs(e) for e, s in zip(err, sigmas_next) if s <= 0.1) < 0.01


def _run_paths(kind, noise_level, sigmas, velocity, x, generator):
    stats = []
    for i in range(len(sigmas) - 1):
        x, _, _ = step(kind, x, velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise_level, generator=generator)
        x64 = x.double()
        stats.append((x64.mean().item(), x64.var().item()))
    return stats


@pytest.mark.parametrize("kind, noise_level", [("ode", 0.0), ("sde", 0.7), ("dance", 0.3), ("cps", 0.7)])
def test_paths_follow_the_marginals(kind, noise_level, one_thread):
    """200k paths from N(0, 1) at σ = 1, 100 steps (shift 1), exact velocity v*; checked at every σ.

    Mean: equal to the marginal mean (1−σ)m within 5 Monte Carlo standard errors (every kind preserves it).
    Variance: equal to the exact discrete-time variance within 5 MC standard errors (sampling is right), whose
    distance to the marginal variance is the discretisation error bounded above (ode/sde/dance). cps with the
    *marginal* velocity v* does not preserve the variance — x̂0 = E[x0|x] and x̂1 = E[ε|x] are under-dispersed and
    the fresh noise σ'·sin(ηπ/2) does not make up for it (about −30% at the end) — so only its mean and its
    discrete-time variance are checked here; with the per-path velocity ε − x0 it is exact (next test).
    """
    sigmas = sigma_schedule(NUM_STEPS).tolist()
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(1, NUM_PATHS, generator=generator)
    stats = _run_paths(kind, noise_level, sigmas, _exact_velocity, x, generator)
    moments = _discrete_moments(kind, noise_level, sigmas)
    for (sample_mean, sample_var), (_, exact_var), s in zip(stats, moments, sigmas[1:]):
        target_var = _marginal_var(s)
        assert abs(sample_mean - (1 - s) * DATA_MEAN) < 5 * math.sqrt(target_var / NUM_PATHS)
        assert abs(sample_var - exact_var) < 5 * exact_var * math.sqrt(2 / NUM_PATHS)
        if kind != "cps":
            bound = {"ode": 0.035, "dance": 0.035, "sde": 0.11}[kind]
            assert abs(sample_var / target_var - 1) < bound + 5 * math.sqrt(2 / NUM_PATHS)
    if kind == "sde":  # the sde chain ends on the data distribution
        assert abs(stats[-1][1] / DATA_STD**2 - 1) < 0.01 + 5 * math.sqrt(2 / NUM_PATHS)


def test_cps_with_the_per_path_velocity_is_exact(one_thread):
    """With v = ε − x0 (the model knows each path's x0), cps maps x_σ = (1−σ)x0 + σε to (1−σ')x0 + σ'ε' with
    ε' = cos(ηπ/2)·ε + sin(ηπ/2)·z ~ N(0, 1) independent of x0: the marginals are exact at every σ (MC only)."""
    sigmas = sigma_schedule(NUM_STEPS).tolist()
    generator = torch.Generator().manual_seed(99)
    x0 = DATA_MEAN + DATA_STD * torch.randn(1, NUM_PATHS, generator=generator)
    x = torch.randn(1, NUM_PATHS, generator=generator)  # σ = 1: x = ε

    def per_path_velocity(x, sigma):
        eps = (x - (1 - sigma) * x0) / sigma
        return eps - x0

    stats = _run_paths("cps", 0.7, sigmas, per_path_velocity, x, generator)
    for (sample_mean, sample_var), s in zip(stats, sigmas[1:]):
        target_var = _marginal_var(s)
        assert abs(sample_mean - (1 - s) * DATA_MEAN) < 5 * math.sqrt(target_var / NUM_PATHS)
        assert abs(sample_var / target_var - 1) < 5 * math.sqrt(2 / NUM_PATHS)
