"""The cheap proxies of issue #15, measured in one process with the models side by side (docs/RESULTS.md, "The
latent world"):

* Flow-GRPO training throughput: samples per second of whole epochs (rollout + scoring + training), each model on
  its recipe, epochs interleaved between the models, the median of ``--repeats`` after a warm-up epoch;
* gradient agreement: the mean pairwise cosine of K independent policy gradients at the initial model (one per
  epoch's batch: different prompts and noise), with its standard error over pairs.

    python scripts/world_proxies.py --out docs/latent_world/proxies.json \\
        --arm "pixel=configs/flow_grpo_shapes.yaml" \\
        --arm "latent=configs/flow_grpo_shapes.yaml model.path=src/tpgrpo/assets/shapes_latent.safetensors ..." \\
        [--repeats 5] [--grad-k 8]
"""

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import torch

from grad_snr import gradient_estimates, pairwise_agreement  # scripts/grad_snr.py, next to this file
from tpgrpo.config import load_config
from tpgrpo.trainer import Trainer


def _trainer(spec: str, run_dir: str) -> Trainer:
    config, *overrides = shlex.split(spec)
    return Trainer(load_config(config, overrides + [f"run_dir={run_dir}"]), log_trackers=False)


def epoch_seconds(tr: Trainer, epoch: int) -> float:
    t0 = time.perf_counter()
    batch, _ = tr.collect(epoch)
    tr.optimise(batch, epoch)
    return time.perf_counter() - t0


def gradient_agreement(tr: Trainer, k: int) -> dict:
    """K gradients at the initial model, one per epoch's batch (train_batch_size must be the whole epoch)."""
    return {**pairwise_agreement(gradient_estimates(tr, k, first_epoch=1000)),
            "samples_per_estimate": tr.cfg.samples_per_epoch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", action="append", required=True, help="NAME=CONFIG [overrides…]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad-k", type=int, default=0, help="gradient estimates per arm (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    arms = dict(s.split("=", 1) for s in a.arm)
    out = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: _trainer(spec, f"{tmp}/{name}") for name, spec in arms.items()}
        times = {name: [] for name in arms}
        for name, tr in trainers.items():
            epoch_seconds(tr, 1)  # warm-up
        for r in range(a.repeats):
            for name, tr in trainers.items():
                times[name].append(epoch_seconds(tr, 2 + r))
        for name, tr in trainers.items():
            med = statistics.median(times[name])
            n = tr.cfg.samples_per_epoch
            out["arms"][name] = {"spec": arms[name], "samples_per_epoch": n, "epoch_s": times[name],
                                 "epoch_s_median": med, "samples_per_s": n / med}
            print(f"{name}: {n} samples, epoch {med:.2f} s (median of {a.repeats}) → {n / med:.1f} samples/s",
                  flush=True)
        if a.grad_k:
            for name in arms:
                tr = _trainer(arms[name] + f" training.train_batch_size={trainers[name].cfg.samples_per_epoch}",
                              f"{tmp}/{name}_grad")
                out["arms"][name]["gradient"] = gradient_agreement(tr, a.grad_k)
                print(name, out["arms"][name]["gradient"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
