"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node P``: one epoch's ``collect`` and an evaluation
on every process; rank 0 saves what the test compares with a single-process run.

usage: dist_worker.py OUT.pt section.field=value ...
"""

import os
import sys

import torch

from tpgrpo import distributed as dist
from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer


def main() -> None:
    out, *overrides = sys.argv[1:]
    tr = Trainer(load_config(None, overrides), log_trackers=False)
    batch, info = tr.collect(1)
    copies = dist.all_gather_object((batch.advantages, batch.train_mask))  # credit must agree on every process
    assert all(torch.equal(a, copies[0][0]) for a, _ in copies), "processes disagree on the advantages"
    result = {
        "world_size": dist.world_size(),
        "advantages": batch.advantages, "train_mask": batch.train_mask,
        "row_offsets": dist.all_gather_object(batch.row_offset),
        "log_probs": dist.all_gather_tensor(batch.log_probs),
        "states": dist.all_gather_tensor(batch.states),
        "next_states": dist.all_gather_tensor(batch.next_states),
        "prompts": sum(dist.all_gather_object(batch.prompts), []),
        "old_means": None if batch.old_means is None else dist.all_gather_tensor(batch.old_means),  # GRPO-Guard
        "reward_mean": info["reward_mean"],
        "eval": tr.evaluate(0, grid=False),
    }
    if dist.is_main():
        torch.save(result, out)
    dist.shutdown()


if __name__ == "__main__":
    main()
    # Skip interpreter finalisation: gloo's worker threads can still hold tensors then, and tearing them down has
    # aborted a rank (SIGABRT, "terminate called without an active exception") in about 1 of 20 CI runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
