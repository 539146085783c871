"""Typed, validated configuration (pydantic). YAML presets live in ``configs/``; any field can be overridden on the
command line as ``section.field=value`` (the value is parsed as YAML). Unknown keys and impossible values raise
:class:`ConfigError` with one line naming the field."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

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
    kind: Literal["shapes", "sd3", "flux"] = "shapes"
    path: str | None = None  # shapes: weights file (None = built-in); sd3/flux: hub id or local diffusers directory
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="sd3/flux: weight dtype of the frozen components and autocast dtype; latents and step "
                            "math stay fp32")
    resolution: int | None = Field(None, ge=16, le=8192, description="sd3/flux image size in pixels (None: the "
                                                                      "pipeline's default)")
    device: str | None = Field(None, description="sd3/flux: torch device (None: cuda:LOCAL_RANK if available, "
                                                 "else cpu)")
    max_sequence_length: int | None = Field(None, ge=1, le=4096, description="sd3/flux T5 tokens (None: pipeline default, "
                                                                    "256 SD3 / 512 FLUX)")
    gradient_checkpointing: bool = False
    full_finetune: bool = Field(False, description="train every transformer weight (no LoRA); the KL reference is "
                                                   "a frozen copy")
    lora_target_modules: list[str] | None = Field(None, min_length=1, description="override the model's LoRA target "
                                                                                 "modules (None: the model's own)")


class SamplingConfig(_Section):
    num_steps: int = Field(10, ge=2, le=MAX_STEPS, description="denoising steps of a training rollout (T)")
    eval_num_steps: int = Field(20, ge=1, le=MAX_STEPS)
    shift: float = Field(1.0, gt=0, le=1e3, description="static σ shift (ignored where the model sets a dynamic one, FLUX, "
                                                "except with spacing linspace)")
    spacing: Literal["auto", "scheduler", "flux_pipeline", "linspace"] = Field(
        "auto", description="σ grid before the shift: auto = the model's own pipeline (FLUX: flux_pipeline, others: "
                            "scheduler); scheduler = the diffusers scheduler's default timesteps; flux_pipeline = "
                            "FluxPipeline's linspace(1, 1/T, T); linspace = DanceGRPO's linspace(1, 0, T+1) with "
                            "the static shift")
    guidance_scale: float = Field(3.0, ge=1.0, le=100.0)
    kernel: Literal["sde", "cps", "dance"] = "cps"
    noise_level: float = Field(0.7, gt=0, le=10.0, description="a (sde), η (cps, dance)")
    logprob: Literal["gaussian", "mse"] = "gaussian"
    window_size: int = Field(9, ge=1, le=MAX_STEPS, description="W: consecutive stochastic (trained) steps")
    window_start_min: int = Field(0, ge=0, le=MAX_STEPS)
    window_start_max: int = Field(0, ge=0, le=MAX_STEPS)
    same_noise: bool = False  # every member of a prompt group starts from the same initial noise

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window_start_max < self.window_start_min:
            raise ValueError("window_start_max: must be >= window_start_min")
        if self.window_start_max + self.window_size > self.num_steps - 1:
            raise ValueError(
                f"window_size: a window of {self.window_size} starting at step {self.window_start_max} reaches the "
                f"final step (num_steps={self.num_steps}); the final step is deterministic and never trained")
        return self


class DataConfig(_Section):
    train_prompts: str = "shapes:train"  # "shapes:train" | "shapes:test" | path to a text file (one prompt a line)
    eval_prompts: str = "shapes:test"
    eval_per_tag: int = Field(16, ge=1, le=10000)
    eval_seed: int = Field(0, ge=0, le=MAX_SEED, description="fixes the evaluation set (prompts and noise), "
                                                            "independent of the run seed")
    eval_batch_size: int = Field(128, ge=1, le=65536, description="evaluation items sampled, decoded and scored together; the "
                                                        "unit of work split over processes")


class RewardConfig(_Section):
    name: str = "shapes"
    weights: dict[str, float] = Field(default_factory=dict,
                                      description="several rewards by name with weights (overrides name)")
    aggregate: Literal["reward", "advantage", "loss"] = Field(
        "reward", description="several rewards: reward = weighted sum of rewards, one credit; advantage = credit per "
                              "reward, weighted sum of advantages, one clipped term; loss = credit per reward, each "
                              "its own clipped term, weighted sum of the losses (DanceGRPO)")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                               description="constructor options per reward name, e.g. {ocr: {psm: 7}}")

    @model_validator(mode="after")
    def _weights_train(self):
        for name, w in self.weights.items():
            if not math.isfinite(w):
                raise ValueError(f"weights.{name}: must be a finite number, got {w}")
            if w == 0:
                raise ValueError(f"weights.{name}: a weight of 0 trains nothing; remove the reward instead")
        return self

    def components(self) -> dict[str, float]:
        return dict(self.weights) if self.weights else {self.name: 1.0}


class TrainingConfig(_Section):
    epochs: int = Field(20, ge=1, le=10_000_000)
    prompts_per_epoch: int = Field(8, ge=1, le=MAX_SAMPLES)
    group_size: int = Field(8, ge=1, le=65536)
    sample_batch_size: int = Field(16, ge=1, le=MAX_SAMPLES, description="samples per sampling micro-batch "
                                                                         "(balancing scope)")
    train_batch_size: int = Field(16, ge=1, le=MAX_SAMPLES)
    max_batch: int = Field(256, ge=1, le=65536, description="largest model-call batch (CFG doubles the states)")
    inner_epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(3e-4, gt=0, le=10.0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear: lr · (1 − (epoch − 1) / epochs) in epoch 1 … epochs (decays towards 0)")
    weight_decay: float = Field(1e-4, ge=0, le=100.0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_range: float = Field(1e-4, gt=0, le=1e3)
    adv_clip_max: float = Field(5.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL weight")
    kl_variance: Literal["transition", "noise_scale"] = Field(
        "transition", description="KL = mean((μ_θ − μ_ref)²) / (2·var): transition = the transition variance std² "
                                  "(the per-step Gaussian KL); noise_scale = the kernel's noise scale² without Δ "
                                  "(Flow-GRPO's code under sde; the same as transition under cps)")
    recompute_old_logprobs: bool = Field(
        False, description="old log-probs from the training forward pass (one extra forward per trained transition) "
                           "instead of the rollout's: the first update's ratio is then exactly 1 on any hardware")
    global_std: bool = False
    lora_rank: int = Field(8, ge=1, le=4096, description="LoRA rank (at most the smallest targeted layer width)")
    lora_alpha: float = Field(16, gt=0, le=1e6)
    ema_decay: float = Field(0.9, ge=0, lt=1)
    ema_every: int = Field(1, ge=1, le=10_000_000)
    eval_every: int = Field(5, ge=1, le=10_000_000)
    checkpoint_every: int = Field(5, ge=1, le=10_000_000)
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
    consistent: bool = True
    first_step: bool = True
    balance: bool = True
    balance_rank: Literal["trajectory", "aggregated"] = "trajectory"
    balance_scope: Literal["microbatch", "group", "batch"] = "microbatch"
    completion: Literal["lockstep", "sequential"] = "lockstep"
    completion_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="ODE steps for a fork's completion; None = all")


class DanceConfig(_Section):
    timestep_fraction: float = Field(0.6, gt=0, le=1)
    unbiased_std: bool = Field(True, description="group std with n − 1 (the DanceGRPO reference); false: the "
                                                 "population std of the other methods")
    std_eps: float = Field(1e-8, ge=0, description="added to the group std (reference 1e-8; the other methods 1e-4)")


class TempFlowConfig(_Section):
    children: int = Field(6, ge=1, le=256, description="C: SDE children per branch point")
    branch_steps: list[int] | None = Field(None, description="branch points (step indices); None = the window")


class Config(_Section):
    algorithm: Literal["tpgrpo", "flow_grpo", "dance_grpo", "tempflow_grpo"] = "tpgrpo"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    run_dir: str = Field("runs/default", min_length=1)
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    training: TrainingConfig = TrainingConfig()
    tpgrpo: TPGRPOConfig = TPGRPOConfig()
    dance: DanceConfig = DanceConfig()
    tempflow: TempFlowConfig = TempFlowConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        t = self.training
        rows = self.samples_per_epoch * (self.tempflow.children if self.algorithm == "tempflow_grpo" else 1)
        if rows % t.train_batch_size:
            what = "children" if self.algorithm == "tempflow_grpo" else "samples"
            raise ValueError(f"training.train_batch_size: {t.train_batch_size} does not divide the {rows} trained "
                             f"{what} of an epoch")
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
