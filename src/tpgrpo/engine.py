"""The distributed engine (docs/design.md §8, docs/scaling.md): how the trained transformer is held across processes and
who synchronises its gradients. tpgrpo itself never reduces a gradient.

``distributed.strategy``:

- ``ddp`` (the default with several processes): accelerate's ``Accelerator.prepare`` wraps the transformer and the
  optimizer; PyTorch DistributedDataParallel all-reduces the gradients in the backward pass of the *last* term of
  each micro-batch (the earlier terms accumulate locally under ``no_sync``). Every process holds the full model.
- ``fsdp2``: PyTorch FSDP2 (``fully_shard``) on every transformer block and on the transformer: parameters,
  gradients and optimizer state are sharded over processes (DTensors), gathered block by block for the forward and
  reduce-scattered in the backward; optional CPU offload and a bf16 compute policy. accelerate 1.15 applies its FSDP
  plugin only on CUDA process groups, so tpgrpo calls ``fully_shard`` (the engine accelerate calls there) itself; the
  same code then runs on CPU with gloo, which is how it is tested.

Both engines average gradients over processes; the trainer's losses are this process's share of a global mean, so
:attr:`Engine.loss_scale` (= P) turns the average back into that sum. The rules the trainer follows for them:

- every process runs the same sequence of forward/backward calls in a training pass (FSDP2 gathers parameters in
  each forward; DDP needs the one synchronising backward on every process); a process with no rows of its own in a
  term runs a zero-weighted call on one of its rows (``Trainer._lockstep_terms``);
- rollouts and evaluation, which differ in call counts between processes, run under :meth:`Engine.gathered`: FSDP2
  gathers the full weights once (no communication per call), as inference needs them anyway.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from . import distributed as dist


def launcher_strategy(env=None) -> str:
    """``distributed.strategy: auto``: FSDP2 when ``accelerate launch`` ran with an FSDP config (its environment:
    ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION`` 2; CPU offload from ``FSDP_OFFLOAD_PARAMS`` is read by the trainer
    from the config, not here), else DDP with several processes. DeepSpeed and FSDP version 1 are refused rather than
    silently replaced by replication."""
    import os

    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("distributed: DeepSpeed launches are not supported; use an FSDP2 config "
                         "(configs/accelerate/fsdp2.yaml) or distributed.strategy=fsdp2")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError("distributed: the accelerate config asks for FSDP version 1; tpgrpo shards with FSDP2 "
                             "(set fsdp_version: 2, as configs/accelerate/fsdp2.yaml does)")
        return "fsdp2"
    return "ddp" if dist.world_size() > 1 else "single"


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (diffusers: ``transformer_blocks`` and FLUX's ``single_transformer_blocks``)."""
    out: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        out += list(getattr(transformer, name, []))
    return out


class Engine:
    """One of ``single`` (one process), ``ddp`` or ``fsdp2`` around the model's transformer and its optimizer."""

    def __init__(self, strategy: str = "auto", *, cpu_offload: bool = False, param_dtype: str | None = None):
        if strategy == "auto":
            strategy = launcher_strategy()
        if strategy != "single" and dist.world_size() == 1:
            strategy = "single"  # one process: nothing to shard or synchronise
        self.strategy = strategy
        self.cpu_offload = cpu_offload
        self.param_dtype = param_dtype
        self.wrapped: nn.Module | None = None  # the DDP module that the training forward goes through
        self.sharded: list[nn.Module] = []     # FSDP2 modules (blocks and roots), for gathering
        self.root: nn.Module | None = None

    @property
    def loss_scale(self) -> float:
        """Engines average gradients over processes; tpgrpo's per-process losses are shares of a global mean."""
        return float(dist.world_size()) if self.strategy in ("ddp", "fsdp2") else 1.0

    # --- setup ------------------------------------------------------------------------------------------------
    def shard(self, module: nn.Module, *, gather: bool = True) -> nn.Module:
        """FSDP2: shard ``module`` (its blocks, then itself) in place; the other strategies leave it as it is. Call it
        before the optimizer is built: the parameters become DTensors. ``gather``: gathered by :meth:`gathered` (the
        trained transformer; not the frozen KL reference, used only in the lockstep training pass)."""
        if self.strategy != "fsdp2":
            return module
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = {}
        if self.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        if self.param_dtype:
            dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.param_dtype]
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
        for block in _blocks(module):
            fully_shard(block, **kw)
            if gather:
                self.sharded.append(block)
        fully_shard(module, **kw)
        if gather:
            self.sharded.append(module)
        if self.root is None:
            self.root = module
        return module

    def prepare(self, transformer: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """DDP: hand the transformer and the optimizer to ``accelerate`` (the optimizer comes back wrapped; the DDP
        module is kept for the training forward). The other strategies return the optimizer as it is."""
        if self.strategy != "ddp":
            return optimizer
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available(), device_placement=False)
        self.wrapped, optimizer = accelerator.prepare(transformer, optimizer)
        return optimizer

    # --- training pass ----------------------------------------------------------------------------------------
    @contextmanager
    def accumulate(self, *, sync: bool) -> Iterator[None]:
        """Around the forward *and* backward of one term of the training pass. ``sync``: the micro-batch's last
        term, whose backward synchronises the accumulated gradients (DDP's all-reduce, FSDP2's reduce-scatter);
        earlier terms accumulate locally."""
        if self.strategy == "ddp" and not sync:
            with self.wrapped.no_sync():
                yield
        elif self.strategy == "fsdp2" and not sync:
            self.root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.root.set_requires_gradient_sync(True)
        else:
            yield

    def policy(self, model):
        """Around the trained policy's forward: with DDP it goes through the DDP module, whose hooks must see it."""
        from .export import swapped_transformer

        return swapped_transformer(model, self.wrapped) if self.strategy == "ddp" else nullcontext()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the (already synchronised) gradients; with FSDP2 the norm is of the full, sharded gradient."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # --- inference --------------------------------------------------------------------------------------------
    @contextmanager
    def gathered(self) -> Iterator[None]:
        """FSDP2: the full weights gathered once on every process (every process enters and leaves together), so
        that rollouts and evaluation may make different numbers of calls per process. A no-op otherwise."""
        if self.strategy != "fsdp2":
            yield
            return
        for m in self.sharded:
            m.set_reshard_after_forward(False)
        for m in self.sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in self.sharded:
                m.reshard()
                m.set_reshard_after_forward(True)

    # --- sharded checkpoints -------------------------------------------------------------------------------------
    @staticmethod
    def sharded_state(transformer: nn.Module, optimizer, **extra) -> dict:
        """FSDP2: this process's shards of the trained weights (``lora``), the optimizer state and ``extra`` state
        dicts of sharded tensors (EMA, DiffusionNFT's old weights); ``torch.distributed.checkpoint`` saves them, and
        loads into them in place."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"lora": {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad},
                "optimizer": get_optimizer_state_dict(transformer, optimizer), **extra}

    def restore_sharded(self, path, transformer: nn.Module, optimizer, target: dict) -> dict:
        """Load the sharded checkpoint ``path`` into ``target`` (:meth:`sharded_state`) in place, with any number
        of processes; returns its state. Only an FSDP2 run resumes from a sharded checkpoint and vice versa; any
        mismatch is a :class:`~tpgrpo.checkpoint.CheckpointError`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        from .checkpoint import SHARDS, CheckpointError, is_sharded, read_state, verify_checkpoint

        if self.strategy != "fsdp2":
            raise CheckpointError(f"{path}: a sharded (FSDP2) checkpoint resumes only under distributed.strategy=fsdp2 "
                                  f"(`tpgrpo consolidate` makes it one file of weights)")
        if not is_sharded(path):
            raise CheckpointError(f"{path}: an FSDP2 run resumes from a sharded checkpoint; this one is not")
        verify_checkpoint(path)
        try:
            dcp.load(target, checkpoint_id=str(path / SHARDS))
            set_optimizer_state_dict(transformer, optimizer, target["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / SHARDS}: does not fit this run ({str(e).splitlines()[0][:120]})") from None
        return read_state(path)


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def bytes_held(params: list[torch.Tensor], optimizer) -> dict[str, int]:
    """Bytes this process holds of the trained parameters, their gradients and the optimizer state (the figures of
    docs/scaling.md's memory table)."""
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params), "optimizer": local_bytes(state)}
