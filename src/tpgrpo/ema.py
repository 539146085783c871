"""Exponential moving average of the trained weights, used for evaluation (docs/design.md §3)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch


class EMA:
    """shadow ← decay·shadow + (1 − decay)·param, after optimizer steps."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params):
            s.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self, params: Sequence[torch.Tensor]):
        """Temporarily load the EMA weights into ``params``."""
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, expected {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"shadow.{i}"])
