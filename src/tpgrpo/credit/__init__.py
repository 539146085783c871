"""Credit assignment: pure functions from rewards to per-step rewards, masks and weights (docs/design.md §3, §5)."""

from tpgrpo.credit.noise_weights import NOISE_KINDS, noise_aware_weights
from tpgrpo.credit.turning_points import (
    RANK_BY,
    balance_turning_points,
    incremental_and_aggregated,
    turning_point_rewards,
    turning_point_stats,
)

__all__ = [
    "NOISE_KINDS",
    "RANK_BY",
    "balance_turning_points",
    "incremental_and_aggregated",
    "noise_aware_weights",
    "turning_point_rewards",
    "turning_point_stats",
]
