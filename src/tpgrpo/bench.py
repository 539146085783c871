"""``tpgrpo bench``: what the lockstep engine and each method cost, measured within one run (DESIGN §9).

* model evaluations per sample (TP-GRPO lockstep, TP-GRPO one-at-a-time, Flow-GRPO);
* rollout time against the "bare" cost: the sum, over the rollout's transformer invocations, of the median time
  of one bare invocation with the same number of rows — the ratio is the overhead of step math, bookkeeping and
  copies (target ≤ 1.1);
* lockstep against one-state-at-a-time completion;
* a TP-GRPO epoch (sample, score, credit, optimise) against a Flow-GRPO epoch at the same settings (target ≤ 2.0
  on CPU); the epoch's time split.

Measurements are interleaved and repeated; medians are reported. Output: JSON and a markdown table next to it.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .config import Config
from .trainer import Trainer


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _bare_call_times(trainer: Trainer, rows: set[int], repeats: int) -> dict[int, float]:
    """Median time of one transformer invocation with ``r`` rows (CFG pairs included as rows), per r."""
    model = trainer.model
    cond = trainer.embed(["a red circle"])
    out = {}
    for r in sorted(rows):
        x = torch.randn(r, *model.latent_shape())
        c = cond.expand(r)
        c = type(c)(c.hidden.contiguous(), c.pooled.contiguous())  # as the rollout's index-selected embeddings
        with torch.no_grad():
            model.raw_velocity(x, 0.5, c)  # warm-up
            out[r] = _median_time(lambda: model.raw_velocity(x, 0.5, c), repeats)
    return out


def run_bench(cfg: Config, out_json: Path, repeats: int = 3) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="tpgrpo-bench-"))
    tp = Trainer(cfg.model_copy(update={"algorithm": "tpgrpo", "run_dir": str(tmp / "tp")}), log_trackers=False)
    fg = Trainer(cfg.model_copy(update={"algorithm": "flow_grpo", "run_dir": str(tmp / "fg")}), log_trackers=False)
    cfg_rows = 2 if cfg.sampling.guidance_scale != 1.0 else 1
    prompts, _, _, window, noise, _ = tp.epoch_inputs(1)
    from .rollout import make_generators

    def rollout(trainer, completion=None):
        gens = make_generators(range(len(prompts)))
        return trainer.rollouts(prompts, window, noise, gens, completion)

    with torch.no_grad():
        rollout(tp)  # warm-up
        parts = {"lockstep": rollout(tp), "sequential": rollout(tp, "sequential"), "flow_grpo": rollout(fg)}
        times = {k: [] for k in parts}
        for _ in range(repeats):
            for k in parts:
                t0 = time.perf_counter()
                rollout(tp if k != "flow_grpo" else fg, "sequential" if k == "sequential" else None)
                times[k].append(time.perf_counter() - t0)
    rollout_time = {k: statistics.median(v) for k, v in times.items()}
    rows = {r * cfg_rows for p in parts.values() for ro in p for r in ro.call_rows}
    bare = _bare_call_times(tp, rows, max(repeats, 5))
    n = len(prompts)
    result: dict = {"config": {"samples": n, "num_steps": cfg.sampling.num_steps, "window": window,
                               "guidance_scale": cfg.sampling.guidance_scale, "max_batch": cfg.training.max_batch,
                               "sample_batch_size": cfg.training.sample_batch_size,
                               "threads": torch.get_num_threads()}}
    for k, p in parts.items():
        ideal = sum(bare[r * cfg_rows] for ro in p for r in ro.call_rows)
        result[k] = {
            "evaluations_per_sample": sum(ro.state_evaluations for ro in p) / n,
            "transformer_invocations": sum(len(ro.call_rows) for ro in p),
            "rollout_s": rollout_time[k],
            "bare_calls_s": ideal,
            "overhead_ratio": rollout_time[k] / ideal,
        }
    result["lockstep_speedup_vs_sequential"] = rollout_time["sequential"] / rollout_time["lockstep"]

    # whole epochs, interleaved
    epoch_t = {"tpgrpo": [], "flow_grpo": []}
    split = {}
    for rep in range(repeats):
        for name, tr in (("tpgrpo", tp), ("flow_grpo", fg)):
            t0 = time.perf_counter()
            batch, info = tr.collect(1 + rep)
            t1 = time.perf_counter()
            tr.optimise(batch, 1 + rep)
            epoch_t[name].append(time.perf_counter() - t0)
            split[name] = {"rollout_s": info["time_rollout"], "score_s": info["time_score"],
                           "credit_s": info["time_credit"], "train_s": time.perf_counter() - t1}
    result["epoch"] = {k: {"median_s": statistics.median(v), **split[k]} for k, v in epoch_t.items()}
    result["epoch_cost_ratio_tpgrpo_vs_flow_grpo"] = (result["epoch"]["tpgrpo"]["median_s"]
                                                      / result["epoch"]["flow_grpo"]["median_s"])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    md = markdown_table(result)
    out_json.with_suffix(".md").write_text(md)
    print(md)
    return result


def markdown_table(r: dict) -> str:
    c = r["config"]
    lines = [
        f"Benchmark: {c['samples']} samples, T = {c['num_steps']}, window steps {c['window'][0]}–{c['window'][-1]}, "
        f"CFG {c['guidance_scale']}, max batch {c['max_batch']}, sampling micro-batch {c['sample_batch_size']}, "
        f"{c['threads']} CPU threads.",
        "",
        "| rollout | evaluations / sample | transformer calls | rollout time (s) | bare calls (s) | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for k, label in (("lockstep", "TP-GRPO, lockstep"), ("sequential", "TP-GRPO, one state at a time"),
                     ("flow_grpo", "Flow-GRPO")):
        x = r[k]
        lines.append(f"| {label} | {x['evaluations_per_sample']:.0f} | {x['transformer_invocations']} | "
                     f"{x['rollout_s']:.2f} | {x['bare_calls_s']:.2f} | {x['overhead_ratio']:.3f} |")
    e = r["epoch"]
    lines += [
        "",
        f"Lockstep speed-up over one-state-at-a-time completion: {r['lockstep_speedup_vs_sequential']:.2f}×.",
        "",
        "| epoch | total (s) | rollout (s) | scoring (s) | credit (s) | training (s) |",
        "|---|---|---|---|---|---|",
    ]
    for k, label in (("tpgrpo", "TP-GRPO"), ("flow_grpo", "Flow-GRPO")):
        x = e[k]
        lines.append(f"| {label} | {x['median_s']:.2f} | {x['rollout_s']:.2f} | {x['score_s']:.2f} | "
                     f"{x['credit_s']:.3f} | {x['train_s']:.2f} |")
    lines += ["", f"TP-GRPO epoch / Flow-GRPO epoch: {r['epoch_cost_ratio_tpgrpo_vs_flow_grpo']:.2f} (target ≤ 2.0 on CPU). "
              f"Peak RSS {r['peak_rss_mib']:.0f} MiB.", ""]
    return "\n".join(lines)
