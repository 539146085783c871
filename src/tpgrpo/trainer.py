"""The training loop shared by every method: sample → score → credit → advantages → optimise; evaluation;
checkpoints; logging (docs/design.md §3, §10).

Determinism: everything random in epoch e (prompt choice, window start, initial and transition noise, shuffling)
derives from (seed, e), so a resumed run needs only weights, optimizer, EMA and counters to continue bit-exactly.

Data parallelism (docs/design.md §8, docs/scaling.md): with P processes, process r rolls out and scores the contiguous block
[r·N/P, (r+1)·N/P) of the epoch's N samples (same seeds as one process would use), rewards are all-gathered, credit is
computed on the full epoch identically everywhere, and each process trains the rows it owns of every global
micro-batch. The distributed engine (:mod:`tpgrpo.engine`: DDP through accelerate, or FSDP2) synchronises the
gradients; every process makes the same sequence of training calls. With one process every hook is the identity.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed as dist
from . import tracking
from .advantages import nonzero_advantage_mask
from .checkpoint import (CheckpointError, check_trained_tensors, clean_stale_temporaries, complete_checkpoints,
                         find_latest_checkpoint, is_sharded, load_checkpoint, resolve_checkpoint, save_checkpoint,
                         save_sharded_checkpoint, sync_latest)
from .config import Config, dump_config
from .ema import EMA
from .engine import Engine, bytes_held
from .evaluation import PER_IMAGE_KEYS, evaluate, save_eval_grid
from .export import add_lora, make_reference, prepare_full_finetune
from .loss import grpo_step_loss, guard_log_ratio, guard_step_weight
from .methods import Credit, ScoredRollout, build_method
from .models import load_model, model_sigmas
from .models.base import PromptEmbeds, encode_each
from .plots import plot_reward_curve, plot_turning_points, read_metrics
from .prompts import PromptSource, load_prompt_source
from .rewards import build_reward
from .rollout import RolloutPlan, initial_noise, make_generators, sample_rollout
from .sampling import kl_to_reference, log_prob, noise_scale, transition, transition_std


class TrainingAborted(RuntimeError):
    """A run that cannot continue (e.g. non-finite updates N times in a row); the message says why."""


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based): constant, or linear decay ``lr · (1 − (epoch − 1) / epochs)``.
    A function of the epoch alone, so a resumed run continues the schedule exactly."""
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - (epoch - 1) / epochs)
    raise ValueError(f"training.lr_schedule: unknown schedule {schedule!r}")


def _seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (independent of Python's hash randomisation)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class EpochBatch:
    """The epoch's trained transitions: M rows (samples, or TempFlow children) × W window steps.

    ``advantages`` and ``train_mask`` cover all M rows of the epoch; prompts, states, next_states and log_probs only
    the m rows this process owns, global rows [row_offset, row_offset + m) (all of them with one process)."""

    prompts: list[str]            # [m]
    window: list[int]
    states: torch.Tensor          # [m, W, *latent]  x before each trained transition
    next_states: torch.Tensor     # [m, W, *latent]  x after it (as sampled)
    log_probs: torch.Tensor       # [m, W] under the sampling policy
    advantages: torch.Tensor      # [M, W]
    step_weights: torch.Tensor | None = None  # [W]
    train_mask: torch.Tensor | None = None    # [M, W]
    row_offset: int = 0
    old_means: torch.Tensor | None = None     # [m, W, *latent] rollout transition means (GRPO-Guard)


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | bool | None = None, log_trackers: bool = True,
                 overwrite: bool = False):
        self.cfg = cfg
        dist.init()
        self._check_world(cfg)
        self.is_main = dist.is_main()
        self.run_dir = Path(cfg.run_dir)
        self._prepare_run_dir(resume, overwrite)
        torch.manual_seed(cfg.seed)
        self.model = load_model(cfg.model)
        self.model.requires_grad_(False)
        self.model.eval()
        self.velocity_ref = None
        if cfg.model.full_finetune:
            if cfg.training.beta > 0:  # a frozen copy of the base transformer, taken before any update
                self.velocity_ref = make_reference(self.model)
            prepare_full_finetune(self.model)
        else:
            self._add_lora()
            self.velocity_ref = make_reference(self.model)  # LoRA: the base model is the adapters switched off
        d = cfg.distributed
        self.engine = Engine(d.strategy, cpu_offload=d.cpu_offload, param_dtype=d.param_dtype)
        self.engine.shard(self.model.transformer)
        if getattr(self.velocity_ref, "transformer", None) is not None:  # full fine-tuning's frozen copy
            self.engine.shard(self.velocity_ref.transformer, gather=False)
        self.trainable = [p for p in self.model.transformer.parameters() if p.requires_grad]
        self.optimizer = self.engine.prepare(self.model.transformer, torch.optim.AdamW(
            self.trainable, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay))
        self.ema = EMA(self.trainable, cfg.training.ema_decay)
        self.reward_weights = cfg.reward.components()
        self.reward_fns = {name: build_reward(name, **cfg.reward.options.get(name, {})) for name in self.reward_weights}
        self.reward_fn = self.reward_fns[next(iter(self.reward_weights))]  # evaluation uses the first
        held = cfg.reward.held_out
        self.held_out_fn = None if held is None else build_reward(held, **cfg.reward.options.get(held, {}))
        self.train_source: PromptSource = load_prompt_source(cfg.data.train_prompts, "data.train_prompts")
        self.eval_source: PromptSource = load_prompt_source(cfg.data.eval_prompts, "data.eval_prompts")
        for field, src in (("data.train_prompts", self.train_source), ("data.eval_prompts", self.eval_source)):
            self._validate_prompts(field, src)
        self.train_source.check_tag_weights(cfg.data.tag_weights, "data.tag_weights")
        s = cfg.sampling
        self.sigmas = model_sigmas(self.model, s, s.num_steps)
        self.eval_sigmas = model_sigmas(self.model, s, s.eval_num_steps)
        self.method = build_method(cfg.algorithm, cfg)
        self.method.schedule = self.sigmas  # methods that need σ (TempFlow's noise-aware weights) use this one
        self.forward_process = getattr(self.method, "forward_process", False)  # DiffusionNFT, AWM: no window or log-probs
        # DiffusionNFT's old policy: a second copy of the trained weights, moved only at the end of each epoch
        self.old = EMA(self.trainable, 0.0) if getattr(self.method, "old_policy", None) == "decayed" else None
        if not self.forward_process:
            self._warn_near_deterministic_steps()
        self._embed_cache: dict[str, PromptEmbeds] = {}
        self.uncond = self.embed([""]) if getattr(self.model, "uses_cfg", True) else None
        self.epoch = 0
        self.optimizer_steps = 0
        self.nonfinite_in_row = 0
        self._stop_requested = False
        self.skip_zero_advantages = True
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._check_memory()
        if resume:
            self._resume(resume)
        elif self.metrics_path.exists() and self.is_main:
            self.metrics_path.unlink()
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.tracker = tracking.start_trackers(cfg, self.run_dir) if log_trackers and self.is_main else None

    # --- setup ------------------------------------------------------------------------------------------------
    #: what a run writes into its directory (removed by ``overwrite``)
    RUN_FILES = ("checkpoints", "metrics.jsonl", "eval", "tensorboard", "wandb", "config.yaml", "reward_curve.png",
                 "turning_points.png")

    def _prepare_run_dir(self, resume, overwrite: bool) -> None:
        """Create ``run_dir``; refuse to start a new run over another run's checkpoints unless ``overwrite`` (which
        removes that run's files); tidy what a crashed writer left (temporaries, a lagging ``latest``)."""
        try:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise ValueError(f"run_dir: {self.run_dir} is a file, not a directory")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"run_dir: cannot create {self.run_dir} ({e.strerror or e})") from None
        existing = find_latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            if not overwrite:
                raise ValueError(f"run_dir: {self.run_dir} already holds a run (checkpoint {existing.name}); use "
                                 f"--resume to continue it, another run_dir, or --overwrite to replace it")
            dist.barrier()  # every process has seen the old run before the main process removes it
            if self.is_main:
                for name in self.RUN_FILES:
                    p = self.run_dir / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            dist.barrier()
        if self.is_main:
            clean_stale_temporaries(self.run_dir / "checkpoints")
            sync_latest(self.run_dir)

    def _check_memory(self, fraction: float = 0.8) -> None:
        """Refuse, before any sampling, an epoch whose stored latents cannot fit in this machine's memory."""
        import psutil

        s = self.cfg.sampling
        latent = int(np.prod(self.model.latent_shape()))
        tempflow = self.cfg.algorithm == "tempflow_grpo"
        W = len(self.cfg.tempflow.branch_steps) if tempflow and self.cfg.tempflow.branch_steps else s.window_size
        C = self.cfg.tempflow.children if tempflow else 0
        guard = W if self.cfg.training.grpo_guard else 0  # GRPO-Guard's transition means
        per_sample = (2 * W + 2 + (W + 1) + 2 * W * C + guard) * latent * 4  # states, next, finals, forks, children
        need = self.cfg.samples_per_epoch * per_sample / dist.world_size()
        have = psutil.virtual_memory().total
        if need > fraction * have:
            raise ValueError(f"training.prompts_per_epoch: an epoch of {self.cfg.samples_per_epoch} samples "
                             f"(prompts_per_epoch × group_size) stores about {need / 2**30:.1f} GiB of latents per "
                             f"process; this machine has {have / 2**30:.1f} GiB")

    def _warn_near_deterministic_steps(self, ratio: float = 0.05) -> None:
        """The log-prob gradient of a transition scales like 1/std, so a trained step whose std is tiny next to the
        others (e.g. the last step before σ = 0 on an unshifted schedule) dominates every update with noise."""
        s = self.cfg.sampling
        last = min(s.window_start_max + s.window_size, s.num_steps - 1)
        steps = range(s.window_start_min, last)
        stds = {i: float(transition_std(s.kernel, float(self.sigmas[i]), float(self.sigmas[i + 1]), s.noise_level))
                for i in steps}
        biggest = max(stds.values())
        tiny = [i for i, v in stds.items() if v < ratio * biggest]
        if tiny and dist.is_main():
            warnings.warn(f"sampling: trained step(s) {tiny} have transition std "
                          f"{', '.join(f'{stds[i]:.2g}' for i in tiny)} vs {biggest:.2g} at most; their log-prob "
                          f"gradients (∝ 1/std) will dominate the update. Consider a smaller sampling.window_size "
                          f"or a larger sampling.shift.", stacklevel=2)

    @staticmethod
    def _check_world(cfg: Config) -> None:
        P, t = dist.world_size(), cfg.training
        if P > 1 and cfg.samples_per_epoch % (P * t.sample_batch_size):
            raise ValueError(f"training.sample_batch_size: {P} processes × sample_batch_size {t.sample_batch_size} "
                             f"does not divide the {cfg.samples_per_epoch} samples of an epoch "
                             f"(training.prompts_per_epoch × group_size)")

    def _add_lora(self) -> None:
        add_lora(self.model, self.cfg.training.lora_rank, self.cfg.training.lora_alpha)

    def _validate_prompts(self, field: str, source: PromptSource) -> None:
        """Fail before training, with one line naming the file, if a prompt cannot be embedded or scored."""
        texts = [t for t, _ in source.prompts]
        scorers = [*self.reward_fns.values(), *([self.held_out_fn] if field == "data.eval_prompts" else [])]
        checks = [getattr(self.model, "validate_prompts", None)] + [getattr(fn, "validate_prompts", None)
                                                                  for fn in scorers if fn is not None]
        for check in filter(None, checks):
            try:
                check(texts)
            except ValueError as e:
                raise ValueError(f"{field}: {source.name}: {e}") from None

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.transformer.named_parameters() if p.requires_grad}

    def uncond_for(self, n: int) -> PromptEmbeds | None:
        """The unconditional embedding for n samples (None for guidance-distilled models without CFG)."""
        return None if self.uncond is None else self.uncond.expand(n)

    def embed(self, prompts: list[str]) -> PromptEmbeds:
        """Cached prompt embeddings. Each prompt is encoded alone (a batch of one), so its embedding is the same bits
        whichever batch first asked for it: a resumed run, another number of processes and the evaluation all see
        the embeddings an uninterrupted single-process run sees (a batched encoder's result depends, in the last
        bits, on the batch it ran in)."""
        with torch.no_grad():
            for p in dict.fromkeys(prompts):
                if p not in self._embed_cache:
                    self._embed_cache[p] = encode_each(self.model, [p])
        return PromptEmbeds.cat([self._embed_cache[p] for p in prompts])

    # --- one epoch --------------------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[list[str], list[int]]:
        cfg = self.cfg
        rng = random.Random(_seed_for(cfg.seed, epoch, 1))
        prompts = self.train_source.sample(rng, cfg.training.prompts_per_epoch, cfg.data.tag_weights)
        s = cfg.sampling
        if hasattr(self.method, "window_start"):  # MixGRPO's sliding window
            start = self.method.window_start(epoch)
        else:
            start = rng.randint(s.window_start_min, s.window_start_max)
        return prompts, list(range(start, start + s.window_size))

    def epoch_inputs(self, epoch: int):
        """Prompts (G per group), group and micro-batch ids, window, initial noise and per-sample generators."""
        cfg, s, t = self.cfg, self.cfg.sampling, self.cfg.training
        group_prompts, window = self._epoch_plan(epoch)
        if self.cfg.algorithm == "tempflow_grpo" and self.cfg.tempflow.branch_steps is not None:
            window = list(self.cfg.tempflow.branch_steps)
        if self.forward_process:
            window = []  # pure ODE rollouts
        G = t.group_size
        prompts = [p for p in group_prompts for _ in range(G)]
        n = len(prompts)
        group_ids = torch.arange(n) // G
        microbatch_ids = torch.arange(n) // t.sample_batch_size
        latent = self.model.latent_shape()
        gens = make_generators([_seed_for(cfg.seed, epoch, 2, i) for i in range(n)])
        noise = initial_noise(gens, latent)
        if s.same_noise:
            noise = noise.view(-1, G, *latent)[:, :1].expand(-1, G, *latent).reshape(n, *latent).clone()
        return prompts, group_ids, microbatch_ids, window, noise, gens

    def collect(self, epoch: int) -> tuple[EpochBatch, dict]:
        """Sample the epoch's rollouts, score them and turn rewards into per-step advantages."""
        prompts, group_ids, microbatch_ids, window, noise, gens = self.epoch_inputs(epoch)
        n = len(prompts)
        lo, hi = dist.shard(n)  # this process's samples (all of them with one process)
        t0 = time.perf_counter()
        if self.old is not None:  # DiffusionNFT samples with the old policy (train_nft_sd3.py L640–658)
            with self.old.swapped(self.trainable):
                parts = self.rollouts(prompts[lo:hi], window, noise[lo:hi], gens[lo:hi])
        else:
            parts = self.rollouts(prompts[lo:hi], window, noise[lo:hi], gens[lo:hi])
        t_rollout = time.perf_counter() - t0

        def cat(name):
            return torch.cat([getattr(p, name) for p in parts])

        def score(name):  # every process's samples, in global order: (primary per reward, every score)
            primary, every = self.score(cat(name), prompts[lo:hi])
            return ({k: dist.all_gather_tensor(v) for k, v in primary.items()},
                    {k: dist.all_gather_tensor(torch.as_tensor(v)).numpy() for k, v in every.items()})

        t0 = time.perf_counter()
        main, main_scores = score("final_latents")
        forks = score("fork_latents")[0] if self.method.engine_options.get("fork_window_states") else None
        children = score("child_final_latents")[0] if self.method.engine_options.get("branch_children") else None
        t_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = {name: ScoredRollout(main[name], None if forks is None else forks[name],
                                      None if children is None else children[name]) for name in self.reward_weights}
        rng = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, 4))
        credit = self.credit(scored, group_ids, microbatch_ids, window, rng)
        t_credit = time.perf_counter() - t0
        guard = self.cfg.training.grpo_guard
        if self.method.rows == "children":
            C = cat("child_log_probs").shape[-1]
            states = cat("window_latents").repeat_interleave(C, 0)
            next_states = cat("child_next_latents").transpose(1, 2).flatten(0, 1)
            log_probs = cat("child_log_probs").transpose(1, 2).flatten(0, 1)
            old_means = cat("transition_means").repeat_interleave(C, 0) if guard else None
            row_prompts = [p for p in prompts[lo:hi] for _ in range(C)]
            row_offset = lo * C  # row n·C + c is child c of sample n
        elif self.forward_process:  # the clean samples x0 as the single "state" of each row
            states, row_prompts, row_offset = cat("final_latents")[:, None], prompts[lo:hi], lo
            next_states, log_probs, old_means = states[:, :0], torch.zeros(len(states), 0), None
        else:
            states, next_states, log_probs, row_prompts = (cat("window_latents"), cat("next_latents"),
                                                           cat("log_probs"), prompts[lo:hi])
            old_means = cat("transition_means") if guard else None
            row_offset = lo
        batch = EpochBatch(row_prompts, window, states, next_states, log_probs, credit.advantages.float(),
                           credit.step_weights, credit.train_mask, row_offset, old_means)
        combined = sum(w * main[k] for k, w in self.reward_weights.items())
        info = {
            "reward_mean": float(combined.mean()), "reward_std": float(combined.std(unbiased=False)),
            **{f"{k}_mean": float(v.mean()) for k, v in main_scores.items()},
            "evaluations_per_sample": sum(dist.all_gather_object(sum(p.state_evaluations for p in parts))) / n,
            "time_rollout": t_rollout, "time_score": t_score, "time_credit": t_credit,
        }
        if window:
            info["window_start"] = window[0]
        if forks is not None:
            info["R0_mean"] = float(sum(w * forks[k][:, 0] for k, w in self.reward_weights.items()).mean())
        if credit.advantages.dim() >= 2 and credit.advantages.shape[1]:  # every method: how much of the credit is 0
            zero = (credit.advantages == 0).double().mean(0)  # [W], or [W, K] with a clipped term per reward
            info["adv_zero_per_step"] = zero.reshape(zero.shape[0], -1).mean(1).tolist()
        if "tp" in credit.stats:
            info["tp"] = credit.stats["tp"]
            self._last_tp = (credit.stats["R"][:6].numpy(), credit.stats["is_tp"][:6].numpy())
        return batch, info

    def score(self, latents: torch.Tensor, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """Score latents [N, ...extra dims..., *latent] (one prompt per N): the primary score of every configured
        reward shaped [N, ...extra dims...], and every score any reward returned (flat, for logging).

        Decoding and scoring run one sampling micro-batch (``sample_batch_size`` samples) at a time, the unit of
        work of every process, so the scores do not depend on the number of processes by construction."""
        extra = latents.shape[1:latents.ndim - len(self.model.latent_shape())]
        reps = int(np.prod(extra)) if extra else 1
        mb = self.cfg.training.sample_batch_size
        chunks: dict[tuple[str, str], list[np.ndarray]] = {}
        for lo in range(0, len(prompts), mb):
            images = self.model.decode(latents[lo:lo + mb].flatten(0, len(extra)))
            flat_prompts = [p for p in prompts[lo:lo + mb] for _ in range(reps)]
            for name, fn in self.reward_fns.items():
                scores = fn(images, flat_prompts)
                if not isinstance(scores, dict) or fn.primary not in scores:
                    raise TrainingAborted(f"reward {name!r} returned no {fn.primary!r} scores (a scorer returns a dict "
                                          f"of per-image score arrays, its primary one included)")
                for k, v in scores.items():
                    v = np.asarray(v, dtype=np.float64).reshape(-1)
                    if len(v) != len(images):
                        raise TrainingAborted(f"reward {name!r}: score {k!r} has {len(v)} values for {len(images)} "
                                              f"images")
                    chunks.setdefault((name, k), []).append(v)
        out, every = {}, {}
        for (name, k), parts in chunks.items():
            v = np.concatenate(parts)
            if not np.all(np.isfinite(v)):
                raise TrainingAborted(f"reward {k!r} returned non-finite scores")
            every[k] = v
            if k == self.reward_fns[name].primary:
                out[name] = torch.as_tensor(v, dtype=torch.float64).view(len(prompts), *extra)
        return out, every

    def credit(self, scored: dict[str, ScoredRollout], group_ids, microbatch_ids, window, rng) -> Credit:
        """Several rewards (``reward.aggregate``): ``reward`` — weighted sum of the rewards, then one credit;
        ``advantage`` — credit per reward, weighted sum of the advantages; ``loss`` — credit per reward, advantages
        stacked ``[M, W, K]`` so that each reward gets its own clipped policy term (DanceGRPO's rule, docs/design.md §3.2)."""
        w = self.reward_weights
        if self.cfg.reward.aggregate == "reward" or len(w) == 1:
            def mix(field):
                parts = [getattr(scored[k], field) for k in w]
                return None if parts[0] is None else sum(wk * p for wk, p in zip(w.values(), parts))
            return self.method.credit(ScoredRollout(mix("rewards"), mix("fork_rewards"), mix("child_rewards")),
                                      group_ids, microbatch_ids, window, rng)
        state = rng.get_state()
        credits = []
        for k in w:
            rng.set_state(state)  # every reward sees the same random choices (e.g. DanceGRPO's trained steps)
            credits.append(self.method.credit(scored[k], group_ids, microbatch_ids, window, rng))
        first = credits[0]
        if self.cfg.reward.aggregate == "loss":
            adv = torch.stack([c.advantages for c in credits], dim=-1)
        else:
            adv = sum(wk * c.advantages for wk, c in zip(w.values(), credits))
        return Credit(adv, first.step_weights, first.train_mask, first.stats)

    @property
    def loss_term_weights(self) -> torch.Tensor | None:
        """[K] reward weights when each reward has its own clipped term (``reward.aggregate: loss``), else None."""
        if self.cfg.reward.aggregate != "loss" or len(self.reward_weights) == 1:
            return None
        return torch.tensor(list(self.reward_weights.values()), dtype=torch.float32)

    def rollout_plan(self, window: list[int], completion: str | None = None) -> RolloutPlan:
        cfg, s = self.cfg, self.cfg.sampling
        return RolloutPlan(sigmas=self.sigmas, kernel=s.kernel, noise_level=s.noise_level, window=window,
                           completion=completion or cfg.tpgrpo.completion, completion_steps=cfg.tpgrpo.completion_steps,
                           guidance_scale=s.guidance_scale, logprob=s.logprob, max_batch=cfg.training.max_batch,
                           keep_means=cfg.training.grpo_guard, **self.method.engine_options,
                           **(self.method.plan_options(window) if hasattr(self.method, "plan_options") else {}))

    def rollouts(self, prompts: list[str], window: list[int], noise: torch.Tensor, gens, completion: str | None = None):
        """The epoch's trajectories, one sampling micro-batch (``sample_batch_size``) at a time."""
        plan = self.rollout_plan(window, completion)
        mb = self.cfg.training.sample_batch_size
        with self.engine.gathered():
            return [sample_rollout(self.model, plan, self.embed(prompts[lo:lo + mb]),
                                   self.uncond_for(len(prompts[lo:lo + mb])), noise[lo:lo + mb], gens[lo:lo + mb])
                    for lo in range(0, len(prompts), mb)]

    def _step_terms(self, batch: EpochBatch, idx: torch.Tensor, w: int, cond: PromptEmbeds, uncond: PromptEmbeds,
                    *, with_kl: bool = True, trained: bool = True):
        """log-prob under the current policy (with grad), the KL to the reference and the transition's Gaussian mean
        and std for window step w. ``trained``: a term of the training pass (with DDP its forward goes through the DDP
        module)."""
        s, t = self.cfg.sampling, self.cfg.training
        i = batch.window[w]
        x = batch.states[idx, w]
        x_next = batch.next_states[idx, w]
        sig, sig_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        with self.engine.policy(self.model) if trained else nullcontext():
            v = self.model.velocity(x, sig, cond, uncond, s.guidance_scale)
        mean, std = transition(s.kernel, x, v, sig, sig_next, s.noise_level)
        logp = log_prob(x_next, mean, std, s.logprob)
        kl = None
        if with_kl and t.beta > 0:
            with torch.no_grad():
                v_ref = self.velocity_ref(x, sig, cond, uncond, s.guidance_scale)
                mean_ref, _ = transition(s.kernel, x, v_ref, sig, sig_next, s.noise_level)
            kl_std = std if t.kl_variance == "transition" else noise_scale(s.kernel, sig, sig_next, s.noise_level)
            kl = kl_to_reference(mean, mean_ref, kl_std)
        return logp, kl, mean, std

    def _micro_batches(self, batch: EpochBatch, kept: torch.Tensor, epoch: int, inner: int):
        """The global train micro-batches of one inner epoch (the same on every process): ``(start, idx, mine)`` with
        ``idx`` the micro-batch's rows and ``mine`` those this process owns, in ``idx``'s order (all with one process)."""
        rng = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, 3, inner))
        order = kept[torch.randperm(len(kept), generator=rng)]
        own_lo, own_hi = batch.row_offset, batch.row_offset + len(batch.prompts)
        for lo in range(0, len(order), self.cfg.training.train_batch_size):
            idx = order[lo:lo + self.cfg.training.train_batch_size]
            yield lo, idx, idx[(idx >= own_lo) & (idx < own_hi)]

    def _lockstep_terms(self, batch: EpochBatch, idx: torch.Tensor, mine: torch.Tensor):
        """The terms of a micro-batch that *every* process runs, in order: ``(w, rows)`` for each window step w active
        for some row of the global micro-batch ``idx`` (``rows`` index ``mine``; None: this process has no active row
        there and runs a zero-weighted placeholder), so that all processes make the same calls (FSDP2 gathers
        weights in each forward, DDP synchronises in the last backward). One process: exactly ``_active_steps``."""
        own = dict(self._active_steps(batch, mine))
        return [(w, own.get(w)) for w, _ in self._active_steps(batch, idx)]

    def _active_steps(self, batch: EpochBatch, mine: torch.Tensor):
        """``(w, rows)`` for each window step w of a micro-batch with trained rows (``rows`` index ``mine``). With β = 0
        a (row, step) whose advantages are all zero is skipped: exact, it has zero loss and zero gradient."""
        for w in range(len(batch.window)):
            active = torch.ones(len(mine), dtype=torch.bool)
            if batch.train_mask is not None:
                active &= batch.train_mask[mine, w]
            if self.cfg.training.beta == 0 and self.skip_zero_advantages:
                nonzero = batch.advantages[mine, w] != 0
                active &= nonzero if nonzero.ndim == 1 else nonzero.any(-1)
            rows = torch.nonzero(active).flatten()
            if len(rows):
                yield w, rows

    def _kept_rows(self, batch: EpochBatch) -> torch.Tensor:
        """Rows with any nonzero (masked) advantage; with β > 0 every row (its KL term still trains)."""
        if self.cfg.training.beta > 0:
            return torch.arange(len(batch.advantages))
        adv = batch.advantages
        if batch.train_mask is not None:
            adv = adv * (batch.train_mask if adv.ndim == 2 else batch.train_mask[..., None])
        return torch.nonzero(nonzero_advantage_mask(adv.flatten(1))).flatten()

    def recompute_old_log_probs(self, batch: EpochBatch, kept: torch.Tensor, epoch: int) -> dict:
        """``training.recompute_old_logprobs``: replace the rollout's log-probs of the trained transitions by those of
        the training forward pass under the not-yet-updated policy, computed in exactly the composition the first
        inner epoch's training pass uses (same micro-batches, same rows per step, train mode, grad enabled). The
        first update's ratio is then exactly 1 by construction, whatever kernels the hardware picks.

        Returns the rollout/training mismatch it measured: the count of transitions, ``max |ρ − 1|`` with
        ``ρ = exp(logp_train − logp_rollout)``, and how many have ``|ρ − 1|`` beyond the clip range."""
        rollout = batch.log_probs.clone()
        seen = torch.zeros(batch.log_probs.shape, dtype=torch.bool)
        self.model.transformer.train()
        with self.engine.gathered():
            for _, _, mine in self._micro_batches(batch, kept, epoch, 0):
                cond = self.embed([batch.prompts[j - batch.row_offset] for j in mine]) if len(mine) else None
                uncond = self.uncond_for(len(mine))
                for w, rows in self._active_steps(batch, mine):
                    local = mine[rows] - batch.row_offset
                    logp, _, mean, _ = self._step_terms(batch, local, w, cond.index(rows),
                                                        None if uncond is None else uncond.index(rows), with_kl=False,
                                                        trained=False)
                    batch.log_probs[local, w] = logp.detach().to(batch.log_probs.dtype)
                    if batch.old_means is not None:
                        batch.old_means[local, w] = mean.detach()
                    seen[local, w] = True
        self.model.transformer.eval()
        dev = (torch.exp(batch.log_probs[seen] - rollout[seen]) - 1).abs()
        return {"n": int(seen.sum()), "max_dev": float(dev.max()) if len(dev) else 0.0,
                "clipped": int((dev > self.cfg.training.clip_range).sum())}

    def optimise(self, batch: EpochBatch, epoch: int) -> dict:
        """Inner epochs of clipped-policy-gradient updates; one optimizer step per train micro-batch, gradients
        accumulated over the window steps. Samples with all-zero advantages are dropped.

        The kept rows, their shuffled order and the train micro-batches are global (the same on every process); each
        process computes the loss of the rows it owns, normalised by the global micro-batch size, in the same
        sequence of calls (``_lockstep_terms``); the engine synchronises the gradients in the last backward.

        Logged besides the loss: the first update's ``max |ρ − 1|`` and clip fraction (``first_update_ratio_max_dev``,
        ``first_update_clipfrac``; on-policy, so any deviation is a rollout/training mismatch, which with clip ranges
        of 1e-4–1e-5 can zero the gradients of clipped samples), and with ``training.recompute_old_logprobs`` the
        mismatch over every trained transition (``old_logprob_max_dev``, ``old_logprob_clipfrac``)."""
        t = self.cfg.training
        if self.forward_process:
            return self.optimise_forward(batch, epoch)
        kept = self._kept_rows(batch)
        lr = epoch_lr(t.lr, t.lr_schedule, epoch, t.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        info = {"lr": lr, "dropped_samples": len(batch.advantages) - len(kept), "loss": 0.0, "skipped_updates": 0,
                "grad_norm": 0.0}
        mismatch = self.recompute_old_log_probs(batch, kept, epoch) if t.recompute_old_logprobs else {}
        # sums over this process's trained transitions, reduced over processes at the end (metrics only)
        m = dict.fromkeys(("n", "ratio", "clipped", "kl", "first_n", "first_clipped", "max_dev", "first_max_dev"), 0.0)
        W = len(batch.window)
        term_weights = self.loss_term_weights
        self.model.transformer.train()
        for inner in range(t.inner_epochs):
            for lo, idx, mine in self._micro_batches(batch, kept, epoch, inner):
                cond = self.embed([batch.prompts[j - batch.row_offset] for j in mine]) if len(mine) else None
                uncond = self.uncond_for(len(mine))
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                terms = self._lockstep_terms(batch, idx, mine)
                for k, (w, rows) in enumerate(terms):
                    weight = float(rows is not None)
                    if rows is None:  # placeholder: this process's first row, weight 0
                        sub = torch.tensor([batch.row_offset])
                        c, u = self.embed([batch.prompts[0]]), self.uncond_for(1)
                    else:
                        sub = mine[rows]
                        c, u = cond.index(rows), None if uncond is None else uncond.index(rows)
                    local = sub - batch.row_offset
                    with self.engine.accumulate(sync=k == len(terms) - 1):
                        logp, kl, mean, std = self._step_terms(batch, local, w, c, u)
                        logp_old = batch.log_probs[local, w]
                        weights = None if batch.step_weights is None else batch.step_weights[w].expand(len(sub))
                        if t.grpo_guard:  # the normalised log-ratio against 0, the step's loss × 1/Δt
                            logp = guard_log_ratio(logp, logp_old, mean, batch.old_means[local, w], std)
                            logp_old = torch.zeros_like(logp_old)
                            step = batch.window[w]
                            dt_w = guard_step_weight(float(self.sigmas[step]), float(self.sigmas[step + 1]))
                            weights = dt_w * (torch.ones(len(sub)) if weights is None else weights)
                        loss, li = grpo_step_loss(logp, logp_old, batch.advantages[sub, w],
                                                  t.clip_range, kl=kl, beta=t.beta, adv_clip_max=t.adv_clip_max,
                                                  weights=weights, term_weights=term_weights)
                        loss = loss * (weight * len(sub) / len(idx))  # this process's share of the micro-batch mean
                        (loss * (self.engine.loss_scale / W)).backward()
                    if rows is None:
                        continue
                    total += float(loss.detach()) / W
                    ratio = li["ratio"].detach()
                    dev = (ratio - 1).abs()
                    m["n"] += len(sub)
                    m["ratio"] += float(ratio.sum())
                    m["clipped"] += float(li["clipfrac"]) * len(sub)
                    m["kl"] += float(li["kl_loss"]) * len(sub)
                    m["max_dev"] = max(m["max_dev"], float(dev.max()))
                    if inner == 0 and lo == 0:
                        m["first_n"] += len(sub)
                        m["first_clipped"] += float((dev > t.clip_range).sum())
                        m["first_max_dev"] = max(m["first_max_dev"], float(dev.max()))
                self._update(total, info, epoch)
        self.model.transformer.eval()
        m.update({f"old_{k}": float(v) for k, v in mismatch.items()}, loss=info["loss"], grad_norm=info["grad_norm"])
        m = dist.reduce_metrics(m, maxima=("max_dev", "first_max_dev", "old_max_dev", "grad_norm"))
        n = max(1.0, m["n"])
        info.update(ratio_mean=m["ratio"] / n, clipfrac=m["clipped"] / n, kl=m["kl"] / n, ratio_max_dev=m["max_dev"],
                    first_update_ratio_max_dev=m["first_max_dev"],
                    first_update_clipfrac=m["first_clipped"] / max(1.0, m["first_n"]))
        if mismatch:
            info["old_logprob_max_dev"] = m["old_max_dev"]
            info["old_logprob_clipfrac"] = m["old_clipped"] / max(1.0, m["old_n"])
        n_updates = max(1, math.ceil(len(kept) / t.train_batch_size) * t.inner_epochs)
        info["loss"] = m["loss"] / n_updates
        info["grad_norm"] = m["grad_norm"] / n_updates
        return info

    def _update(self, total: float, info: dict, epoch: int) -> None:
        """The optimizer step of one micro-batch's gradients (already synchronised by the engine), clipped; skipped
        (counted, and fatal after ``training.max_nonfinite`` in a row) when the loss or gradient is not finite on any
        process. ``total``: this process's share of the micro-batch loss."""
        t = self.cfg.training
        grad_norm = self.engine.clip_grad_norm_(self.trainable, t.max_grad_norm)
        if dist.any_true(not (math.isfinite(total) and bool(torch.isfinite(grad_norm)))):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            info["skipped_updates"] += 1
            if self.is_main:
                tqdm.write(f"epoch {epoch}: non-finite loss or gradient ({total}, {float(grad_norm)}); "
                           f"update skipped ({self.nonfinite_in_row} in a row)")
            if self.nonfinite_in_row >= t.max_nonfinite:
                raise TrainingAborted(f"{self.nonfinite_in_row} non-finite updates in a row "
                                      f"(training.max_nonfinite={t.max_nonfinite}); stopping. Lower training.lr "
                                      f"or check the reward.")
            return
        self.nonfinite_in_row = 0
        self.optimizer.step()
        self.optimizer_steps += 1
        if self.optimizer_steps % t.ema_every == 0:
            self.ema.update(self.trainable)
        info["loss"] += total
        info["grad_norm"] += float(grad_norm)

    def _forward_draws(self, batch: EpochBatch, epoch: int, inner: int):
        """DiffusionNFT: noise levels t [m, K], noised states x_t [m, K, *latent] of this process's rows for one
        inner epoch; each row's draws come from (seed, epoch, inner, global row index) alone."""
        x0 = batch.states[:, 0]
        draws = [self.method.draw(_seed_for(self.cfg.seed, epoch, 5, inner, batch.row_offset + j), self.sigmas,
                                  tuple(x0.shape[1:])) for j in range(len(x0))]
        t = torch.stack([d[0] for d in draws])
        noise = torch.stack([d[1] for d in draws])
        te = t.view(*t.shape, *([1] * (x0.ndim - 1)))
        return t, (1 - te) * x0[:, None] + te * noise

    def optimise_forward(self, batch: EpochBatch, epoch: int) -> dict:
        """A forward-process method's epoch of updates (DiffusionNFT: train_nft_sd3.py L806–1039; AWM): every row
        trains K noise levels; one optimizer step per train micro-batch, the method's loss averaged over its K levels.
        The old policy's velocities are computed first, in the training pass's composition: DiffusionNFT's old
        weights swapped in (they move only at the end of the epoch, old ← d·old + (1 − d)·current, as the reference's
        "old" adapter); AWM's the current weights before the epoch's updates. Model calls hold at most
        ``training.max_batch`` rows; larger micro-batches accumulate gradients (the reference's accumulation)."""
        t, m = self.cfg.training, self.method
        lr = epoch_lr(t.lr, t.lr_schedule, epoch, t.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        info = {"lr": lr, "loss": 0.0, "kl": 0.0, "policy_loss": 0.0, "old_deviate": 0.0, "skipped_updates": 0,
                "grad_norm": 0.0}
        rows = torch.arange(len(batch.advantages))
        g = self.cfg.sampling.guidance_scale  # no CFG in training (uncond None); FLUX-dev: its guidance input
        K = m.num_train
        self.model.transformer.train()
        draws = [self._forward_draws(batch, epoch, inner) for inner in range(t.inner_epochs)]
        v_old = [torch.zeros_like(xt) for _, xt in draws]
        P, own = dist.world_size(), len(batch.prompts)

        def chunks(inner):
            """(micro-batch rows, [(rows, local rows, weight)]): this process's rows in calls of at most
            ``training.max_batch``, padded with zero-weighted one-row calls to the most calls any process makes."""
            for _, idx, mine in self._micro_batches(batch, rows, epoch, inner):
                calls = max(math.ceil(int(((idx >= q * own) & (idx < (q + 1) * own)).sum()) / t.max_batch)
                            for q in range(P))
                parts = [(mine[c:c + t.max_batch], mine[c:c + t.max_batch] - batch.row_offset, 1.0)
                         for c in range(0, len(mine), t.max_batch)]
                parts += [(torch.tensor([batch.row_offset]), torch.tensor([0]), 0.0)] * (calls - len(parts))
                yield idx, parts

        old = self.old.swapped(self.trainable) if self.old is not None else nullcontext()  # AWM: the current weights
        with torch.no_grad(), old, self.engine.gathered():
            for inner, (ts, xt) in enumerate(draws):
                for _, parts in chunks(inner):
                    for _, local, weight in parts:
                        if not weight:
                            continue
                        cond = self.embed([batch.prompts[j] for j in local])
                        for k in range(K):
                            v_old[inner][local, k] = self.model.velocity(xt[local, k], ts[local, k], cond, None, g)
        n_terms = 0
        for inner, (ts, xt) in enumerate(draws):
            for idx, parts in chunks(inner):
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for p_i, (sub, local, weight) in enumerate(parts):  # gradient accumulation: mean over idx, K levels
                    cond = self.embed([batch.prompts[j] for j in local])
                    for k in range(K):
                        x, s = xt[local, k], ts[local, k]
                        with self.engine.accumulate(sync=p_i == len(parts) - 1 and k == K - 1):
                            with self.engine.policy(self.model):
                                v = self.model.velocity(x, s, cond, None, g)
                            v_ref = self.velocity_ref(x, s, cond, None, g) if t.beta > 0 else None
                            loss, li = m.loss(v, v_old[inner][local, k], batch.states[local, 0], x, s,
                                              batch.advantages[sub, 0], v_ref=v_ref, kl_weight=t.beta)
                            loss = loss * (weight * len(sub) / len(idx))  # this process's share of the mean
                            (loss * (self.engine.loss_scale / K)).backward()
                        if not weight:
                            continue
                        total += float(loss.detach()) / K
                        for key in ("policy_loss", "old_deviate", "kl"):
                            info[key] += float(li.get(key, 0.0)) * len(sub)
                        n_terms += len(sub)
                self._update(total, info, epoch)
        self.model.transformer.eval()
        if self.old is not None:
            with torch.no_grad():  # the old policy moves once per epoch (train_nft_sd3.py L1033–1039)
                self.old.decay = m.old_decay(self.optimizer_steps)
                self.old.update(self.trainable)
            info["old_decay"] = self.old.decay
        sums = dist.reduce_metrics({k: info[k] for k in ("loss", "grad_norm", "policy_loss", "old_deviate", "kl")}
                                   | {"n": float(n_terms)}, maxima=("grad_norm",))
        n_updates = max(1, math.ceil(len(rows) / t.train_batch_size) * t.inner_epochs)
        for k in ("loss", "grad_norm"):
            info[k] = sums[k] / n_updates
        for k in ("policy_loss", "old_deviate", "kl"):
            info[k] = sums[k] / max(1.0, sums["n"])
        return info

    # --- evaluation, checkpoints, logging ---------------------------------------------------------------------
    def evaluate(self, epoch: int, *, grid: bool = True) -> dict:
        cfg = self.cfg
        with self.ema.swapped(self.trainable), self.engine.gathered():
            res = evaluate(self.model, self.eval_source, self.reward_fn, self.eval_sigmas,
                           guidance_scale=cfg.sampling.guidance_scale, per_tag=cfg.data.eval_per_tag,
                           seed=cfg.data.eval_seed, max_batch=cfg.training.max_batch, embed=self.embed,
                           uncond=self.uncond, chunk=cfg.data.eval_batch_size, held_out=self.held_out_fn)
        if grid and self.is_main:
            png = save_eval_grid(res, self.run_dir / "eval" / f"epoch_{epoch:04d}.png", title=f"epoch {epoch}")
            if self.tracker is not None:
                tracking.log_grid(self.tracker, png, epoch)
        return {k: v for k, v in res.items() if k not in PER_IMAGE_KEYS}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            tracking.log_record(self.tracker, record)

    def checkpoint(self) -> Path:
        """Written by the main process only (every process holds the same state); the others wait for it."""
        path = self.run_dir / "checkpoints" / f"epoch_{self.epoch:06d}"
        state = {"epoch": self.epoch, "optimizer_steps": self.optimizer_steps, "nonfinite_in_row": self.nonfinite_in_row}
        if self.engine.strategy == "fsdp2":  # every process writes its shards
            return save_sharded_checkpoint(self.run_dir, self.epoch, self._sharded_state(), state)
        if self.is_main:
            path = save_checkpoint(self.run_dir, self.epoch, {
                "lora": self.lora_state(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "state": state, **({"old": self.old.state_dict()} if self.old is not None else {})})
        dist.barrier()
        return path

    def _sharded_state(self) -> dict:
        return self.engine.sharded_state(self.model.transformer, self.optimizer, ema=self.ema.state_dict(),
                                         **({"old": self.old.state_dict()} if self.old is not None else {}))

    def _resume(self, resume) -> None:
        """``--resume``: the newest complete checkpoint, falling back (and saying so) to an older one when it is
        corrupt; a checkpoint named explicitly must load as it is."""
        if resume is True or resume == "latest":
            candidates = complete_checkpoints(self.run_dir)[::-1]
            if not candidates:
                raise FileNotFoundError(f"run_dir: no checkpoint to resume from in {self.run_dir / 'checkpoints'}")
        else:
            candidates = [resolve_checkpoint(resume)]
        for i, path in enumerate(candidates):
            try:
                self._restore(path)
                return
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise
                if self.is_main:
                    print(f"warning: {e}; resuming from the previous checkpoint {candidates[i + 1].name}",
                          file=sys.stderr)

    def _restore(self, path: Path) -> None:
        if is_sharded(path) or self.engine.strategy == "fsdp2":
            self._set_state(path, self.engine.restore_sharded(path, self.model.transformer, self.optimizer,
                                                              self._sharded_state()))
            return
        ck = load_checkpoint(path)
        params = dict(self.model.transformer.named_parameters())
        check_trained_tensors(path, ck["lora"], params)
        if self.old is not None and "old" not in ck:
            raise CheckpointError(f"{path}: has no DiffusionNFT old-policy weights (old.safetensors); it is not a "
                                  f"diffusion_nft run's checkpoint")
        try:
            self.ema.load_state_dict(ck["ema"])
            if self.old is not None:
                self.old.load_state_dict(ck["old"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path}: EMA or optimizer state does not fit this run ({str(e)[:120]})") from None
        with torch.no_grad():
            for name, value in ck["lora"].items():
                params[name].copy_(value)
        self._set_state(path, ck["state"])

    def _set_state(self, path: Path, st: dict) -> None:
        self.epoch, self.optimizer_steps, self.nonfinite_in_row = st["epoch"], st["optimizer_steps"], st["nonfinite_in_row"]
        if self.epoch > self.cfg.training.epochs:
            raise CheckpointError(f"{path}: epoch {self.epoch} is beyond training.epochs={self.cfg.training.epochs}")
        if self.is_main:  # forget records of epochs after the checkpoint, and a line cut by a crash
            records = read_metrics_records(self.metrics_path)
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records
                                                 if r.get("epoch", 0) <= self.epoch))
            print(f"resumed from {path} (epoch {self.epoch})")

    def _logged_epoch0_eval(self) -> bool:
        return self.is_main and any(r.get("epoch") == 0 and "eval" in r for r in read_metrics_records(self.metrics_path))

    def _request_stop(self, signum, frame):
        self._stop_requested = True
        tqdm.write(f"received signal {signum}: finishing this epoch, saving a checkpoint and exiting")

    def _stopping(self) -> bool:
        """The stop decision, agreed by all processes (a signal may reach only some of them)."""
        return dist.any_true(self._stop_requested)

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        summary: dict = {}
        try:
            if self.epoch == 0 and not self._logged_epoch0_eval():
                t0 = time.perf_counter()
                ev = self.evaluate(0)
                self.log({"epoch": 0, "eval": ev, "time_eval": time.perf_counter() - t0})
                summary["eval_before"] = ev
            bar = tqdm(total=t.epochs, initial=self.epoch, desc=f"{cfg.algorithm}", unit="epoch", dynamic_ncols=True,
                       disable=not self.is_main)
            stop = self._stopping()  # decided once per epoch, so the checkpoint and the exit always go together
            while self.epoch < t.epochs and not stop:
                epoch = self.epoch + 1
                t0 = time.perf_counter()
                batch, info = self.collect(epoch)
                t1 = time.perf_counter()
                info.update(self.optimise(batch, epoch))
                info["engine_bytes"] = bytes_held(self.trainable, self.optimizer)
                info["time_train"] = time.perf_counter() - t1
                info["time_epoch"] = time.perf_counter() - t0
                if self.model.device.type == "cuda":  # the epoch's peak (the counter is reset after logging)
                    info["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.model.device) / 2 ** 30
                    torch.cuda.reset_peak_memory_stats(self.model.device)
                self.epoch = epoch
                record = {"epoch": epoch, **info}
                if epoch % t.eval_every == 0 or epoch == t.epochs:
                    t2 = time.perf_counter()
                    record["eval"] = self.evaluate(epoch)
                    record["time_eval"] = time.perf_counter() - t2
                    summary["eval_after"] = record["eval"]
                self.log(record)
                if self.is_main:
                    if "tp" in info:
                        plot_turning_points(self.metrics_path, self._last_tp, self.run_dir / "turning_points.png")
                    plot_reward_curve(self.metrics_path, self.run_dir / "reward_curve.png")
                stop = self._stopping()
                if epoch % t.checkpoint_every == 0 or epoch == t.epochs or stop:
                    self.checkpoint()
                bar.update(1)
                post = {"reward": f"{info['reward_mean']:.3f}"}
                if "eval" in record:
                    post["eval"] = f"{record['eval']['partial']:.3f}/{record['eval']['strict']:.3f}"
                bar.set_postfix(post)
            bar.close()
            if stop and self.epoch == 0:  # stopped before the first epoch: save the initial state, so --resume works
                self.checkpoint()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if self.tracker is not None:
                tracking.finish(self.tracker, keep_process_group=dist.world_size() > 1)
        summary["epoch"] = self.epoch
        summary["interrupted"] = self._stopping()
        return summary


def read_metrics_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` ([] when there is none; a line cut by a crash is dropped)."""
    return read_metrics(path) if Path(path).is_file() else []

