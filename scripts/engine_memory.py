"""Per-process memory and time of full fine-tuning of the built-in model: 1 process, 2-process DDP, 2-process FSDP2
(torchrun, gloo, 1 thread per process). Writes docs/scaling/engine_memory.json; docs/scaling.md quotes it.

    .venv/bin/python scripts/engine_memory.py [--epochs 3] [--out docs/scaling/engine_memory.json]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["model.full_finetune=true", "training.prompts_per_epoch=4", "training.group_size=8",
             "training.sample_batch_size=16", "training.train_batch_size=32", "data.eval_per_tag=1",
             "data.eval_batch_size=3", "training.eval_every=1000", "training.checkpoint_every=1000", "training.lr=1e-5"]


def run(label, nproc, strategy, run_dir, epochs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    args = ["-m", "tpgrpo.cli", "train", "-c", str(ROOT / "configs/default.yaml"), f"run_dir={run_dir}",
            f"training.epochs={epochs}", *OVERRIDES]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *args, f"distributed.strategy={strategy}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    records = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    epochs_ = [r for r in records if r["epoch"] > 0]
    return {"label": label, "processes": nproc, "strategy": strategy, "engine_bytes_rank0": epochs_[-1]["engine_bytes"],
            "time_epoch_s_median": sorted(r["time_epoch"] for r in epochs_)[len(epochs_) // 2],
            "time_train_s_median": sorted(r["time_train"] for r in epochs_)[len(epochs_) // 2], "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/scaling/engine_memory.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run("1 process", 1, "single", f"{tmp}/one", a.epochs),
                run("DDP, 2 processes", 2, "ddp", f"{tmp}/ddp", a.epochs),
                run("FSDP2, 2 processes", 2, "fsdp2", f"{tmp}/fsdp2", a.epochs)]
    out = {"date": time.strftime("%Y-%m-%d"), "command": "python scripts/engine_memory.py", "overrides": OVERRIDES,
           "epochs": a.epochs, "runs": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        b = r["engine_bytes_rank0"]
        print(f"{r['label']:<20} params {b['params'] / 2**20:7.2f} MiB  grads {b['grads'] / 2**20:7.2f} MiB  "
              f"adam {b['optimizer'] / 2**20:7.2f} MiB  epoch {r['time_epoch_s_median']:.2f} s  train {r['time_train_s_median']:.2f} s")


if __name__ == "__main__":
    main()
