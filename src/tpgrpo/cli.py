"""Command line: ``tpgrpo train | eval | sample | compare | report | bench | serve-reward | export-lora |
pretrain-shapes | pretrain-reward``.

Configuration errors and bad input print one line naming the field or file and exit with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .io_checks import first_line

EXIT_BAD_INPUT = 2


def _fail(msg: str, code: int = EXIT_BAD_INPUT):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML preset (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="override single fields")


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 1000000], got {value}")
    return value


def cmd_train(args) -> int:
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume section.field=value`: an override, not a checkpoint
        args.resume = True
    cfg = load_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        _fail("--resume and --overwrite exclude each other")
    from .trainer import Trainer, TrainingAborted

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        _fail(first_line(e))
    try:
        summary = trainer.train()
    except (TrainingAborted, RuntimeError) as e:  # e.g. a reward server that went down mid-run
        _fail(str(e), 1)
    if not trainer.is_main:  # torchrun / accelerate launch: the main process reports
        return 0
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        print(f"test reward (partial) {before['partial']:.3f} -> {after['partial']:.3f}; "
              f"strict accuracy {before['strict']:.3f} -> {after['strict']:.3f}")
    print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    import torch

    from .evaluation import evaluate, save_eval_grid
    from .io_checks import output_file
    from .models import load_model, model_sigmas
    from .prompts import load_prompt_source
    from .rewards import build_reward

    try:
        if args.grid:
            output_file("--grid", args.grid, (".png", ".jpg", ".jpeg"))
        if args.json:
            output_file("--json", args.json)
        model = load_model(cfg.model)
        source = load_prompt_source(cfg.data.eval_prompts, "data.eval_prompts")
        name = next(iter(cfg.reward.components()))
        reward = build_reward(name, **cfg.reward.options.get(name, {}))
        held = cfg.reward.held_out
        held_out = None if held is None else build_reward(held, **cfg.reward.options.get(held, {}))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        _fail(first_line(e))
    if args.paired and not args.lora:
        _fail("--paired needs --lora (the checkpoint to compare with the base model)")
    if args.lora:
        from .export import load_lora_into

        try:
            load_lora_into(model, cfg, args.lora)
        except (ValueError, FileNotFoundError) as e:
            _fail(f"--lora: {e}")
    sig = model_sigmas(model, cfg.sampling, cfg.sampling.eval_num_steps)

    def run_eval(m):  # the trainer's evaluation: same schedule, chunking and model-call batch
        with torch.no_grad():
            return evaluate(m, source, reward, sig, guidance_scale=cfg.sampling.guidance_scale,
                            per_tag=cfg.data.eval_per_tag, seed=cfg.data.eval_seed, max_batch=cfg.training.max_batch,
                            chunk=cfg.data.eval_batch_size, held_out=held_out)

    base = None
    if args.paired:
        from .export import adapters_disabled, has_lora

        if has_lora(model.transformer):  # the base model is the loaded one with its adapters off
            with adapters_disabled(model):
                base = run_eval(model)
        else:  # full fine-tuning replaced the weights: load the base model again
            base = run_eval(load_model(cfg.model))
    res = run_eval(model)
    shown = ("strict", "partial", "held_out", "held_out_name", "per_tag")
    out = {k: v for k, v in res.items() if k in shown + ("n",)}
    if base is not None:
        from .evaluation import paired_gain

        out["base"] = {k: v for k, v in base.items() if k in shown}
        out["gain_over_base"] = paired_gain(base, res)
    print(json.dumps(out, indent=2))
    if args.grid:
        save_eval_grid(res, Path(args.grid))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def cmd_sample(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .sample import run_sample

    try:
        index = run_sample(cfg, prompts_file=args.prompts, prompt_texts=args.prompt, lora=args.lora, raw=args.raw,
                           n_per_prompt=args.n_per_prompt, seed=args.seed, out=args.out, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, noise_level=args.noise_level)
    except (ValueError, FileNotFoundError) as e:
        _fail(first_line(e))
    except OSError as e:  # writing the images failed (disk full, permissions)
        _fail(f"--out: {e}", 1)
    print(f"wrote {len(index['images'])} images, index.json, index.csv and grid.png to {args.out}")
    return 0


def cmd_consolidate(args) -> int:
    from .checkpoint import CheckpointError, consolidate_checkpoint
    from .io_checks import output_file

    try:
        output_file("--out", args.out, (".safetensors",))
        out = consolidate_checkpoint(args.checkpoint, args.out, use_ema=not args.raw)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        return _fail(f"consolidate: {e}")
    print(f"wrote {out}")
    return 0


def cmd_pretrain(args) -> int:
    from .shapes.pretrain import PretrainConfig, pretrain

    try:
        cfg = PretrainConfig(out=args.out, export=args.export, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, warmup=args.warmup, seed=args.seed, threads=args.threads,
                             caption_noise=args.caption_noise, init=args.init, space=args.space,
                             ae_steps=args.ae_steps, width=args.width, layers=args.layers)
    except ValueError as e:
        return _fail(f"pretrain-shapes: {e}")
    pretrain(cfg)
    return 0


def cmd_pretrain_reward(args) -> int:
    from .shapes.pretrain_reward import RewardPretrainConfig, pretrain_reward

    try:
        cfg = RewardPretrainConfig(out=args.out, export=args.export, base=args.base, steps=args.steps,
                                   batch_size=args.batch_size, pairs=args.pairs, lr=args.lr, seed=args.seed,
                                   pool_per_prompt=args.pool_per_prompt, threads=args.threads,
                                   pref_weight=args.pref_weight, warmup=args.warmup, init=args.init,
                                   agreement_groups=args.agreement_groups,
                                   agreement_per_group=args.agreement_per_group)
    except ValueError as e:
        return _fail(f"pretrain-reward: {e}")
    try:
        pretrain_reward(cfg)
    except (ValueError, FileNotFoundError) as e:
        return _fail(f"pretrain-reward: {first_line(e)}")
    return 0


def cmd_bench(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .bench import METHOD_PRESETS, run_bench

    presets = None
    if args.preset:
        presets = {}
        for item in args.preset:
            name, sep, path = item.partition("=")
            if not sep or name not in METHOD_PRESETS:
                return _fail(f"bench: --preset {item!r}: expected METHOD=CONFIG with METHOD one of "
                             f"{', '.join(METHOD_PRESETS)}")
            if not Path(path).is_file():
                return _fail(f"bench: --preset {item!r}: config file not found: {path}")
            presets[name] = path
    from .io_checks import output_file

    try:
        output_file("--out", args.out, (".json",))
    except ValueError as e:
        return _fail(f"bench: {e}")
    run_bench(cfg, out_json=Path(args.out), repeats=args.repeats, presets=presets, overrides=args.overrides)
    return 0


def cmd_compare(args) -> int:
    from .compare import CompareSpec, run_all, write_report

    try:
        spec = CompareSpec.load(args.spec).select(args.arms, args.seeds)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    failed = []
    if not args.report_only:
        try:
            failed = run_all(spec, Path(args.runs_dir), jobs=args.jobs, threads=args.threads_per_run,
                             extra=args.overrides, scale=args.scale)
        except (ValueError, FileNotFoundError) as e:
            _fail(first_line(e))
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)} (their logs are in the run directories)",
                  file=sys.stderr)
    try:
        write_report(spec, Path(args.runs_dir), Path(args.out))
    except FileNotFoundError as e:
        _fail(str(e), 1)
    print(f"report: {Path(args.out) / 'compare.md'}")
    return 1 if failed else 0


def cmd_report(args) -> int:
    from .report import write_run_report

    try:
        out = write_run_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    print(f"report: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tpgrpo", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train with the configured method (default: TP-GRPO on the shapes world)")
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the latest checkpoint of run_dir, or from the given checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run_dir that holds another run, removing that run's files")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (optionally with a trained checkpoint's LoRA)")
    _add_config_args(p)
    p.add_argument("--lora", help="checkpoint whose LoRA (EMA) weights to evaluate: a checkpoint directory, a run "
                   "directory (its newest checkpoint) or a checkpoints/latest file")
    p.add_argument("--grid", help="write an image grid PNG here")
    p.add_argument("--json", help="write the scores as JSON here")
    p.add_argument("--paired", action="store_true",
                   help="also evaluate the base model on the same prompts and seeds and report the gain with its "
                        "paired standard error")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sample", help="generate images from the base model, a run/checkpoint or an exported LoRA")
    _add_config_args(p)
    p.add_argument("--prompts", help="prompt file (one prompt a line) or shapes:train / shapes:test")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--lora", help="a run directory, checkpoint directory or checkpoints/latest (EMA weights), or "
                   "export-lora's output (pytorch_lora_weights.safetensors, or transformer/ of full fine-tuning)")
    p.add_argument("--raw", action="store_true", help="with a checkpoint: its raw trained weights instead of the EMA")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses a seed derived from (SEED, i, j)")
    p.add_argument("--out", default="samples", help="output directory (PNGs, index.json, index.csv, grid.png)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: sampling.eval_num_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: sampling.guidance_scale)")
    p.add_argument("--sampler", choices=("ode", "sde", "cps", "dance"), default="ode",
                   help="ode: the deterministic evaluation sampler; sde / cps / dance: that stochastic step on every "
                        "step but the last")
    p.add_argument("--noise-level", type=float, default=None,
                   help="noise level of a stochastic sampler (default: sampling.noise_level)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("compare", help="run methods × seeds at equal epochs and write a comparison report")
    p.add_argument("spec", nargs="?", default="configs/compare_latent.yaml", help="comparison spec (YAML)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides for every run")
    p.add_argument("--runs-dir", default="runs/compare", help="where the runs go (one directory per arm and seed)")
    p.add_argument("--out", default="runs/compare/report", help="where summary.json, compare.md and plots go")
    p.add_argument("--arms", nargs="+", help="only these arms")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--jobs", type=_positive_int, default=1, help="runs at a time")
    p.add_argument("--threads-per-run", type=_positive_int, default=1, help="torch/OpenMP threads of each run")
    p.add_argument("--scale", type=_positive_int, default=1,
                   help="S× the samples per update at the same number of updates (prompts per epoch and "
                        "training.train_batch_size × S; for a GPU)")
    p.add_argument("--report-only", action="store_true", help="do not train; summarise the finished runs")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("report", help="write a self-contained HTML page for one run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("bench", help="measure model calls, overheads and epoch costs (writes JSON + markdown)")
    _add_config_args(p)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--preset", action="append", metavar="METHOD=CONFIG",
                   help="benchmark METHOD (flow_grpo, dance_grpo, tempflow_grpo) on this preset, with --config's "
                        "model and the same overrides; repeatable; when given, only the named methods run beside "
                        "TP-GRPO (default: every method on its shapes preset)")
    p.set_defaults(fn=cmd_bench)

    from .export import add_export_lora_parser
    from .reward_server import add_serve_reward_parser

    add_serve_reward_parser(sub)
    add_export_lora_parser(sub)

    p = sub.add_parser("consolidate", help="write a checkpoint's trained weights (sharded or not) as one safetensors "
                                           "file of full tensors")
    p.add_argument("checkpoint", help="checkpoint directory, run directory or checkpoints/latest")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--raw", action="store_true", help="the raw trained weights instead of their EMA")
    p.set_defaults(fn=cmd_consolidate)

    p = sub.add_parser("pretrain-shapes", help="pretrain the built-in shapes base model (resumable)")
    p.add_argument("--out", default="pretrain")
    p.add_argument("--export", default=None, help="final safetensors path (default: OUT/shapes_base.safetensors)")
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-noise", type=float, default=0.0,
                   help="probability that a caption describes a neighbouring prompt's scene (one slot changed)")
    p.add_argument("--init", default=None, help="start from these safetensors weights (a fine-tuning stage)")
    p.add_argument("--space", default="latent", choices=("latent", "pixel"),
                   help="latent: autoencoder, then a flow model on its 4x8x8 latents (default); pixel: on 3x32x32 pixels")
    p.add_argument("--ae-steps", type=int, default=3000, help="autoencoder training steps (latent space)")
    p.add_argument("--width", type=int, default=128, help="flow transformer width (a multiple of 32)")
    p.add_argument("--layers", type=int, default=6, help="flow transformer depth")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("pretrain-reward", help="train the built-in world's learned reward (shapes_pref) on renders "
                                               "and on the base model's rule-ranked samples (resumable)")
    p.add_argument("--out", default="pretrain_reward", help="work directory (pool, state, log, agreement.json)")
    p.add_argument("--export", default=None, help="final safetensors path (default: OUT/shapes_pref.safetensors)")
    p.add_argument("--base", default="latent", help="base model whose samples are ranked (latent, or a .safetensors)")
    p.add_argument("--steps", type=_positive_int, default=1500)
    p.add_argument("--batch-size", type=_positive_int, default=96, help="distinct train prompts per step (x2 with "
                                                                        "their neighbours)")
    p.add_argument("--pairs", type=_positive_int, default=128, help="preference pairs per step")
    p.add_argument("--pool-per-prompt", type=_positive_int, default=24, help="base-model samples per train prompt")
    p.add_argument("--pref-weight", type=float, default=1.0, help="weight of the preference (Bradley-Terry) loss "
                                                                  "beside the contrastive one")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--init", default=None, help="start from these weights (a preference fine-tuning stage)")
    p.add_argument("--agreement-groups", type=_positive_int, default=8,
                   help="agreement measurement: prompt groups per tag and split")
    p.add_argument("--agreement-per-group", type=_positive_int, default=16,
                   help="agreement measurement: base-model samples per group")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_pretrain_reward)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args.threads)
    try:
        code = args.fn(args)
        if "WORLD_SIZE" in os.environ:  # leave a torchrun / accelerate process group cleanly
            from .distributed import shutdown

            shutdown()
        return code
    except ConfigError as e:
        _fail(str(e).removeprefix("error: "))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
