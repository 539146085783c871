"""Flow-matching sampling math: sigma schedules, step kernels, log-probabilities, KL (docs/design.md §2).

Conventions (docs/design.md §2): ``x_σ = (1 − σ)·x_0 + σ·ε``, the model predicts ``v = ε − x_0``; sampling runs
σ_0 = 1 > σ_1 > … > σ_T = 0 and step i goes from ``sigma = σ_i`` to ``sigma_next = σ_{i+1}`` with
``Δ = sigma − sigma_next > 0``. Every transition is Gaussian, ``x' ~ N(mean, std²·I)``:

- ``ode``   (Euler):       ``mean = x − Δ·v``, ``std = 0``;
- ``sde``   (Flow-GRPO):   ``s = a·sqrt(σ/(1 − σ))`` (σ_1 in the denominator when σ = 1),
  ``mean = x − Δ·[v + s²/(2σ)·(x + (1 − σ)·v)]``, ``std = s·sqrt(Δ)``;
- ``cps``   (coefficient-preserving): ``x̂0 = x − σ·v``, ``x̂1 = x + (1 − σ)·v``,
  ``mean = (1 − σ')·x̂0 + σ'·cos(η·π/2)·x̂1``, ``std = σ'·sin(η·π/2)``;
- ``dance`` (DanceGRPO):   the ``sde`` mean with the constant scale ``s = η``, ``std = η·sqrt(Δ)``.

With noise level 0 every kind is the Euler step. All arithmetic is fp32 whatever the input dtype. Pure tensor
functions: no model, no I/O, no global state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "KINDS",
    "LOGPROB_KINDS",
    "SPACINGS",
    "sigma_schedule",
    "static_shift",
    "flux_mu",
    "timestep_from_sigma",
    "transition",
    "transition_std",
    "noise_scale",
    "step",
    "log_prob",
    "kl_to_reference",
    "is_stochastic",
    "dpm_solver_2m_step",
]

#: Step kernels (docs/design.md §2).
KINDS = ("ode", "sde", "cps", "dance")
#: Transition log-probability variants (docs/design.md §2, ``logprob: gaussian | mse``).
LOGPROB_KINDS = ("gaussian", "mse")

_NUM_TRAIN_TIMESTEPS = 1000
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


#: σ spacings before the shift (docs/design.md §2): the scheduler's default, the FLUX pipeline's, DanceGRPO's.
SPACINGS = ("scheduler", "flux_pipeline", "linspace")


def static_shift(sigma: Any, shift: float) -> Any:
    """SD3's static time shift ``σ ↦ shift·σ / (1 + (shift − 1)·σ)`` (diffusers ``FlowMatchEulerDiscreteScheduler``,
    DanceGRPO's ``sd3_time_shift``), elementwise on a float, array or tensor."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(num_steps: int, shift: float = 1.0, *, mu: float | None = None,
                   spacing: str = "scheduler") -> torch.Tensor:
    """σ_0 = 1 > … > σ_{num_steps} = 0 as the reference code builds it (docs/design.md §2).

    ``spacing`` says which σ grid the shift is applied to:

    - ``"scheduler"``: diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` (what
      ``StableDiffusion3Pipeline`` uses): ``num_steps`` timesteps evenly spaced from ``1000·sigma_max`` to
      ``1000·sigma_min`` (the scheduler's first and last training sigmas, ``t/1000`` for t = 1000 and 1, statically
      shifted in fp32), divided by 1000 and shifted again (float64), then cast to fp32.
    - ``"flux_pipeline"``: what ``FluxPipeline`` passes, ``sigmas = linspace(1, 1/T, T)``, cast to fp32 and shifted
      by the scheduler in fp32 (``set_timesteps(sigmas=…, mu=…)``).
    - ``"linspace"``: DanceGRPO's ``sd3_time_shift(shift, torch.linspace(1, 0, T + 1))`` in fp32 (static shift; ``mu``
      is not used).

    Args:
        num_steps: number of sampling steps T (≥ 1).
        shift: static shift ``σ ↦ shift·σ / (1 + (shift − 1)·σ)`` (SD3.5: 3.0). Ignored when ``mu`` is given.
        mu: dynamic (FLUX, ``use_dynamic_shifting=True``, exponential) shift
            ``σ ↦ e^mu / (e^mu + (1/σ − 1))``; see :func:`flux_mu`.
        spacing: one of :data:`SPACINGS`.

    Returns:
        float32 tensor of shape ``[num_steps + 1]``, strictly decreasing from 1 to 0 (the terminal 0 appended).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"sigma_schedule: num_steps must be an integer >= 1, got {num_steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"sigma_schedule: shift must be a finite number > 0, got {shift!r}")
    if mu is not None and not math.isfinite(mu):
        raise ValueError(f"sigma_schedule: mu must be a finite number, got {mu!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"sigma_schedule: unknown spacing {spacing!r}; expected one of {SPACINGS}")

    if spacing == "linspace":
        grid = torch.linspace(1, 0, int(num_steps) + 1)
        return static_shift(grid, shift)

    if spacing == "flux_pipeline":
        sigmas = np.linspace(1.0, 1 / num_steps, int(num_steps)).astype(np.float32)
    else:
        # Scheduler __init__: training sigmas t/1000 (fp32), statically shifted unless dynamic shifting is on.
        train_ends = torch.tensor([float(_NUM_TRAIN_TIMESTEPS), 1.0], dtype=torch.float32) / _NUM_TRAIN_TIMESTEPS
        if mu is None:
            train_ends = static_shift(train_ends, shift)
        sigma_max, sigma_min = train_ends[0].item(), train_ends[1].item()
        # set_timesteps: evenly spaced timesteps (float64), back to sigmas.
        sigmas = np.linspace(sigma_max * _NUM_TRAIN_TIMESTEPS, sigma_min * _NUM_TRAIN_TIMESTEPS,
                             int(num_steps)) / _NUM_TRAIN_TIMESTEPS
    if mu is None:
        sigmas = static_shift(sigmas, shift)
    else:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent FLUX shift ``mu``: linear in the packed image sequence length (docs/design.md §2).

    ``mu = base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``);
    a 512×512 FLUX image has ``image_seq_len = (512/16)² = 1024``.
    """
    if max_seq_len == base_seq_len:
        raise ValueError("flux_mu: max_seq_len must differ from base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return float(image_seq_len * slope + intercept)


def timestep_from_sigma(sigma: Any) -> Any:
    """The timestep passed to the model, ``1000·σ`` (docs/design.md §2). Tensors come back as fp32 tensors."""
    if isinstance(sigma, torch.Tensor):
        return sigma.float() * _NUM_TRAIN_TIMESTEPS
    return float(sigma) * _NUM_TRAIN_TIMESTEPS


# ----------------------------------------------------------------------------------------------------------------
# Step kernels
# ----------------------------------------------------------------------------------------------------------------


def _as_fp32(value: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device if device is not None else value.device, dtype=torch.float32)
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def _validate(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {KINDS}")
    try:
        noise_level = float(noise_level)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"noise_level must be a number, got {noise_level!r}") from exc
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"cps noise level η must lie in [0, 1], got {noise_level!r}")
    if not bool(torch.isfinite(sigma).all() & torch.isfinite(sigma_next).all()):
        raise ValueError("sigma and sigma_next must be finite")
    if bool((sigma_next >= sigma).any()):
        raise ValueError(
            f"sigma_next must be < sigma (sampling runs from σ = 1 to 0), got sigma={sigma.tolist()}, "
            f"sigma_next={sigma_next.tolist()}"
        )
    if bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError(
            f"sigmas must lie in [0, 1], got sigma={sigma.tolist()}, sigma_next={sigma_next.tolist()}"
        )
    return noise_level


def _sde_scale(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO ``s = a·sqrt(σ/(1 − σ))``; at σ = 1 the denominator uses σ_1, the next sigma (= sigma_next)."""
    denominator_sigma = torch.where(sigma == 1.0, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denominator_sigma))


def _std(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Transition std of docs/design.md §2 (inputs already validated, fp32, broadcast-compatible)."""
    delta = sigma - sigma_next
    if kind == "ode" or noise_level == 0:
        return torch.zeros_like(delta)
    if kind == "sde":
        return _sde_scale(sigma, sigma_next, noise_level) * torch.sqrt(delta)
    if kind == "dance":
        return noise_level * torch.sqrt(delta)
    # cps
    return sigma_next * math.sin(noise_level * math.pi / 2)


def _batch_shaped(value: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 ``value`` on x's device: 0-d stays 0-d; per-sample ``[B]`` becomes ``[B, 1, …, 1]``."""
    t = _as_fp32(value, x.device)
    if t.ndim == 0:
        return t
    batch = x.shape[0]
    if t.numel() != t.shape[0] or t.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be a scalar or per-sample of shape [{batch}] (batch of x), got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def transition_std(kind: str, sigma: Any, sigma_next: Any, noise_level: float) -> torch.Tensor:
    """Transition std of step ``sigma → sigma_next`` under ``kind`` (docs/design.md §2), fp32.

    ``ode``: 0; ``sde``: ``a·sqrt(σ/(1 − σ))·sqrt(Δ)`` (σ_1 = sigma_next in the denominator at σ = 1);
    ``cps``: ``σ'·sin(η·π/2)``; ``dance``: ``η·sqrt(Δ)``. Equal to the std returned by :func:`transition`
    (which reshapes it to ``[B, 1, …, 1]``). Shape: the broadcast of ``sigma`` and ``sigma_next`` (0-d or ``[B]``).
    """
    sig = _as_fp32(sigma)
    sig_next = _as_fp32(sigma_next, sig.device)
    sig, sig_next = torch.broadcast_tensors(sig, sig_next)
    noise_level = _validate(kind, sig, sig_next, noise_level)
    return _std(kind, sig, sig_next, noise_level)


def noise_scale(kind: str, sigma: Any, sigma_next: Any, noise_level: float) -> torch.Tensor:
    """The per-step noise *scale* the reference step functions return as ``std_dev_t`` (docs/design.md §2), fp32.

    ``sde``: ``s = a·sqrt(σ/(1 − σ))`` (σ_1 in the denominator at σ = 1) — the transition std without ``sqrt(Δ)``;
    ``dance``: the constant ``η``; ``cps``: ``σ'·sin(η·π/2)``, which *is* the transition std; ``ode``: 0.
    Flow-GRPO's training script divides its KL by ``2·s²`` (see :func:`kl_to_reference`).
    """
    sig = _as_fp32(sigma)
    sig_next = _as_fp32(sigma_next, sig.device)
    sig, sig_next = torch.broadcast_tensors(sig, sig_next)
    noise_level = _validate(kind, sig, sig_next, noise_level)
    if kind == "ode" or noise_level == 0:
        return torch.zeros_like(sig)
    if kind == "sde":
        return _sde_scale(sig, sig_next, noise_level)
    if kind == "dance":
        return torch.full_like(sig, noise_level)
    return _std(kind, sig, sig_next, noise_level)


def transition(
    kind: str, x: torch.Tensor, v: torch.Tensor, sigma: Any, sigma_next: Any, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian transition ``x' ~ N(mean, std²·I)`` of one step ``sigma → sigma_next`` (docs/design.md §2).

    Args:
        kind: ``"ode"``, ``"sde"`` (noise level a), ``"cps"`` (η ∈ [0, 1]) or ``"dance"`` (η).
        x: current state ``[B, …]``; v: predicted velocity, same shape.
        sigma, sigma_next: python floats, 0-d tensors or per-sample ``[B]`` tensors with ``sigma_next < sigma``.
        noise_level: a or η, ≥ 0; 0 gives the Euler step for every kind.

    Returns:
        ``(mean, std)``: ``mean`` with x's shape and ``std`` of shape ``[B, 1, …, 1]``, both fp32. The mean keeps
        the autograd graph of ``v`` (and ``x``).
    """
    if x.ndim < 1 or x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape [B, ...], got {tuple(x.shape)} and {tuple(v.shape)}")
    x = x.float()
    v = v.float()
    sig = _batch_shaped(sigma, x, "sigma")
    sig_next = _batch_shaped(sigma_next, x, "sigma_next")
    noise_level = _validate(kind, sig, sig_next, noise_level)
    delta = sig - sig_next

    if kind == "ode" or noise_level == 0:
        mean = x - delta * v
    elif kind in ("sde", "dance"):
        s = _sde_scale(sig, sig_next, noise_level) if kind == "sde" else torch.full_like(sig, noise_level)
        mean = x - delta * (v + s**2 / (2 * sig) * (x + (1 - sig) * v))
    else:  # cps
        x0_hat = x - sig * v
        x1_hat = x + (1 - sig) * v
        mean = (1 - sig_next) * x0_hat + sig_next * math.cos(noise_level * math.pi / 2) * x1_hat

    std = _std(kind, sig, sig_next, noise_level)
    std_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return mean, std.expand(std_shape).contiguous()


def step(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Any,
    sigma_next: Any,
    noise_level: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampling step ``x' = mean + std·noise`` (docs/design.md §2); returns ``(x_next, mean, std)``, fp32.

    ``noise ~ N(0, I)`` is drawn as ``torch.randn(x.shape, generator=generator, dtype=float32, device=x.device)``
    when not given. For ``ode`` or ``noise_level == 0`` the step is deterministic: ``x_next = mean`` and no noise
    is drawn (the generator does not advance).
    """
    mean, std = transition(kind, x, v, sigma, sigma_next, noise_level)
    if noise is None:
        if kind == "ode" or float(noise_level) == 0:
            return mean.clone(), mean, std
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    x_next = mean + std * noise.to(device=mean.device, dtype=torch.float32)
    return x_next, mean, std


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities and KL
# ----------------------------------------------------------------------------------------------------------------


def _mean_over_non_batch(values: torch.Tensor) -> torch.Tensor:
    if values.ndim <= 1:
        return values
    return values.mean(dim=tuple(range(1, values.ndim)))


def _positive_std(std: Any, like: torch.Tensor, who: str) -> torch.Tensor:
    """fp32 std broadcastable against ``like`` ``[B, …]``: scalar, per-sample ``[B]`` or ``[B, 1, …, 1]``; > 0."""
    std = _as_fp32(std, like.device)
    if std.ndim == 1 and like.ndim > 1:
        std = _batch_shaped(std, like, "std")  # per-sample [B] → [B, 1, …, 1], never aligned with the last dim
    if bool((std <= 0).any()):
        raise ValueError(
            f"{who}: transition std must be > 0; a zero std means a deterministic step (ode, noise level 0, or "
            "the final step to σ = 0), which cannot be trained"
        )
    return std


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: Any, kind: str = "gaussian") -> torch.Tensor:
    """Per-sample log-probability of a transition, **averaged** over the non-batch elements (docs/design.md §2), fp32.

    ``"gaussian"``: mean over elements of ``−(x' − μ)²/(2·std²) − log std − ½·log(2π)`` (the Gaussian log-density
    of x' under ``N(μ, std²·I)`` divided by the element count). ``"mse"``: ``−mean((x' − μ)²)`` (the ``cps``
    references). ``std``: a scalar, per-sample ``[B]`` (as from :func:`transition_std`) or ``[B, 1, …, 1]`` (as
    from :func:`transition`). Returns shape ``[B]``. Raises ValueError for ``"gaussian"`` when any std ≤ 0.
    """
    if kind not in LOGPROB_KINDS:
        raise ValueError(f"unknown log_prob kind {kind!r}; expected one of {LOGPROB_KINDS}")
    if x_next.shape != mean.shape:
        raise ValueError(
            f"x_next and mean must have the same shape, got {tuple(x_next.shape)} and {tuple(mean.shape)}"
        )
    squared_error = (x_next.float() - mean.float()) ** 2
    if kind == "mse":
        return _mean_over_non_batch(-squared_error)
    std = _positive_std(std, squared_error, "log_prob")
    log_density = -squared_error / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return _mean_over_non_batch(log_density)


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: Any) -> torch.Tensor:
    """KL to the reference policy per sample: mean over non-batch elements of ``(μ_θ − μ_ref)²/(2·std²)``.

    docs/design.md §2. With ``std`` the transition std it is the KL between the two Gaussian transitions (same std),
    averaged over elements (``training.kl_variance: transition``); with ``std`` = :func:`noise_scale` it is what
    Flow-GRPO's training script computes under ``sde`` (``training.kl_variance: noise_scale``; 1/Δ_i times
    smaller). ``std`` as in :func:`log_prob`. fp32, shape ``[B]``. Raises ValueError when any std ≤ 0.
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(
            f"mean and mean_ref must have the same shape, got {tuple(mean.shape)} and {tuple(mean_ref.shape)}"
        )
    squared_gap = (mean.float() - mean_ref.float()) ** 2
    std = _positive_std(std, squared_gap, "kl_to_reference")
    return _mean_over_non_batch(squared_gap / (2 * std**2))


def is_stochastic(kind: str, sigma_next: Any, noise_level: float) -> bool:
    """Whether a step ending at ``sigma_next`` is a random, trainable transition (docs/design.md §2).

    False for ``ode``, for ``noise_level == 0``, and for the final step ``sigma_next == 0`` under every kind:
    under ``cps`` its std is exactly 0, and docs/design.md §2 declares the final step never stochastic and never
    trained under any kind (the engine runs it as an ODE step). For a per-sample ``sigma_next`` the answer is
    True only when it holds for every sample.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {KINDS}")
    noise_level = float(noise_level)
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    if kind == "ode" or noise_level == 0:
        return False
    return bool((_as_fp32(sigma_next) > 0).all())


def dpm_solver_2m_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
                       x0_prev: torch.Tensor | None = None, sigma_prev: float | None = None) -> torch.Tensor:
    """One step of the second-order multistep DPM-Solver++ (2M, midpoint form) in flow-matching terms, from σ to σ'.

    With the data prediction ``x̂0 = x − σ·v``, ``λ(σ) = ln((1 − σ)/σ)``, ``h = λ(σ') − λ(σ)``, ``h₀ = λ(σ) − λ(σ₋)``
    (σ₋: the previous node, whose data prediction is ``x0_prev``) and ``r₀ = h₀/h``::

        x' = (σ'/σ)·x + (1 − σ'/σ)·(x̂0 + (x̂0 − x0_prev)/(2·r₀))
           = x − (σ − σ')·v + (1 − σ'/σ)·(x̂0 − x0_prev)/(2·r₀)

    (Lu et al. 2022, DPM-Solver++ Alg. 2, with α = 1 − σ; MixGRPO's ``fastvideo/utils/sampling_utils.py`` L449–526).
    Without history (``x0_prev`` None, or σ₋ = 1 where λ = −∞) and on the last step to σ' = 0 it is first order: the
    Euler step ``x − (σ − σ')·v``. fp32.
    """
    x, v = x.float(), v.float()
    euler = x - (sigma - sigma_next) * v
    if x0_prev is None or sigma_prev is None or sigma_prev >= 1.0 or sigma_next <= 0.0:
        return euler
    lam = lambda s: math.log((1.0 - s) / s)  # noqa: E731
    r0 = (lam(sigma) - lam(sigma_prev)) / (lam(sigma_next) - lam(sigma))
    return euler + (1.0 - sigma_next / sigma) * ((x - sigma * v) - x0_prev.float()) / (2.0 * r0)
