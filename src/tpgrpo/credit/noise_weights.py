"""TempFlow-GRPO noise-aware step weights (docs/design.md §3.3)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..sampling import transition_std

__all__ = ["noise_aware_weights", "NOISE_KINDS"]

#: Stochastic step kinds with a nonzero transition std (docs/design.md §2); ``ode`` has none.
NOISE_KINDS = ("sde", "cps", "dance")


def noise_aware_weights(
    sigmas: Any, steps: Sequence[int] | Any, kind: str = "sde", noise_level: float = 0.7
) -> torch.Tensor:
    """Noise-aware weights ``w_k = std_k / mean_{k' in steps}(std_{k'})`` (TempFlow-GRPO, docs/design.md §3.3).

    ``std_k`` is the transition std of step k (from ``sigmas[k]`` to ``sigmas[k+1]``) under the schedule and
    step kind in use (docs/design.md §2): ``sde``: ``a·sqrt(σ/(1−σ))·sqrt(Δ)`` (σ_1 in the denominator at σ = 1);
    ``cps``: ``σ'·sin(η·π/2)``; ``dance``: ``η·sqrt(Δ)``. The weights over ``steps`` average exactly 1. They
    multiply each step's policy term only (never the KL term).

    Args:
        sigmas: ``[T+1]`` schedule σ_0 = 1 > … > σ_T = 0 (strictly decreasing).
        steps: the trained step indices k (0 ≤ k < T−1; the final step is never stochastic nor trained).
        kind: ``"sde"``, ``"cps"`` or ``"dance"`` (``"ode"`` has no noise and is rejected).
        noise_level: ``a`` (sde) or ``η`` (cps, dance); must be > 0.

    Returns:
        ``[len(steps)]`` weights, in the floating dtype of ``sigmas`` (default float dtype otherwise).
    """
    if kind == "ode":
        raise ValueError("noise_aware_weights: kind 'ode' has zero transition std; weights are undefined")
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_aware_weights: kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not (noise_level > 0 and math.isfinite(noise_level)):
        raise ValueError(f"noise_aware_weights: noise_level must be a finite number > 0, got {noise_level!r}")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"noise_aware_weights: cps noise level η must be in (0, 1], got {noise_level!r}")

    sig = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(np.asarray(sigmas))
    if sig.dim() != 1 or sig.numel() < 2:
        raise ValueError(f"noise_aware_weights: sigmas must be 1-D with at least 2 entries, got {tuple(sig.shape)}")
    out_dtype = sig.dtype if sig.is_floating_point() else torch.get_default_dtype()
    sig64 = sig.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(sig64).all()) or not bool((sig64[1:] < sig64[:-1]).all()):
        raise ValueError("noise_aware_weights: sigmas must be finite and strictly decreasing")
    if float(sig64[0]) > 1.0 or float(sig64[-1]) < 0.0:
        raise ValueError("noise_aware_weights: sigmas must lie in [0, 1]")

    idx = torch.as_tensor(np.asarray(steps.cpu() if isinstance(steps, torch.Tensor) else steps))
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError("noise_aware_weights: steps must be a non-empty 1-D sequence of step indices")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"noise_aware_weights: steps must be integers, got dtype {idx.dtype}")
    idx = idx.to(torch.long)
    T = sig64.numel() - 1
    if bool((idx < 0).any()) or bool((idx >= T).any()):
        raise ValueError(f"noise_aware_weights: steps must lie in [0, {T - 1}], got {idx.tolist()}")
    final = idx[sig64[idx + 1] == 0]
    if final.numel():
        raise ValueError(
            f"noise_aware_weights: step(s) {sorted(set(final.tolist()))} end at sigma = 0 (the final step), "
            "which is never stochastic and never trained"
        )

    # the schedule's own transition std (docs/design.md §2); at σ = 1 it uses σ_1 = sigmas[1] for sde, as the kernel does
    std = torch.stack([transition_std(kind, float(sig64[k]), float(sig64[k + 1]), float(noise_level)).double()
                       for k in idx.tolist()])
    return (std / std.mean()).to(out_dtype)
