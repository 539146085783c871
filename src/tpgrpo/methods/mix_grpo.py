"""MixGRPO (arXiv 2507.21802; Tencent-Hunyuan/MixGRPO @ e5cdd6a) — what differs from Flow-GRPO:

* **a sliding window.** The SDE (trained) steps form a window that moves over training in a fixed order instead of
  a random start per epoch: epoch e (1-based) starts it at
  ``window_start_min + (⌊(e − 1) / shift_interval⌋ · stride  mod  (window_start_max − window_start_min + 1))``.
  The reference (``fastvideo/utils/grpo_states.py`` L87–99, L141–148; iteration k = epoch k + 1) moves it by
  ``stride`` every ``shift_interval`` iterations and restarts at step 0 once the start passes T − 2, truncating the
  window near the end (to 3, 2, 1, then 0 steps); here it wraps at ``window_start_max`` instead, so that every epoch
  trains a full window (the 300-iteration reference runs never reach the end). ``stride`` 0 freezes the window
  (MixGRPO-Flash*).
* **advantages** as DanceGRPO's: group mean over the unbiased group std + 1e-8, per reward, weighted sum
  (``fastvideo/train_grpo_flux.py`` L428–479); clipped to ±``adv_clip_max`` (L567–571) by the shared loss.
* **MixGRPO-Flash** (``mix.flash_ratio``): after the window the ODE runs on a compressed σ grid with the second-order
  multistep DPM-Solver++ (:func:`tpgrpo.sampling.dpm_solver_2m_step`); ``fastvideo/utils/sampling_utils.py``
  L29–59 (grid), L273–385 and L449–526 (solver). The trained window's transitions are unchanged.

Everything else (SDE kernel, window log-probs, clipped loss, KL) is Flow-GRPO's; steps outside the window are ODE.
"""

from __future__ import annotations

import torch

from ..advantages import group_advantages
from ..sampling import static_shift
from .base import Credit, ScoredRollout


def sliding_window_start(epoch: int, start_min: int, start_max: int, shift_interval: int, stride: int) -> int:
    """The window's first step in (1-based) ``epoch``: it moves by ``stride`` every ``shift_interval`` epochs and wraps
    from ``start_max`` back to ``start_min``."""
    positions = start_max - start_min + 1
    return start_min + ((epoch - 1) // shift_interval * stride) % positions


def compressed_tail(num_steps: int, shift: float, last_window_step: int, ratio: float) -> torch.Tensor:
    """MixGRPO-Flash's σ grid after the window (``sampling.spacing: linspace``): ``n = int(max((T − L)·ratio, 2))``
    points from σ_{L+1} to 0, evenly spaced in the unshifted time and shifted as the main grid,
    ``shift(linspace(1 − (L + 1)/T, 0, n))``. The reference uses ``max(·, 1)``, which for n = 1 would stop at
    σ_{L+1} > 0 and decode a noisy image; at least one step is taken here."""
    n = int(max((num_steps - last_window_step) * ratio, 2))
    return static_shift(torch.linspace(1 - (last_window_step + 1) / num_steps, 0, n), shift)


class MixGRPO:
    name = "mix_grpo"
    engine_options: dict = {}
    rows = "samples"

    def __init__(self, cfg):
        s, m = cfg.sampling, cfg.mix
        self.window_range = (s.window_start_min, s.window_start_max)
        self.shift_interval, self.stride = m.shift_interval, m.stride
        self.flash_ratio, self.num_steps, self.shift = m.flash_ratio, s.num_steps, s.shift

    def window_start(self, epoch: int) -> int:
        return sliding_window_start(epoch, *self.window_range, self.shift_interval, self.stride)

    def plan_options(self, window: list[int]) -> dict:
        """MixGRPO-Flash: the compressed σ grid the main trajectory follows after the window."""
        if self.flash_ratio is None or not window:
            return {}
        return {"tail_sigmas": compressed_tail(self.num_steps, self.shift, window[-1], self.flash_ratio)}

    def credit(self, scored: ScoredRollout, group_ids, microbatch_ids, window, rng) -> Credit:
        adv = group_advantages(scored.rewards, group_ids, std="group", eps=1e-8, unbiased=True)
        return Credit(adv[:, None].expand(-1, len(window)).float().contiguous())
