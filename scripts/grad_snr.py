"""Gradient signal-to-noise probe (docs/RESULTS.md: gradient noise).

Takes K independent policy-gradient estimates at the *initial* model — one epoch's batch each (epochs 1…K of the
config: different prompts and noise), no update — and prints the mean pairwise cosine between them. For independent
unbiased estimates g_i = g + n_i, E[cos(g_i, g_j)] ≈ |g|² / (|g|² + E|n|²): the fraction of an estimate's squared norm
that is signal. Its standard error over the K(K−1)/2 pairs is printed too.

    python scripts/grad_snr.py configs/flow_grpo_shapes.yaml 8 [section.field=value ...]
"""

import json
import sys
import tempfile

import torch

from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    config, k, overrides = argv[0], int(argv[1]), argv[2:]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(config, overrides + [f"run_dir={run_dir}"])
        trainer = Trainer(cfg, log_trackers=False)
        grads: list[torch.Tensor] = []
        trainer.optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten().clone() for p in trainer.trainable]))
        trainer.ema.update = lambda *a, **kw: None
        for epoch in range(1, k + 1):
            batch, _ = trainer.collect(epoch)
            trainer.optimise(batch, epoch)  # one estimate per train micro-batch; use train_batch_size = the epoch
    g = torch.stack(grads)
    unit = g / g.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[torch.triu(torch.ones(len(g), len(g), dtype=torch.bool), 1)]
    print(json.dumps({"config": config, "overrides": overrides, "estimates": len(g),
                      "pairwise_cosine": round(float(cos.mean()), 4),
                      "standard_error": round(float(cos.std() / len(cos) ** 0.5), 4)}))


if __name__ == "__main__":
    main(sys.argv[1:])
