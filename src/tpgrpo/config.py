"""Typed, validated configuration (pydantic). YAML presets live in ``configs/``; any field can be overridden on the
command line as ``section.field=value`` (the value is parsed as YAML). Unknown keys and impossible values raise
:class:`ConfigError` with one line naming the field."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


#: Upper bounds of sizes (far above any sensible run; they keep a typo from exhausting the machine).
MAX_STEPS = 1000          # σ·1000 is the timestep: more steps than training timesteps mean nothing
MAX_SAMPLES = 1 << 20     # samples per epoch
MAX_SEED = (1 << 63) - 1


class _Section(BaseModel):
    # NaN/inf are rejected in every float field (an infinite lr silently NaNs the weights)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data):
        """pydantic's lax mode reads ``true`` as 1 for an int field; a boolean where a number belongs is a typo."""
        if isinstance(data, dict):
            for name, value in data.items():
                f = cls.model_fields.get(name)
                if isinstance(value, bool) and f is not None and bool not in _types_of(f.annotation) \
                        and _types_of(f.annotation) & {int, float}:
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


def _types_of(annotation) -> set:
    args = typing.get_args(annotation)
    return {t for a in (args or (annotation,)) for t in (_types_of(a) if typing.get_args(a) else {a})}


class ModelConfig(_Section):
    kind: Literal["shapes", "sd3", "flux"] = Field(
        "shapes", description="model family: shapes = the built-in tiny model of the shapes world; sd3 = Stable "
                              "Diffusion 3 / 3.5 (diffusers); flux = FLUX.1 (diffusers)")
    path: str | None = Field(None, description="shapes: safetensors weights file, or a built-in one by name: pixel (the "
                                               "default when None) or latent (the latent world, docs/RESULTS.md); "
                                               "sd3/flux (required): hub id or local diffusers pipeline directory")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="sd3/flux: weight dtype of the frozen components and autocast dtype; latents and step "
                            "math stay fp32")
    resolution: int | None = Field(None, ge=16, le=8192, description="sd3/flux image size in pixels (None: the "
                                                                      "pipeline's default)")
    device: str | None = Field(None, description="torch device of the model (None: cuda:LOCAL_RANK if available, "
                                                 "else cpu); rollout states stay on the host")
    max_sequence_length: int | None = Field(None, ge=1, le=4096, description="sd3/flux T5 tokens (None: pipeline "
                                                                             "default, 256 SD3 / 512 FLUX)")
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's activations in the backward "
                                                            "pass (less memory, slower training)")
    full_finetune: bool = Field(False, description="train every transformer weight (no LoRA); the KL reference is "
                                                   "a frozen copy")
    lora_target_modules: list[str] | None = Field(None, min_length=1, description="override the model's LoRA target "
                                                                                 "modules (None: the model's own)")


class SamplingConfig(_Section):
    num_steps: int = Field(10, ge=2, le=MAX_STEPS, description="denoising steps of a training rollout (T); the last "
                                                               "one is deterministic and never trained")
    eval_num_steps: int = Field(20, ge=1, le=MAX_STEPS, description="denoising steps of the deterministic (ODE) "
                                                                    "sampling of evaluation")
    shift: float = Field(1.0, gt=0, le=1e3, description="static σ shift (ignored where the model sets a dynamic one, "
                                                        "FLUX, except with spacing linspace)")
    spacing: Literal["auto", "scheduler", "flux_pipeline", "linspace"] = Field(
        "auto", description="σ grid before the shift: auto = the model's own pipeline (FLUX: flux_pipeline, others: "
                            "scheduler); scheduler = the diffusers scheduler's default timesteps; flux_pipeline = "
                            "FluxPipeline's linspace(1, 1/T, T); linspace = DanceGRPO's linspace(1, 0, T+1) with "
                            "the static shift")
    guidance_scale: float = Field(3.0, ge=1.0, le=100.0, description="classifier-free guidance scale of rollouts, "
                                                                     "training and evaluation (1: no CFG; FLUX.1-dev: "
                                                                     "its distilled guidance input)")
    kernel: Literal["sde", "cps", "dance"] = Field(
        "cps", description="stochastic step of the window: sde = Flow-GRPO's SDE (noise scale a·sqrt(σ/(1 − σ))); "
                           "cps = coefficient-preserving (std σ′·sin(η·π/2)); dance = the sde mean with a constant "
                           "noise scale η (DanceGRPO)")
    noise_level: float = Field(0.7, gt=0, le=10.0, description="noise level of the kernel: a (sde), η (cps, where it "
                                                               "must be ≤ 1; dance)")
    logprob: Literal["gaussian", "mse"] = Field(
        "gaussian", description="transition log-probability: gaussian = the Gaussian log-density averaged over latent "
                                "elements; mse = −mean((x′ − μ)²) (TP-GRPO's cps reference)")
    window_size: int = Field(9, ge=1, le=MAX_STEPS, description="W: consecutive stochastic (trained) steps of a "
                                                                "trajectory, the others are ODE (TempFlow-GRPO: its "
                                                                "branch points)")
    window_start_min: int = Field(0, ge=0, le=MAX_STEPS, description="smallest step index the window starts at; each "
                                                                     "epoch draws the start uniformly in [min, max]")
    window_start_max: int = Field(0, ge=0, le=MAX_STEPS, description="largest step index the window starts at (= "
                                                                     "window_start_min: a fixed window)")
    same_noise: bool = Field(False, description="every member of a prompt group starts from the same initial noise "
                                                "(DanceGRPO)")

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window_start_max < self.window_start_min:
            raise ValueError("window_start_max: must be >= window_start_min")
        if self.kernel == "cps" and self.noise_level > 1:
            raise ValueError(f"noise_level: the cps kernel's η must lie in (0, 1], got {self.noise_level}")
        return self


class DataConfig(_Section):
    train_prompts: str = Field("shapes:train", description="training prompts: shapes:train or shapes:test (the "
                                                           "shapes grammar's splits), or a UTF-8 text file, one prompt "
                                                           "a line")
    eval_prompts: str = Field("shapes:test", description="evaluation prompts, in the forms train_prompts takes")
    tag_weights: dict[str, Annotated[float, Field(ge=0, le=1e6)]] | None = Field(
        None, description="training prompts: draw a tag in proportion to these weights (tags left out: 0), then a "
                          "prompt of it; None: tags uniformly. Spend samples where rewards vary, e.g. Flow-GRPO's "
                          "GenEval mix {position: 7, counting: 5, color_attr: 3, colors: 1, two_object: 1}")
    eval_per_tag: int = Field(16, ge=1, le=10000, description="evaluation items per prompt tag (shapes: each of the "
                                                              "six GenEval tags; a prompt file is one tag)")
    eval_seed: int = Field(0, ge=0, le=MAX_SEED, description="fixes the evaluation set (prompts and noise), "
                                                            "independent of the run seed")
    eval_batch_size: int = Field(128, ge=1, le=65536, description="evaluation items sampled, decoded and scored "
                                                                  "together; the unit of work split over processes")


class RewardConfig(_Section):
    name: str = Field("shapes", description="the reward function's registered name, e.g. shapes, brightness, "
                                            "clip_score, pickscore, aesthetic, ocr, remote")
    weights: dict[str, float] = Field(default_factory=dict,
                                      description="several rewards by name with weights (overrides name; evaluation "
                                                  "scores with the first)")
    aggregate: Literal["reward", "advantage", "loss"] = Field(
        "reward", description="several rewards: reward = weighted sum of rewards, one credit; advantage = credit per "
                              "reward, weighted sum of advantages, one clipped term; loss = credit per reward, each "
                              "its own clipped term, weighted sum of the losses (DanceGRPO)")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                               description="constructor options per reward name, e.g. {ocr: {psm: 7}}")
    held_out: str | None = Field(None, description="a reward scored at evaluation only, never trained on (e.g. "
                                                   "shapes beside shapes_pref: train on the learned reward, report "
                                                   "the rule scorer); its shapes_strict, where it has one, is the "
                                                   "strict column")

    @model_validator(mode="after")
    def _weights_train(self):
        for name, w in self.weights.items():
            if not math.isfinite(w):
                raise ValueError(f"weights.{name}: must be a finite number, got {w}")
            if w == 0:
                raise ValueError(f"weights.{name}: a weight of 0 trains nothing; remove the reward instead")
        return self

    @model_validator(mode="after")
    def _held_out_is_not_trained(self):
        if self.held_out is not None and self.held_out in self.components():
            raise ValueError(f"held_out: {self.held_out!r} is also a training reward; a held-out metric must be one "
                             f"the run does not train on")
        return self

    def components(self) -> dict[str, float]:
        return dict(self.weights) if self.weights else {self.name: 1.0}


class TrainingConfig(_Section):
    epochs: int = Field(20, ge=1, le=10_000_000, description="training epochs; each samples, scores and credits a "
                                                             "batch, then runs inner_epochs of updates on it")
    prompts_per_epoch: int = Field(8, ge=1, le=MAX_SAMPLES, description="prompt groups per epoch (samples per epoch "
                                                                        "= prompts_per_epoch × group_size)")
    group_size: int = Field(8, ge=1, le=65536, description="G: trajectories per prompt (at least 2); advantages are "
                                                           "normalised within the group")
    sample_batch_size: int = Field(16, ge=1, le=MAX_SAMPLES, description="samples per sampling micro-batch: rolled "
                                                                         "out and scored together; TP-GRPO's "
                                                                         "microbatch balancing scope")
    train_batch_size: int = Field(16, ge=1, le=MAX_SAMPLES, description="trained rows (samples; TempFlow-GRPO: "
                                                                        "children) per optimizer step")
    max_batch: int = Field(256, ge=1, le=65536, description="most states per transformer call in rollouts and "
                                                            "evaluation (CFG doubles the states); diffusion_nft: "
                                                            "also in training (gradients accumulate)")
    inner_epochs: int = Field(1, ge=1, le=1000, description="passes of updates over each epoch's samples")
    lr: float = Field(3e-4, gt=0, le=10.0, description="AdamW learning rate")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant: lr in every epoch; linear: lr · (1 − (epoch − 1) / epochs) in epoch 1 … "
                                "epochs (decays towards 0)")
    weight_decay: float = Field(1e-4, ge=0, le=100.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this total norm before each "
                                                        "optimizer step")
    clip_range: float = Field(1e-4, gt=0, le=1e3, description="PPO clip ε: the ratio ρ is clipped to [1 − ε, 1 + ε]")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages are clipped to ± this value")
    beta: float = Field(0.0, ge=0, description="β: weight of the KL to the reference policy (the base model; 0: no "
                                               "KL term; diffusion_nft: of mean((v_θ − v_ref)²))")
    kl_variance: Literal["transition", "noise_scale"] = Field(
        "transition", description="KL = mean((μ_θ − μ_ref)²) / (2·var): transition = the transition variance std² "
                                  "(the per-step Gaussian KL); noise_scale = the kernel's noise scale² without Δ "
                                  "(Flow-GRPO's code under sde; the same as transition under cps)")
    recompute_old_logprobs: bool = Field(
        False, description="old log-probs from the training forward pass (one extra forward per trained transition) "
                           "instead of the rollout's: the first update's ratio is then exactly 1 on any hardware")
    grpo_guard: bool = Field(False, description="GRPO-Guard (log-prob methods): the ratio of each step normalised "
                                                "by its transition std and mean shift, and the step's loss × 1/Δt "
                                                "(needs sampling.logprob: gaussian; the reference's clip ranges are "
                                                "2e-6–4e-6)")
    global_std: bool = Field(False, description="Flow-GRPO: divide advantages by the whole epoch's reward std "
                                                "instead of the group's (the mean stays the group's)")
    lora_rank: int = Field(8, ge=1, le=4096, description="LoRA rank (at most the smallest targeted layer width)")
    lora_alpha: float = Field(16, gt=0, le=1e6, description="LoRA α: the adapters' update is scaled by "
                                                            "lora_alpha / lora_rank")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA of the trained weights, used for evaluation: "
                                                          "ema ← decay·ema + (1 − decay)·weights")
    ema_every: int = Field(1, ge=1, le=10_000_000, description="update the EMA every this many optimizer steps")
    eval_every: int = Field(5, ge=1, le=10_000_000, description="evaluate every this many epochs (and after the "
                                                                "last; epoch 0 is always evaluated)")
    checkpoint_every: int = Field(5, ge=1, le=10_000_000, description="save a checkpoint every this many epochs (and "
                                                                      "after the last or when stopped)")
    max_nonfinite: int = Field(3, ge=1, le=1_000_000, description="abort after this many non-finite updates in a row")

    @model_validator(mode="after")
    def _batch_arithmetic(self):
        n = self.prompts_per_epoch * self.group_size
        if n > MAX_SAMPLES:
            raise ValueError(f"prompts_per_epoch: {self.prompts_per_epoch} × group_size {self.group_size} = {n} "
                             f"samples per epoch is more than the {MAX_SAMPLES} allowed")
        if self.group_size < 2:
            raise ValueError("group_size: GRPO needs at least 2 samples per prompt group")
        if n % self.sample_batch_size:
            raise ValueError(f"sample_batch_size: {self.sample_batch_size} does not divide the "
                             f"{n} samples of an epoch (prompts_per_epoch × group_size)")
        return self


class TPGRPOConfig(_Section):
    turning_points: bool = Field(True, description="turning points get the aggregated reward g_t; false: every step "
                                                   "keeps its incremental reward r_t (the dense-reward ablation, "
                                                   "close to DenseGRPO)")
    consistent: bool = Field(True, description="consistent turning points (the paper's main rule: the rest of the "
                                               "trajectory keeps the step's sign); false: plain Definition 4.1")
    first_step: bool = Field(True, description="the first window step may be a turning point (the paper's "
                                               "first-step rule); false: it never is")
    balance: bool = Field(True, description="balance turning points by sign in each scope: keep min(#positive, "
                                            "#negative) of each sign when both occur")
    balance_rank: Literal["trajectory", "aggregated"] = Field(
        "trajectory", description="which turning points balancing keeps: trajectory = largest |R_W − R_0| of the "
                                  "trajectory (the reference); aggregated = largest |g_t|")
    balance_scope: Literal["microbatch", "group", "batch"] = Field(
        "microbatch", description="where balancing counts signs: microbatch = each sampling micro-batch (the "
                                  "reference); group = each prompt group; batch = the whole epoch")
    completion: Literal["lockstep", "sequential"] = Field(
        "lockstep", description="how window states are ODE-completed: lockstep = batched with the main trajectory; "
                                "sequential = one state after another afterwards, like the reference (benchmarks)")
    completion_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="ODE steps of a completion, an evenly "
                                                                               "spaced sub-path of the schedule (also "
                                                                               "TempFlow's children); None = all")


class DanceConfig(_Section):
    timestep_fraction: float = Field(0.6, gt=0, le=1, description="share of the window steps each trajectory "
                                                                  "trains, chosen at random (at least one step)")
    unbiased_std: bool = Field(True, description="group std with n − 1 (the DanceGRPO reference); false: the "
                                                 "population std of the other methods")
    std_eps: float = Field(1e-8, ge=0, description="added to the group std (reference 1e-8; the other methods 1e-4)")


class TempFlowConfig(_Section):
    children: int = Field(6, ge=1, le=256, description="C: SDE children per branch point")
    branch_steps: list[int] | None = Field(None, description="branch points (increasing step indices before the "
                                                             "final step), used instead of the window; None = the "
                                                             "window")


class NFTConfig(_Section):
    beta: float = Field(1.0, gt=0, le=1e3, description="β of the implicit policies v± (v⁺ = β·v_θ + (1 − β)·v_old); "
                                                      "the reference's config.beta: 1, 0.1 for OCR and multi-reward")
    decay_type: int = Field(
        1, ge=0, le=2, description="old-policy update after each epoch, old ← d·old + (1 − d)·current with d after s optimizer "
                       "steps: 0 = d 0 (old = current); 1 = min(0.001·s, 0.5); 2 = 0 for s < 75, then "
                       "min(0.0075·(s − 75), 0.999)")
    timestep_fraction: float = Field(0.99, gt=0, le=1, description="each sample trains int(num_steps · fraction) (at "
                                                                   "least 1) noise levels, a random subset of the "
                                                                   "sampling σ's")
    global_std: bool = Field(True, description="advantages divide by the whole epoch's reward std (the reference's "
                                               "default); false: the group's")


class DistributedConfig(_Section):
    strategy: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto", description="engine with several processes (torchrun / accelerate launch): ddp = accelerate's "
                            "DistributedDataParallel, every process holds the model; fsdp2 = PyTorch FSDP2, "
                            "parameters, gradients and optimizer state sharded over processes (for full fine-tuning); "
                            "auto = ddp. One process ignores it")
    cpu_offload: bool = Field(False, description="fsdp2: keep the sharded parameters, gradients and optimizer state "
                                                 "in CPU memory (slower; for models that do not fit otherwise)")
    param_dtype: Literal["bf16", "fp16"] | None = Field(
        None, description="fsdp2: compute dtype of the gathered parameters (gradients are reduced in fp32; None: "
                          "the parameters' own dtype)")


class AWMConfig(_Section):
    weighting: Literal["uniform", "t", "t2"] = Field("uniform", description="weight w(t) of the flow-matching "
                                                                           "log-likelihood −w(t)·mean((v − (ε − x0))²): "
                                                                           "1, t or t² (Flow-Factory's default: 1)")
    timestep_fraction: float = Field(0.9, gt=0, le=1, description="each sample trains int(num_steps · fraction) (at "
                                                                  "least 1) noise levels, a random subset of the "
                                                                  "sampling σ's (Flow-Factory: timestep_range 0.9)")
    global_std: bool = Field(True, description="advantages divide by the whole epoch's reward std; false: the group's")


class MixConfig(_Section):
    shift_interval: int = Field(25, ge=1, le=1_000_000, description="epochs the sliding window stays at a position "
                                                                    "(the reference's iters_per_group: 25; Flash: 20)")
    stride: int = Field(1, ge=0, le=MAX_STEPS, description="steps the window moves each time; it wraps from "
                                                          "sampling.window_start_max to window_start_min; 0 freezes it "
                                                          "(MixGRPO-Flash*)")
    flash_ratio: float | None = Field(None, gt=0, le=1, description="MixGRPO-Flash: after the window the ODE runs "
                                                                    "int((T − L)·ratio) σ points (L: the window's last "
                                                                    "step) with DPM-Solver++ 2M (Flash: 0.4, Flash*: "
                                                                    "0.2; needs sampling.spacing: linspace); None: "
                                                                    "Euler on the full grid")


class LoggingConfig(_Section):
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers (accelerate): tensorboard writes "
                                                              "RUN_DIR/tensorboard; wandb needs `pip install wandb`")
    project: str = Field("tpgrpo", min_length=1, description="wandb project name")
    run_name: str | None = Field(None, description="wandb run name (None: the run directory's name)")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="wandb mode (None: the WANDB_MODE environment variable, else wandb's default)")


class Config(_Section):
    algorithm: Literal["tpgrpo", "flow_grpo", "dance_grpo", "tempflow_grpo", "diffusion_nft", "awm",
                       "mix_grpo"] = Field(
        "tpgrpo", description="method: tpgrpo = TP-GRPO (turning points); flow_grpo = Flow-GRPO; dance_grpo = "
                              "DanceGRPO; tempflow_grpo = TempFlow-GRPO (branching, noise-aware weights); "
                              "diffusion_nft = DiffusionNFT (ODE rollouts, forward-process loss; no window, kernel or "
                              "clip range); awm = advantage-weighted matching (ODE rollouts, PPO-clipped "
                              "flow-matching likelihood ratio); mix_grpo = MixGRPO (a window of SDE steps "
                              "sliding over training, ODE elsewhere)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="run seed: every random choice of epoch e (prompts, window, "
                                                        "noise, shuffling) derives from (seed, e)")
    run_dir: str = Field("runs/default", min_length=1, description="directory of the run: config.yaml, "
                                                                   "metrics.jsonl, checkpoints, evaluation grids, "
                                                                   "tensorboard")
    model: ModelConfig = Field(ModelConfig(), description="the flow-matching model, how it is loaded and what "
                                                          "trains")
    sampling: SamplingConfig = Field(SamplingConfig(), description="the σ schedule, guidance, stochastic kernel and "
                                                                   "trained window of the rollouts")
    data: DataConfig = Field(DataConfig(), description="training and evaluation prompts")
    reward: RewardConfig = Field(RewardConfig(), description="the reward function(s) and how several are combined")
    training: TrainingConfig = Field(TrainingConfig(), description="batch sizes, optimizer, clipped policy loss, "
                                                                   "KL, LoRA, EMA, evaluation and checkpoints")
    tpgrpo: TPGRPOConfig = Field(TPGRPOConfig(), description="TP-GRPO's turning points, balancing and ODE "
                                                             "completions (algorithm tpgrpo)")
    dance: DanceConfig = Field(DanceConfig(), description="DanceGRPO's trained-step subset and advantage std "
                                                          "(algorithm dance_grpo)")
    tempflow: TempFlowConfig = Field(TempFlowConfig(), description="TempFlow-GRPO's branching (algorithm "
                                                                   "tempflow_grpo)")
    nft: NFTConfig = Field(NFTConfig(), description="DiffusionNFT's implicit policies, old-policy decay and trained "
                                                    "noise levels (algorithm diffusion_nft)")
    awm: AWMConfig = Field(AWMConfig(), description="AWM's log-likelihood weighting and trained noise levels "
                                                    "(algorithm awm)")
    mix: MixConfig = Field(MixConfig(), description="MixGRPO's sliding window and Flash solver (algorithm "
                                                    "mix_grpo)")
    distributed: DistributedConfig = Field(DistributedConfig(), description="the distributed engine of a "
                                                                            "multi-process run (DDP or FSDP2)")
    logging: LoggingConfig = Field(LoggingConfig(), description="experiment trackers (tensorboard, wandb)")

    @model_validator(mode="after")
    def _cross_checks(self):
        t, s = self.training, self.sampling
        if self.algorithm not in ("diffusion_nft", "awm") and s.window_start_max + s.window_size > s.num_steps - 1:
            raise ValueError(  # DiffusionNFT trains no window: its rollouts are ODE
                f"sampling.window_size: a window of {s.window_size} starting at step {s.window_start_max} reaches the "
                f"final step (num_steps={s.num_steps}); the final step is deterministic and never trained")
        rows = self.samples_per_epoch * (self.tempflow.children if self.algorithm == "tempflow_grpo" else 1)
        if rows % t.train_batch_size:
            what = "children" if self.algorithm == "tempflow_grpo" else "samples"
            raise ValueError(f"training.train_batch_size: {t.train_batch_size} does not divide the {rows} trained "
                             f"{what} of an epoch")
        if t.grpo_guard and (self.algorithm in ("diffusion_nft", "awm") or s.logprob != "gaussian"):
            raise ValueError("training.grpo_guard: needs a log-prob method (not diffusion_nft or awm) with "
                             f"sampling.logprob: gaussian; got {self.algorithm} with {s.logprob}")
        if self.algorithm == "mix_grpo" and self.mix.flash_ratio is not None and s.spacing != "linspace":
            raise ValueError(f"mix.flash_ratio: MixGRPO-Flash's compressed grid needs sampling.spacing: linspace "
                             f"(the reference's shifted linspace), got {s.spacing!r}")
        steps = self.tempflow.branch_steps
        if steps is not None:
            if not steps or steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] >= self.sampling.num_steps - 1:
                raise ValueError(f"tempflow.branch_steps: must be increasing step indices below the final step "
                                 f"{self.sampling.num_steps - 1}, got {steps}")
        return self

    @property
    def samples_per_epoch(self) -> int:
        return self.training.prompts_per_epoch * self.training.group_size


class _StrictLoader(yaml.SafeLoader):
    """YAML for configurations: no aliases (a 'billion laughs' file expands exponentially; configurations never need
    them) and no duplicate keys (the second would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "YAML aliases (*name) are not supported in "
                                                    "configurations", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """``yaml.safe_load`` without aliases or duplicate keys (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{problem}{where}" if problem else type(e).__name__


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        field, _, rest = msg.partition(": ")
        if rest and " " not in field:
            loc = f"{loc}.{field}" if loc else field
            msg = rest
    return f"config error: {loc}: {msg}" if loc else f"config error: {msg}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"config error: {dotted}: {k} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"config error: override {item!r} must look like section.field=value")
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and raw.strip()[:1] not in ("'", "\""):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = int(value) if value.lstrip("+-").isdigit() else float(value)
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (optional), apply ``section.field=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: file not found: {p}")
        try:
            tree = load_yaml(p.read_text(encoding="utf-8-sig")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p}: not valid YAML ({_yaml_problem(e)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {p}: not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"config error: {p}: cannot be read ({e.strerror or e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config error: {p}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def config_reference() -> str:
    """The configuration reference (``docs/config.md``) as Markdown, generated from the models: one table per section
    with each field's type and bounds (from its pydantic constraints), default and description."""

    def number(x, whole_floats_as_int: bool = False) -> str:
        if whole_floats_as_int and isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
            x = int(x)  # a bound: ≤ 1000, not ≤ 1000.0
        if isinstance(x, int):
            return f"{x:_}" if abs(x) >= 100_000 else str(x)
        mantissa, e, exponent = repr(x).partition("e")
        return f"{mantissa}e{int(exponent)}" if e else mantissa

    def type_name(annotation) -> str:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:  # e.g. a dict's values with their own bounds: float (≥ 0)
            found = bounds([m for extra in args[1:] for m in (*getattr(extra, "metadata", ()), extra)])
            return type_name(args[0]) + (f" ({', '.join(found)})" if found else "")
        if origin is Literal:
            return " | ".join(str(a) for a in args)
        if origin is typing.Union or (origin is not None and type(annotation).__name__ == "UnionType"):
            return " | ".join(type_name(a) for a in args)
        if annotation is type(None):
            return "None"
        if annotation is Any:
            return "Any"
        if origin is not None:
            return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
        return getattr(annotation, "__name__", str(annotation))

    def bounds(metadata) -> list[str]:
        out = []
        for m in metadata:
            for attr, sign, prefix in (("gt", ">", ""), ("ge", "≥", ""), ("lt", "<", ""), ("le", "≤", ""),
                                       ("min_length", "≥", "length "), ("max_length", "≤", "length "),
                                       ("multiple_of", "multiple of", "")):
                value = getattr(m, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.append(f"{prefix}{sign} {number(value, whole_floats_as_int=True)}")
        return out

    def default(f) -> str:
        value = f.default_factory() if f.default_factory is not None else f.default
        if value is None:
            return "null"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float)):
            return number(value)
        if isinstance(value, str):
            return value
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=True).strip()

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    def table(prefix: str, model: type[BaseModel]) -> list[str]:
        rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                continue
            kind = type_name(f.annotation)
            limits = bounds(f.metadata)
            if limits:
                kind += f" ({', '.join(limits)})"
            rows.append(f"| `{cell(prefix + name)}` | {cell(kind)} | `{cell(default(f))}` | "
                        f"{cell(f.description or '')} |")
        return rows

    lines = ["# Configuration reference", "",
             "Generated by `tpgrpo.config.config_reference()` from the pydantic models in `src/tpgrpo/config.py` "
             "and checked by `tests/test_config_reference.py`; do not edit it by hand. Every field can be set in a "
             "YAML preset (`configs/`) or overridden on the command line as `section.field=value` (top-level "
             "fields: `field=value`; the value is read as YAML, so `null` is None, e.g. "
             "`tpgrpo train --config configs/default.yaml training.lr=1e-3 model.path=null`). Unknown fields and "
             "values outside the ranges below are rejected.", "",
             "## Top-level fields", "", *table("", Config)]
    for name, f in Config.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            lines += ["", f"## `{name}`", ""]
            if f.description:
                text = f.description
                lines += [(text[0].upper() if text[0].isascii() else text[0]) + text[1:] + ".", ""]
            lines += table(f"{name}.", f.annotation)
    return "\n".join(lines) + "\n"
