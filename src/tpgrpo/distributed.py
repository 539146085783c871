"""Data-parallel helpers (docs/design.md §8).

``torchrun`` and ``accelerate launch`` describe the process group in the environment (WORLD_SIZE, RANK, MASTER_ADDR,
…); :func:`init` joins it through ``accelerate.PartialState`` (gloo on CPU, nccl on GPU). Without WORLD_SIZE > 1
nothing is initialised and every helper is the identity / a no-op, so a single process runs exactly the code it ran
before distributed training existed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist


def init() -> None:
    """Join the process group described by the environment (idempotent; nothing happens for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def shutdown() -> None:
    """Leave the process group (after a final barrier)."""
    if active():
        tdist.barrier()
        tdist.destroy_process_group()


def _comm_device(t: torch.Tensor) -> torch.device:
    """nccl only moves CUDA tensors; gloo only CPU ones."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Equal-size shards [n, …] of every process, concatenated along dim 0 in rank order."""
    if not active():
        return t
    x = t.contiguous().to(_comm_device(t))
    out = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(out, x)
    return torch.cat(out).to(t.device)


def all_gather_object(obj: Any) -> list:
    """Any picklable object of every process, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def reduce_metrics(values: dict[str, float], maxima: tuple[str, ...] = ()) -> dict[str, float]:
    """Logged metrics over processes: the sum of each value, the maximum of those named in ``maxima`` (one
    collective each; training gradients are synchronised by the engine, never here)."""
    if not active():
        return dict(values)
    keys = sorted(values)
    summed = [k for k in keys if k not in maxima]
    out = {}
    for names, op in ((summed, tdist.ReduceOp.SUM), ([k for k in keys if k in maxima], tdist.ReduceOp.MAX)):
        if names:
            t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
            t = t.to(_comm_device(t))
            tdist.all_reduce(t, op=op)
            out.update(zip(names, t.cpu().tolist()))
    return out


def any_true(flag: bool) -> bool:
    """True on every process if it is true on any (e.g. a stop signal that reached only some processes)."""
    return reduce_metrics({"flag": 1.0 if flag else 0.0}, maxima=("flag",))["flag"] > 0


def shard(n: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of n items this process owns (n must divide evenly)."""
    p, r = world_size(), rank()
    if n % p:
        raise ValueError(f"{n} items cannot be split evenly over {p} processes")
    return r * n // p, (r + 1) * n // p
