"""Paired evaluations at equal wall-clock time (docs/RESULTS.md, "TP-GRPO in its regime").

`tpgrpo compare` trains every arm for the same number of samples; a slower arm (TP-GRPO, whose ODE completions cost
model calls) has then spent more time. This evaluates each slower arm's run at the checkpoint whose cumulative
training time is the largest not above the reference arm's mean total training time (runs must keep intermediate
checkpoints: `training.checkpoint_every`), paired against the base model on the compare spec's evaluation set, and
prints each arm's gains with 95 % intervals and their difference from the reference's full-length gains.

    python scripts/equal_time_eval.py configs/compare_latent_pref.yaml runs/compare_latent_pref tpgrpo tpgrpo_dense

Writes RUN/paired_eval_equal_time.json (skipped when present, so the script resumes) and, with --out, a JSON
summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tpgrpo.compare import CompareSpec, mean_ci, run_metrics, welch_difference

OUT_NAME = "paired_eval_equal_time.json"


def cumulative_seconds(run_dir: Path) -> dict[int, float]:
    """Training seconds (sampling, scoring, optimisation; evaluations excluded) up to the end of each epoch."""
    total, out = 0.0, {}
    for r in run_metrics(run_dir):
        if "time_epoch" in r:
            total += r["time_epoch"]
            out[r["epoch"]] = total
    return out


def checkpoint_at(run_dir: Path, budget_s: float) -> tuple[int, float] | None:
    """The latest checkpoint epoch whose cumulative training time is ≤ ``budget_s``, and that time."""
    secs = cumulative_seconds(run_dir)
    ckpts = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*") if p.is_dir())
    fit = [(e, secs[e]) for e in ckpts if e in secs and secs[e] <= budget_s]
    return fit[-1] if fit else None


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("runs_dir")
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    spec = CompareSpec.load(args.spec)
    runs = Path(args.runs_dir)
    ref = spec.reference
    ref_total = [max(cumulative_seconds(runs / ref / f"seed{s}").values()) for s in spec.seeds]
    budget = float(np.mean(ref_total))
    ref_gain = [json.loads((runs / ref / f"seed{s}" / "paired_eval.json").read_text())["gain_over_base"]
                for s in spec.seeds]
    summary = {"reference": ref, "reference_seconds": ref_total, "budget_s": budget, "arms": {}}
    for arm in args.arms:
        gains, picked = [], []
        for s in spec.seeds:
            d = runs / arm / f"seed{s}"
            at = checkpoint_at(d, budget)
            if at is None:
                sys.exit(f"{d}: no checkpoint within {budget:.0f} s of training")
            epoch, secs = at
            out = d / OUT_NAME
            if not out.is_file():
                pe = spec.paired_eval
                cmd = [sys.executable, "-m", "tpgrpo.cli", "--threads", str(args.threads), "eval", "-c",
                       str(d / "config.yaml"), f"data.eval_seed={pe['seed']}", f"data.eval_per_tag={pe['per_tag']}",
                       "--lora", str(d / "checkpoints" / f"epoch_{epoch:06d}"), "--paired", "--json", str(out)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            gains.append(json.loads(out.read_text())["gain_over_base"])
            picked.append({"seed": s, "epoch": epoch, "seconds": secs})
        row = {"checkpoints": picked}
        for key in ("strict", "partial"):
            g = [x[key] for x in gains]
            m, h = mean_ci(g)
            row[key] = {"per_seed": g, "mean": m, "half_width": h,
                        "vs_reference": welch_difference(g, [x[key] for x in ref_gain])}
        summary["arms"][arm] = row
        print(f"{arm} at ≤ {budget:.0f} s (epochs {[p['epoch'] for p in picked]}): strict "
              f"{row['strict']['mean']:+.3f} ± {row['strict']['half_width']:.3f}, trained reward "
              f"{row['partial']['mean']:+.3f} ± {row['partial']['half_width']:.3f}; − {ref}: strict "
              f"{row['strict']['vs_reference']['diff']:+.3f} ± {row['strict']['vs_reference']['half_width']:.3f}, "
              f"reward {row['partial']['vs_reference']['diff']:+.3f} ± {row['partial']['vs_reference']['half_width']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
