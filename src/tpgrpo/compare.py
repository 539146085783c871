"""``tpgrpo compare``: several methods ("arms") × seeds at equal epochs, then one report (docs/design.md §9, issue 7).

A comparison spec (YAML, e.g. ``configs/compare_shapes.yaml``) names the seeds, the overrides common to every run,
the arms (a preset plus overrides each) and the reference arm::

    seeds: [0, 1, 2]
    common: [training.epochs=30, training.eval_every=5]
    reference: flow_grpo
    arms:
      flow_grpo: {config: configs/flow_grpo_shapes.yaml}
      tpgrpo_def41: {config: configs/tpgrpo_shapes.yaml, overrides: [tpgrpo.consistent=false]}

Each (arm, seed) is an ordinary ``tpgrpo train`` run in ``RUNS_DIR/ARM/seedS``, started as a subprocess with
``OMP_NUM_THREADS = threads`` and ``jobs`` of them at a time. A finished run is skipped and an interrupted one
resumed, so ``compare`` can be re-run until everything is done. The summary reads only the runs' ``metrics.jsonl``:
test reward (partial credit) and strict accuracy against epoch and against training wall-clock time (the sum of
the epochs' ``time_epoch``; evaluation time excluded), means and sample standard deviations over seeds, the gain over
the base model, a Welch t-test of each arm's final reward against the reference's, and the epochs and seconds each
arm needs to reach the reference's final mean. Outputs: ``summary.json``, ``compare.md`` and two PNG figures.

With ``paired_eval: {seed: S, per_tag: N}`` each finished run's last checkpoint is also evaluated against the base
model on the same 6·N test images (``tpgrpo eval --paired``, ``RUN/paired_eval.json``), and the report gives each
arm's gains with a 95 % t interval over seeds and its difference from the reference with a 95 % Welch interval.
``--scale S`` multiplies every arm's samples per update (prompts per epoch and ``train_batch_size``) by S.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .checkpoint import find_latest_checkpoint
from .config import load_yaml
from .plots import read_metrics


@dataclass
class Arm:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class CompareSpec:
    arms: list[Arm]
    seeds: list[int]
    common: list[str]
    reference: str
    paired_eval: dict | None = None  # {seed, per_tag}: each finished run's paired evaluation against the base model

    @classmethod
    def load(cls, path: str | Path) -> "CompareSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: comparison spec not found")
        try:
            raw = load_yaml(path.read_text(encoding="utf-8-sig")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid YAML comparison spec ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        unknown = set(raw) - {"arms", "seeds", "common", "reference", "paired_eval"}
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
        if not isinstance(raw.get("arms"), dict) or not raw["arms"]:
            raise ValueError(f"{path}: 'arms' must map arm names to {{config, overrides}}")
        arms = []
        for name, a in raw["arms"].items():
            if not isinstance(a, dict) or "config" not in a:
                raise ValueError(f"{path}: arms.{name} needs a 'config'")
            if set(a) - {"config", "overrides"}:
                raise ValueError(f"{path}: arms.{name}: unknown key(s) {sorted(set(a) - {'config', 'overrides'})}")
            arms.append(Arm(str(name), str(a["config"]), [str(o) for o in a.get("overrides") or []]))
        seeds = raw.get("seeds", [0, 1, 2])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{path}: 'seeds' must be a non-empty list of integers")
        reference = raw.get("reference", arms[0].name)
        if reference not in {a.name for a in arms}:
            raise ValueError(f"{path}: reference {reference!r} is not one of the arms")
        paired = raw.get("paired_eval")
        if paired is not None:
            if not isinstance(paired, dict) or set(paired) - {"seed", "per_tag"} or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= (1 if k == "per_tag" else 0)
                    for k, v in paired.items()):
                raise ValueError(f"{path}: 'paired_eval' must be {{seed: int >= 0, per_tag: int >= 1}}")
            paired = {"seed": 0, "per_tag": 128, **paired}
        return cls(arms, seeds, [str(o) for o in raw.get("common") or []], reference, paired)

    def select(self, arms: list[str] | None, seeds: list[int] | None) -> "CompareSpec":
        names = {a.name for a in self.arms}
        for a in arms or []:
            if a not in names:
                raise ValueError(f"--arms: {a!r} is not an arm of the spec ({', '.join(sorted(names))})")
        chosen = [a for a in self.arms if not arms or a.name in arms]
        return CompareSpec(chosen, seeds or self.seeds, self.common, self.reference, self.paired_eval)


# --- running ---------------------------------------------------------------------------------------------------

def run_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics records; none if it has not started."""
    p = Path(run_dir) / "metrics.jsonl"
    return read_metrics(p) if p.is_file() else []


def _epochs_of(run_dir: Path) -> int | None:
    cfg = Path(run_dir) / "config.yaml"
    return (load_yaml(cfg.read_text()) or {}).get("training", {}).get("epochs") if cfg.is_file() else None


def is_finished(run_dir: Path, recs: list[dict] | None = None) -> bool:
    """Whether the run reached its configured last epoch and evaluated there (``recs``: its records, if read)."""
    recs = run_metrics(run_dir) if recs is None else recs
    epochs = _epochs_of(run_dir)
    return bool(recs) and epochs is not None and recs[-1].get("epoch") == epochs and "eval" in recs[-1]


def train_command(arm: Arm, seed: int, run_dir: Path, common: list[str], extra: list[str], threads: int,
                  resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "tpgrpo.cli", "--threads", str(threads), "train", "-c", arm.config,
           *common, *arm.overrides, *extra, f"seed={seed}", f"run_dir={run_dir}"]
    return cmd + (["--resume"] if resume else [])


PAIRED_EVAL = "paired_eval.json"


def paired_eval_command(run_dir: Path, paired: dict, threads: int) -> list[str]:
    """``tpgrpo eval --paired`` of the run's last checkpoint (EMA weights) against the base model on
    ``per_tag`` fresh test prompts per tag with evaluation seed ``seed``; written to ``RUN/paired_eval.json``."""
    return [sys.executable, "-m", "tpgrpo.cli", "--threads", str(threads), "eval", "-c", str(run_dir / "config.yaml"),
            f"data.eval_seed={paired['seed']}", f"data.eval_per_tag={paired['per_tag']}", "--lora", str(run_dir),
            "--paired", "--json", str(run_dir / PAIRED_EVAL)]


def scaled_overrides(arm: Arm, common: list[str], extra: list[str], scale: int) -> list[str]:
    """Overrides that multiply an arm's samples per update by ``scale`` at the same number of updates: prompts per
    epoch and samples per optimizer step (``train_batch_size``) both × scale, as resolved from the arm's preset."""
    if scale == 1:
        return []
    from .config import load_config

    t = load_config(arm.config, [*common, *arm.overrides, *extra]).training
    return [f"training.prompts_per_epoch={t.prompts_per_epoch * scale}",
            f"training.train_batch_size={t.train_batch_size * scale}"]


def run_all(spec: CompareSpec, runs_dir: Path, *, jobs: int = 1, threads: int = 1, extra: list[str] = (),
            scale: int = 1, echo=print) -> list[str]:
    """Run every missing (arm, seed), at ``scale``× the samples per update; returns the names of runs that
    failed."""
    runs_dir = Path(runs_dir)
    todo = []
    for arm in spec.arms:
        arm_extra = [*extra, *scaled_overrides(arm, spec.common, list(extra), scale)]
        for seed in spec.seeds:
            d = runs_dir / arm.name / f"seed{seed}"
            train = None
            if is_finished(d):
                echo(f"done already: {arm.name} seed {seed}")
            else:
                resume = find_latest_checkpoint(d) is not None
                train = train_command(arm, seed, d, spec.common, arm_extra, threads, resume)
            evaluate = spec.paired_eval is not None and not (d / PAIRED_EVAL).is_file()
            if train or evaluate:
                evaluation = paired_eval_command(d, spec.paired_eval, threads) if evaluate else None
                todo.append((arm, seed, d, train, evaluation))

    def one(item) -> str | None:
        arm, seed, d, train, evaluate = item
        d.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for what, cmd, log_name in (("training", train, "train.log"),
                                    ("paired evaluation", evaluate, "paired_eval.log")):
            if cmd is None:
                continue
            t0 = time.perf_counter()
            with open(d / log_name, "a") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            echo(f"{what} {'finished' if rc == 0 else f'FAILED (exit {rc})'}: {arm.name} seed {seed} "
                 f"in {time.perf_counter() - t0:.0f} s (log: {d / log_name})")
            if rc:
                return f"{arm.name}/seed{seed}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [f for f in pool.map(one, todo) if f]


# --- summarising -----------------------------------------------------------------------------------------------

def run_curve(recs: list[dict]) -> dict:
    """Per evaluation: epoch, training seconds so far, partial reward, strict accuracy, per-tag strict."""
    elapsed, out = 0.0, {"epoch": [], "seconds": [], "partial": [], "strict": [], "per_tag": []}
    for r in sorted(recs, key=lambda r: r["epoch"]):
        elapsed += r.get("time_epoch", 0.0)
        if "eval" in r:
            out["epoch"].append(r["epoch"])
            out["seconds"].append(elapsed)
            out["partial"].append(r["eval"]["partial"])
            out["strict"].append(r["eval"]["strict"])
            out["per_tag"].append({k: v["strict"] for k, v in r["eval"].get("per_tag", {}).items()})
    return out


def run_diagnostics(recs: list[dict]) -> dict:
    """Epoch averages of what the credit assignment saw: samples dropped for all-zero advantages, the train reward's
    within-batch std and, for TP-GRPO, the turning-point rate and mean |r_t| per window step."""
    tr = [r for r in recs if "reward_mean" in r]
    out = {"dropped_samples": float(np.mean([r.get("dropped_samples", 0) for r in tr])) if tr else None,
           "train_reward_std": float(np.mean([r.get("reward_std", 0) for r in tr])) if tr else None}
    zero = [r["adv_zero_per_step"] for r in tr if r.get("adv_zero_per_step")]
    if zero:
        out["adv_zero_per_step"] = np.mean(zero, axis=0).tolist()
    tp = [r["tp"] for r in tr if "tp" in r]
    if tp:
        out["tp_rate"] = float(np.mean([t["tp_rate"] for t in tp]))
        for key in ("mean_abs_r_per_step", "r_zero_per_step", "tp_rate_per_step", "tp_rate_per_step_after"):
            if all(key in t for t in tp):
                out[key] = np.mean([t[key] for t in tp], axis=0).tolist()
    return out


def _mean_std(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _seed_std(per_seed: np.ndarray) -> list[float]:
    """Sample std over seeds (rows) at each evaluation (columns); 0 with a single seed."""
    return per_seed.std(0, ddof=1).tolist() if len(per_seed) > 1 else [0.0] * per_seed.shape[1]


def mean_ci(x, level: float = 0.95) -> tuple[float, float]:
    """Mean of the per-seed values and the half-width of its t confidence interval (nan for one seed)."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def welch_difference(a, b, level: float = 0.95) -> dict | None:
    """mean(a) − mean(b) with its Welch (unequal-variance) confidence interval half-width and two-sided p."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    diff = float(a.mean() - b.mean())
    if se == 0:
        return {"diff": diff, "half_width": 0.0, "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "half_width": float(stats.t.ppf(0.5 + level / 2, df) * se),
            "p": float(2 * stats.t.sf(abs(diff) / se, df))}


def paired_summary(runs_dir: Path, arm: str, seeds: list[int]) -> dict | None:
    """The runs' paired evaluations (``RUN/paired_eval.json``, written by ``tpgrpo eval --paired``): per-seed gains
    over the base model on the same images, their standard errors, and images gained / lost."""
    evals = {s: json.loads(p.read_text()) for s in seeds
             if (p := Path(runs_dir) / arm / f"seed{s}" / PAIRED_EVAL).is_file()}
    if not evals:
        return None
    gains = [e["gain_over_base"] for e in evals.values()]
    return {"seeds": sorted(evals), "images": gains[0]["n"],
            "base_strict": [e["base"]["strict"] for e in evals.values()],
            "strict_gain": [g["strict"] for g in gains], "strict_se": [g["strict_se"] for g in gains],
            "partial_gain": [g["partial"] for g in gains], "partial_se": [g["partial_se"] for g in gains],
            **({"held_out_gain": [g["held_out"] for g in gains]} if all("held_out" in g for g in gains) else {}),
            "gained": sum(g["strict_gained"] for g in gains), "lost": sum(g["strict_lost"] for g in gains)}


def summarise(spec: CompareSpec, runs_dir: Path) -> dict:
    from scipy import stats

    arms: dict = {}
    for arm in spec.arms:
        curves, diags = {}, []
        for seed in spec.seeds:
            d = Path(runs_dir) / arm.name / f"seed{seed}"
            recs = run_metrics(d)
            if is_finished(d, recs):
                curves[seed] = run_curve(recs)
                diags.append(run_diagnostics(recs))
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(c["epoch"]) for c in curves.values())))
        at = {s: {e: i for i, e in enumerate(c["epoch"])} for s, c in curves.items()}
        col = {k: np.array([[c[k][at[s][e]] for e in epochs] for s, c in curves.items()])
               for k in ("partial", "strict", "seconds")}
        tags = sorted(curves[next(iter(curves))]["per_tag"][-1])
        final_tag = {t: _mean_std([c["per_tag"][-1].get(t, np.nan) for c in curves.values()]) for t in tags}
        arms[arm.name] = {
            "seeds": sorted(curves), "epochs": epochs,
            "partial_mean": col["partial"].mean(0).tolist(),
            "partial_std": _seed_std(col["partial"]),
            "strict_mean": col["strict"].mean(0).tolist(),
            "strict_std": _seed_std(col["strict"]),
            "seconds_mean": col["seconds"].mean(0).tolist(),
            "final_partial": col["partial"][:, -1].tolist(), "final_strict": col["strict"][:, -1].tolist(),
            "base_partial": col["partial"][:, 0].tolist(), "base_strict": col["strict"][:, 0].tolist(),
            "gain_partial": (col["partial"][:, -1] - col["partial"][:, 0]).tolist(),
            "train_seconds": col["seconds"][:, -1].tolist(),
            "final_strict_per_tag": final_tag,
            "diagnostics": {k: (np.mean([d[k] for d in diags], axis=0).tolist() if diags[0].get(k) is not None
                                else None) for k in diags[0]},
            "paired": paired_summary(runs_dir, arm.name, sorted(curves)),
        }
    ref = arms.get(spec.reference)
    for name, a in arms.items():
        if ref is None:
            break
        target = ref["partial_mean"][-1]
        reach = [e for e, m in zip(a["epochs"], a["partial_mean"]) if m >= target and e > 0]
        reach_s = [s for s, m, e in zip(a["seconds_mean"], a["partial_mean"], a["epochs"]) if m >= target and e > 0]
        a["epochs_to_reference_final"] = reach[0] if reach else None
        a["seconds_to_reference_final"] = reach_s[0] if reach_s else None
        # at the reference's total training time: this arm's mean curve, linearly interpolated (None if it stops
        # earlier than that)
        t_ref = ref["seconds_mean"][-1]
        a["partial_at_reference_time"] = (float(np.interp(t_ref, a["seconds_mean"], a["partial_mean"]))
                                          if a["seconds_mean"][-1] >= t_ref else None)
        if name != spec.reference and len(a["final_partial"]) > 1 and len(ref["final_partial"]) > 1:
            t = stats.ttest_ind(a["final_partial"], ref["final_partial"], equal_var=False)
            a["welch_p_vs_reference"] = float(t.pvalue)
        if name != spec.reference and a["paired"] and ref["paired"]:
            for key in ("strict_gain", "partial_gain"):
                a["paired"][f"{key}_vs_reference"] = welch_difference(a["paired"][key], ref["paired"][key])
    return {"reference": spec.reference, "seeds": spec.seeds, "common": spec.common, "paired_eval": spec.paired_eval,
            "arms_spec": {a.name: {"config": a.config, "overrides": a.overrides} for a in spec.arms}, "arms": arms}


def _fmt(ms: tuple[float, float] | list, digits: int = 3) -> str:
    if isinstance(ms, list):
        if len(ms) == 1:
            return f"{ms[0]:.{digits}f} (1 seed)"
        ms = _mean_std(ms)
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(summary: dict) -> str:
    arms, ref = summary["arms"], summary["reference"]
    lines = [f"Seeds {summary['seeds']}; overrides common to every run: `{' '.join(summary['common']) or '—'}`. "
             "Mean ± sample std over seeds. Training time excludes evaluation.", "",
             "| arm | overrides | test reward (partial) | gain over base | strict accuracy | training time (s) | "
             f"epochs to {ref}'s final | reward at {ref}'s time | Welch p vs {ref} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        spec = summary["arms_spec"][name]
        ov = " ".join([Path(spec["config"]).stem, *spec["overrides"]])
        e2r = a.get("epochs_to_reference_final")
        at_t = a.get("partial_at_reference_time")
        p = a.get("welch_p_vs_reference")
        lines.append(f"| {name} | `{ov}` | {_fmt(a['final_partial'])} | {_fmt(a['gain_partial'], 3)} | "
                     f"{_fmt(a['final_strict'])} | {_fmt(a['train_seconds'], 0)} | "
                     f"{e2r if e2r is not None else 'not reached'} | "
                     f"{f'{at_t:.3f}' if at_t is not None else '—'} | {f'{p:.2f}' if p is not None else '—'} |")
    tags = sorted({t for a in arms.values() for t in a["final_strict_per_tag"]})
    lines += ["", "Final strict accuracy per tag (mean over seeds):", "",
              "| arm | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(f"{a['final_strict_per_tag'][t][0]:.3f}" for t in tags) + " |")
    lines += ["", "What the credit assignment saw (averages over epochs and seeds): samples dropped per epoch because all "
              "their advantages were 0; the within-batch std of the train reward; per window step, the fraction of "
              "advantages exactly 0; TP-GRPO's turning-point rate, and per window step its mean |r_t| and the "
              "fraction of incremental rewards r_t exactly 0.", "",
              "| arm | dropped samples / epoch | train reward std | advantage = 0, per step | turning-point rate | "
              "mean abs r_t per step | r_t = 0, per step |",
              "|---|---|---|---|---|---|---|"]

    def per_step(x, fmt="{:.2f}"):
        return " ".join(fmt.format(v) for v in x) if x else "—"

    for name, a in arms.items():
        d = a["diagnostics"]
        tp_rate = f"{d['tp_rate']:.3f}" if d.get("tp_rate") is not None else "—"
        dropped = f"{d['dropped_samples']:.1f}" if d.get("dropped_samples") is not None else "—"
        r_std = f"{d['train_reward_std']:.3f}" if d.get("train_reward_std") is not None else "—"
        lines.append(f"| {name} | {dropped} | {r_std} | {per_step(d.get('adv_zero_per_step'))} | {tp_rate} | "
                     f"{per_step(d.get('mean_abs_r_per_step'))} | {per_step(d.get('r_zero_per_step'))} |")
    return "\n".join(lines + paired_markdown(summary)) + "\n"


def paired_markdown(summary: dict) -> list[str]:
    """The paired-evaluation table: strict gain over the base model per seed (± its standard error over images),
    the mean over seeds with a 95 % t interval, and the difference from the reference arm with a 95 % Welch
    interval."""
    arms, ref = summary["arms"], summary["reference"]
    rows = {n: a["paired"] for n, a in arms.items() if a.get("paired")}
    if not rows:
        return []
    pe = summary.get("paired_eval") or {}
    images = next(iter(rows.values()))["images"]
    lines = ["", "Paired evaluation of each run's last checkpoint (EMA) against the base model on the same "
             f"{images} "
             f"test images (evaluation seed {pe.get('seed', '?')}): strict-accuracy gain per seed ± its standard "
             "error over images; the mean over seeds with a 95 % t interval; the gain in the trained reward's "
             "primary score (partial credit, or a learned reward's score) likewise; the differences from "
             f"{ref}'s mean gains with 95 % Welch intervals.", "",
             "| arm | strict gain per seed | strict gain [95 % CI] | trained-reward gain [95 % CI] | images gained / lost "
             f"| strict − {ref} [95 % CI] | p | trained reward − {ref} [95 % CI] |",
             "|---|---|---|---|---|---|---|---|"]

    def interval(x):
        m, h = mean_ci(x)
        return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]" if np.isfinite(h) else f"{m:+.3f}"

    def difference(d):
        return f"{d['diff']:+.3f} [{d['diff'] - d['half_width']:+.3f}, {d['diff'] + d['half_width']:+.3f}]" if d else "—"

    for name, p in rows.items():
        per_seed = ", ".join(f"{g:+.3f} ± {se:.3f}" for g, se in zip(p["strict_gain"], p["strict_se"]))
        d = p.get("strict_gain_vs_reference")
        pv = f"{d['p']:.3f}" if d else "—"
        lines.append(f"| {name} | {per_seed} | {interval(p['strict_gain'])} | {interval(p['partial_gain'])} | "
                     f"{p['gained']} / {p['lost']} | {difference(d)} | {pv} | "
                     f"{difference(p.get('partial_gain_vs_reference'))} |")
    return lines


def plot(summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    paths = []
    for xkey, xlabel, fname in (("epochs", "epoch", "compare_epoch.png"),
                                ("seconds_mean", "training wall-clock (s, mean over seeds)", "compare_time.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, title in ((axes[0], "partial", "test reward (partial credit)"),
                                  (axes[1], "strict", "test strict accuracy")):
            for name, a in arms.items():
                x = np.asarray(a[xkey], dtype=float)
                m, s = np.asarray(a[f"{metric}_mean"]), np.asarray(a[f"{metric}_std"])
                ax.plot(x, m, "o-", ms=3, label=f"{name} (n={len(a['seeds'])})")
                ax.fill_between(x, m - s, m + s, alpha=0.15)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        p = Path(out_dir) / fname
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(spec: CompareSpec, runs_dir: Path, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(spec, runs_dir)
    if not summary["arms"]:
        raise FileNotFoundError(f"{runs_dir}: no finished runs to summarise")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary)
    figs = plot(summary, out_dir)
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figs) + "\n"
    (out_dir / "compare.md").write_text(md)
    return summary
