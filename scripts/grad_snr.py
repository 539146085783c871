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


def gradient_estimates(trainer: Trainer, k: int, first_epoch: int = 1, infos: list | None = None) -> torch.Tensor:
    """K flattened gradients at the trainer's initial weights, one per epoch's batch (epochs first_epoch …): the
    optimizer step and the EMA update are disabled, so every estimate starts from the same model. Use
    train_batch_size = the epoch's samples for one estimate per epoch. ``infos`` collects each epoch's record."""
    grads: list[torch.Tensor] = []
    saved = trainer.optimizer.step, trainer.ema.update
    trainer.optimizer.step = lambda *a, **kw: grads.append(torch.cat([p.grad.flatten().clone() for p in trainer.trainable]))
    trainer.ema.update = lambda *a, **kw: None
    try:
        for epoch in range(first_epoch, first_epoch + k):
            batch, info = trainer.collect(epoch)
            if infos is not None:
                infos.append(info)
            trainer.optimise(batch, epoch)
    finally:
        trainer.optimizer.step, trainer.ema.update = saved
    return torch.stack(grads)


def pairwise_agreement(g: torch.Tensor) -> dict:
    """Mean pairwise cosine of the rows of g and its standard error over the K(K−1)/2 pairs."""
    unit = g / g.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[torch.triu(torch.ones(len(g), len(g), dtype=torch.bool), 1)]
    return {"estimates": len(g), "pairwise_cosine": float(cos.mean()), "standard_error": float(cos.std() / len(cos) ** 0.5)}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    config, k, overrides = argv[0], int(argv[1]), argv[2:]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(config, overrides + [f"run_dir={run_dir}"])
        infos: list[dict] = []
        agreement = pairwise_agreement(gradient_estimates(Trainer(cfg, log_trackers=False), k, infos=infos))
    out = {"config": config, "overrides": overrides, "estimates": agreement["estimates"],
           "pairwise_cosine": round(agreement["pairwise_cosine"], 4),
           "standard_error": round(agreement["standard_error"], 4)}
    out.update(mean_diagnostics(infos))
    print(json.dumps(out))


def mean_diagnostics(infos: list[dict]) -> dict:
    """Per window step, averaged over the estimates' epochs: the fraction of advantages exactly 0 (every method)
    and, for TP-GRPO, the fraction of exactly-zero incremental rewards and the turning-point rates."""
    def avg(rows):
        return [round(float(sum(col) / len(col)), 4) for col in zip(*rows)]

    out = {}
    if infos and "adv_zero_per_step" in infos[0]:
        out["adv_zero_per_step"] = avg([i["adv_zero_per_step"] for i in infos])
    tp = [i["tp"] for i in infos if "tp" in i]
    for key in ("r_zero_per_step", "tp_rate_per_step", "tp_rate_per_step_after", "mean_abs_r_per_step",
                "mean_abs_g_per_step"):
        if tp:
            out[key] = avg([t[key] for t in tp])
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
