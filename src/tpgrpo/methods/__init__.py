"""The GRPO-family methods on one engine. A method decides which states are forked and how rewards become
per-step advantages; everything else (rollouts, loss, optimisation) is shared (docs/design.md §3)."""

from .awm import AWM
from .base import Credit, Method, ScoredRollout
from .dance_grpo import DanceGRPO
from .diffusion_nft import DiffusionNFT
from .flow_grpo import FlowGRPO
from .mix_grpo import MixGRPO
from .tempflow_grpo import TempFlowGRPO
from .tp_grpo import TPGRPO

METHODS: dict[str, type] = {"tpgrpo": TPGRPO, "flow_grpo": FlowGRPO, "dance_grpo": DanceGRPO,
                            "tempflow_grpo": TempFlowGRPO, "diffusion_nft": DiffusionNFT, "awm": AWM,
                            "mix_grpo": MixGRPO}


def build_method(name: str, cfg) -> Method:
    if name not in METHODS:
        raise ValueError(f"algorithm: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["Credit", "Method", "METHODS", "ScoredRollout", "build_method"]
