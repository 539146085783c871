"""``tpgrpo bench``: what the lockstep engine and each method cost, measured within one run (docs/design.md §9).

* model evaluations per sample (TP-GRPO lockstep, TP-GRPO one-at-a-time, Flow-GRPO);
* rollout time against the "bare" cost: the sum, over the rollout's transformer invocations, of the median time
  of one bare invocation with the same number of rows — the ratio is the overhead of step math, bookkeeping and
  copies (target ≤ 1.1);
* lockstep against one-state-at-a-time completion;
* a TP-GRPO epoch (sample, score, credit, optimise) against a Flow-GRPO epoch at the same settings (target ≤ 2.0
  on CPU, ≤ 1.6 on a GPU); the epoch's time split; throughput in samples per second;
* on a GPU, the peak GPU memory of each rollout and of each epoch's optimisation phase;
* the throughput of the run's reward(s) on the images a TP-GRPO epoch scores (finals and completions).

The first run of every rollout variant is its warm-up (and the one whose calls and memory are counted); then the
variants are run ``repeats`` times, interleaved, and medians are reported. On a GPU every timed region ends with a
synchronisation. Output: JSON and a markdown table next to it.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .config import Config
from .trainer import Trainer


def _now() -> float:
    """Wall clock after the GPU (if any) has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_gpu_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{torch.get_num_threads()} CPU threads"


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = _now()
        fn()
        ts.append(_now() - t0)
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


def _reward_throughput(trainer: Trainer, parts, prompts: list[str], repeats: int) -> dict[str, dict]:
    """Images per second of each reward the run trains on (and of its held-out reward) on the images a TP-GRPO
    epoch scores: the final images and every ODE completion, decoded once beforehand (decoding is not timed)."""
    lat = torch.cat([torch.cat([ro.final_latents[:, None], ro.fork_latents], 1) for ro in parts])
    images = trainer.model.decode(lat.flatten(0, 1))
    texts = [p for p in prompts for _ in range(lat.shape[1])]
    scorers = dict(trainer.reward_fns)
    if trainer.held_out_fn is not None:
        scorers[f"{trainer.cfg.reward.held_out} (held out)"] = trainer.held_out_fn
    out = {}
    for name, fn in scorers.items():
        fn(images[:8], texts[:8])  # warm-up
        t = _median_time(lambda: fn(images, texts), repeats)
        out[name] = {"images": len(images), "seconds": t, "images_per_s": len(images) / t}
    return out


#: Presets whose sampling settings each method's benchmark uses (the given config is used for TP-GRPO).
METHOD_PRESETS = {"flow_grpo": "configs/flow_grpo_latent.yaml", "dance_grpo": "configs/dance_grpo_latent.yaml",
                  "tempflow_grpo": "configs/tempflow_grpo_latent.yaml",
                  "diffusion_nft": "configs/diffusion_nft_latent.yaml", "awm": "configs/awm_latent.yaml",
                  "mix_grpo": "configs/mix_grpo_latent.yaml", "flow_grpo_guard": "configs/flow_grpo_guard_latent.yaml"}
LABELS = {"tpgrpo": "TP-GRPO", "flow_grpo": "Flow-GRPO", "dance_grpo": "DanceGRPO", "tempflow_grpo": "TempFlow-GRPO",
          "diffusion_nft": "DiffusionNFT", "awm": "AWM", "mix_grpo": "MixGRPO",
          "flow_grpo_guard": "Flow-GRPO + GRPO-Guard"}


def _method_configs(cfg: Config, presets: dict[str, str] | None, overrides: list[str], tmp: Path) -> dict[str, Config]:
    """TP-GRPO on ``cfg``; every other method on its preset plus ``overrides``, with ``cfg``'s model."""
    from .config import load_config

    out = {"tpgrpo": cfg.model_copy(update={"algorithm": "tpgrpo", "run_dir": str(tmp / "tpgrpo")})}
    for name, path in (METHOD_PRESETS if presets is None else presets).items():
        if not Path(path).is_file() and (Path(__file__).parents[2] / path).is_file():  # run outside the checkout
            path = Path(__file__).parents[2] / path
        c = load_config(path, list(overrides))
        out[name] = c.model_copy(update={"model": cfg.model, "run_dir": str(tmp / name)})
    return out


def run_bench(cfg: Config, out_json: Path, repeats: int = 3, presets: dict[str, str] | None = None,
              overrides: list[str] = ()) -> dict:
    """Benchmark TP-GRPO on ``cfg`` and the other methods on ``presets`` (default :data:`METHOD_PRESETS`) with
    the same ``overrides``; writes ``out_json`` and a markdown table next to it."""
    from .rollout import make_generators

    tmp = Path(tempfile.mkdtemp(prefix="tpgrpo-bench-"))
    trainers = {k: Trainer(c, log_trackers=False) for k, c in _method_configs(cfg, presets, overrides, tmp).items()}
    tp = trainers["tpgrpo"]
    inputs = {k: tr.epoch_inputs(1) for k, tr in trainers.items()}

    def rollout(name, completion=None):
        prompts, _, _, window, noise, _ = inputs[name]
        gens = make_generators(range(len(prompts)))
        return trainers[name].rollouts(prompts, window, noise, gens, completion)

    # rollouts: TP-GRPO lockstep and one-state-at-a-time, every other method; the first run of each is its warm-up
    # (its calls and peak memory are recorded), then interleaved timed repeats, medians
    variants = {"tpgrpo": ("tpgrpo", None), "tpgrpo_sequential": ("tpgrpo", "sequential")}
    variants.update({k: (k, None) for k in trainers if k != "tpgrpo"})
    parts, rollout_peak = {}, {}
    with torch.no_grad():
        for v in variants:
            _reset_gpu_peak()
            parts[v] = rollout(*variants[v])
            rollout_peak[v] = _gpu_peak_gib()
        times = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:
                t0 = _now()
                rollout(*variants[v])
                times[v].append(_now() - t0)
    rollout_time = {k: statistics.median(v) for k, v in times.items()}
    cfg_rows = {v: 2 if trainers[variants[v][0]].cfg.sampling.guidance_scale != 1.0 else 1 for v in variants}
    rows = {r * cfg_rows[v] for v, p in parts.items() for ro in p for r in ro.call_rows}
    bare = _bare_call_times(tp, rows, max(repeats, 5))
    n = len(inputs["tpgrpo"][0])
    result: dict = {"config": {"samples": n, "num_steps": cfg.sampling.num_steps, "window": inputs["tpgrpo"][3],
                               "guidance_scale": cfg.sampling.guidance_scale, "max_batch": cfg.training.max_batch,
                               "sample_batch_size": cfg.training.sample_batch_size,
                               "threads": torch.get_num_threads(), "device": _device_name(),
                               "model": cfg.model.kind, "resolution": getattr(tp.model, "resolution", None)},
                    "rollout": {}}
    for v, p in parts.items():
        # final images scored: one per sample, plus TempFlow's children ([N, W, C, *latent])
        images = sum(ro.final_latents.shape[0] + (0 if ro.child_final_latents is None
                                                  else math.prod(ro.child_final_latents.shape[:3])) for ro in p)
        samples = len(inputs[variants[v][0]][0])
        ideal = sum(bare[r * cfg_rows[v]] for ro in p for r in ro.call_rows)
        result["rollout"][v] = {
            "samples": samples,
            "scored_images": images,
            "evaluations_per_sample": sum(ro.state_evaluations for ro in p) / samples,
            "transformer_invocations": sum(len(ro.call_rows) for ro in p),
            "rollout_s": rollout_time[v],
            "bare_calls_s": ideal,
            "overhead_ratio": rollout_time[v] / ideal,
            "samples_per_s": samples / rollout_time[v],
            "peak_gpu_gib": rollout_peak[v],
        }
    result["lockstep_speedup_vs_sequential"] = rollout_time["tpgrpo_sequential"] / rollout_time["tpgrpo"]
    result["reward_scoring"] = _reward_throughput(tp, parts["tpgrpo"], inputs["tpgrpo"][0], repeats)

    # whole epochs (sample, score, credit, optimise), interleaved over methods
    epoch_t = {k: [] for k in trainers}
    split = {k: [] for k in trainers}
    train_peak = {k: None for k in trainers}
    for rep in range(repeats):
        for name, tr in trainers.items():
            t0 = _now()
            batch, info = tr.collect(1 + rep)
            t1 = _now()
            _reset_gpu_peak()
            tr.optimise(batch, 1 + rep)
            t2 = _now()
            peak = _gpu_peak_gib()
            if peak is not None:
                train_peak[name] = max(peak, train_peak[name] or 0.0)
            epoch_t[name].append(t2 - t0)
            split[name].append({"rollout_s": info["time_rollout"], "score_s": info["time_score"],
                                "credit_s": info["time_credit"], "train_s": t2 - t1})
    result["epoch"] = {k: {"median_s": statistics.median(v),
                           **{p: statistics.median(x[p] for x in split[k]) for p in split[k][0]},
                           "samples_per_s": len(inputs[k][0]) / statistics.median(v),
                           "train_peak_gpu_gib": train_peak[k]}
                       for k, v in epoch_t.items()}
    flow = result["epoch"].get("flow_grpo", {}).get("median_s")
    result["epoch_cost_vs_flow_grpo"] = {k: e["median_s"] / flow for k, e in result["epoch"].items()} if flow else {}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = max(*rollout_peak.values(), *train_peak.values())
        result["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    md = markdown_table(result)
    out_json.with_suffix(".md").write_text(md)
    print(md)
    return result


def markdown_table(r: dict) -> str:
    c = r["config"]
    gpu = r.get("peak_gpu_gib") is not None
    model = f"{c['model']} model" + (f" at {c['resolution']}²" if c["resolution"] else "")
    lines = [
        f"Benchmark on {c['device']}, {model}: TP-GRPO on {c['samples']} samples, T = {c['num_steps']}, window steps "
        f"{c['window'][0]}–{c['window'][-1]}, CFG {c['guidance_scale']}, max batch {c['max_batch']}, sampling "
        f"micro-batch {c['sample_batch_size']}; the other methods on their presets.",
        "",
        "| rollout | samples | evaluations / sample | transformer calls | rollout time (s) | samples / s | bare calls (s) "
        "| overhead |" + (" peak GPU memory (GiB) |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for k, x in r["rollout"].items():
        label = "TP-GRPO, one state at a time" if k == "tpgrpo_sequential" else (
            "TP-GRPO, lockstep" if k == "tpgrpo" else LABELS.get(k, k))
        lines.append(f"| {label} | {x['samples']} | {x['evaluations_per_sample']:.0f} | {x['transformer_invocations']}"
                     f" | {x['rollout_s']:.2f} | {x['samples_per_s']:.2f} | "
                     f"{x['bare_calls_s']:.2f} | {x['overhead_ratio']:.3f} |"
                     + (f" {x['peak_gpu_gib']:.1f} |" if gpu else ""))
    lines += [
        "",
        f"Lockstep speed-up over one-state-at-a-time completion: {r['lockstep_speedup_vs_sequential']:.2f}×.",
        "",
        "| reward scoring (the final images and ODE completions of a TP-GRPO epoch) | images | seconds | images / s |",
        "|---|---|---|---|",
        *(f"| {k} | {x['images']} | {x['seconds']:.2f} | {x['images_per_s']:.0f} |"
          for k, x in r.get("reward_scoring", {}).items()),
        "",
        "| epoch | total (s) | rollout (s) | scoring (s) | credit (s) | training (s) | ÷ Flow-GRPO epoch |"
        + (" training peak GPU memory (GiB) |" if gpu else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for k, x in r["epoch"].items():
        ratio = r["epoch_cost_vs_flow_grpo"].get(k)
        lines.append(f"| {LABELS.get(k, k)} | {x['median_s']:.2f} | {x['rollout_s']:.2f} | {x['score_s']:.2f} | "
                     f"{x['credit_s']:.3f} | {x['train_s']:.2f} | {f'{ratio:.2f}' if ratio else '—'} |"
                     + (f" {x['train_peak_gpu_gib']:.1f} |" if gpu else ""))
    mem = f"Peak RSS {r['peak_rss_mib']:.0f} MiB"
    if gpu:
        mem += f"; peak GPU memory {r['peak_gpu_gib']:.1f} of {r['gpu_total_gib']:.0f} GiB"
    lines += ["", f"{mem}. Targets (docs/design.md §9): overhead ≤ 1.1; TP-GRPO epoch ≤ 2.0× Flow-GRPO's on CPU, ≤ 1.6× on a "
              "GPU.", ""]
    return "\n".join(lines)
