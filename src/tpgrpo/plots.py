"""Figures written into the run directory: the reward curve and TP-GRPO's turning-point diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(metrics_path: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one JSON object per line). A last line that a crash cut short is
    dropped; any other bad line is a one-line error."""
    lines = [(i, ln) for i, ln in enumerate(Path(metrics_path).read_text(errors="replace").splitlines(), 1)
             if ln.strip()]
    recs = []
    for k, (i, ln) in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if k + 1 == len(lines):
                break
            raise ValueError(f"{metrics_path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{metrics_path}:{i}: not a JSON object")
        recs.append(rec)
    return recs


def plot_reward_curve(metrics_path: Path, out: Path) -> None:
    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    tr = [(r["epoch"], r["reward_mean"]) for r in recs if "reward_mean" in r]
    if tr:
        ax.plot(*zip(*tr), label="train reward (partial)", color="tab:blue", alpha=0.7)
    ev = [(r["epoch"], r["eval"]["partial"], r["eval"]["strict"]) for r in recs if "eval" in r]
    if ev:
        e, p, s = zip(*ev)
        ax.plot(e, p, "o-", label="test reward (partial, EMA)", color="tab:green")
        ax.plot(e, s, "s--", label="test strict accuracy (EMA)", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_turning_points(metrics_path: Path, last: tuple[np.ndarray, np.ndarray], out: Path) -> None:
    """Left: turning-point rate per window step (latest epoch, before/after balancing) and mean |r_t|, |g_t|.
    Right: R_k curves of a few trajectories with their (kept) turning points marked."""
    recs = [r for r in read_metrics(metrics_path) if "tp" in r]
    if not recs:
        return
    tp = recs[-1]["tp"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(1, len(tp["tp_rate_per_step"]) + 1)
    a1.bar(steps - 0.2, tp["tp_rate_per_step"], 0.4, label="TP rate before balancing")
    a1.bar(steps + 0.2, tp["tp_rate_per_step_after"], 0.4, label="after balancing")
    a1b = a1.twinx()
    a1b.plot(steps, tp["mean_abs_r_per_step"], "k.-", label="mean |r_t|")
    a1b.plot(steps, tp["mean_abs_g_per_step"], "m.-", label="mean |g_t|")
    a1.set_xlabel("window step t")
    a1.set_title(f"epoch {recs[-1]['epoch']}: +{tp['num_pos_after']}/−{tp['num_neg_after']} kept "
                 f"(of +{tp['num_pos_before']}/−{tp['num_neg_before']})", fontsize=9)
    a1.legend(loc="upper left", fontsize=7)
    a1b.legend(loc="upper right", fontsize=7)
    R, is_tp = last
    for n in range(R.shape[0]):
        line, = a2.plot(np.arange(R.shape[1]), R[n], ".-", alpha=0.8)
        ks = np.nonzero(is_tp[n])[0] + 1
        a2.plot(ks, R[n][ks], "*", ms=12, color=line.get_color())
    a2.set_xlabel("k (window steps taken before ODE completion)")
    a2.set_ylabel("R_k")
    a2.set_title("R_k of a few trajectories; ★ = turning point (kept)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
