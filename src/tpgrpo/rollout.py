"""The lockstep fork engine (DESIGN §4).

A *main trajectory* per sample advances step by step: steps inside the *window* use the stochastic kernel
(sde / cps / dance) and record the log-probability of the transition; all other steps are ODE (Euler). At chosen
states the engine *forks* ODE continuations (TP-GRPO's completions). A fork started from main state x_i sits at
σ_{i+1} exactly when the main trajectory does, so every step is **one batched model call** over the main states and
all live forks at that σ (chunked to ``max_batch`` states). Two exact savings:

* a fork's first ODE step from x_i reuses the velocity the main trajectory already computed at x_i;
* fork completions may follow a coarser sub-path of the main schedule (``completion_steps``); they still only ever
  sit at main-schedule σ's, so they stay in lockstep.

``completion="sequential"`` runs the same completions one origin state after another after the main trajectory,
re-evaluating the first velocity, like the reference code; it exists for benchmarking and equivalence tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .models.base import FlowModel, PromptEmbeds
from .sampling import log_prob, transition


@dataclass
class RolloutPlan:
    sigmas: torch.Tensor                 # [T+1], σ_0 = 1 … σ_T = 0
    kernel: str = "cps"                  # kind of the window steps
    noise_level: float = 0.7
    window: Sequence[int] = ()           # consecutive step indices with the stochastic kernel (trained)
    fork_window_states: bool = False     # TP-GRPO: ODE-complete the state before each window step
    completion: str = "lockstep"         # lockstep | sequential
    completion_steps: int | None = None  # ODE steps of a fork's completion (None: every remaining step)
    guidance_scale: float = 1.0
    logprob: str = "gaussian"
    max_batch: int = 256                 # states per model call (CFG doubles the rows of a call)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass
class Rollout:
    """What one batch of trajectories produced. Window step w is the transition x_{window[w]} → x_{window[w]+1}."""

    window: list[int]
    window_latents: torch.Tensor            # [N, W+1, *latent]: states before each window step, and after the last
    log_probs: torch.Tensor                 # [N, W] log-probs under the sampling policy
    final_latents: torch.Tensor             # [N, *latent]
    fork_latents: torch.Tensor | None       # [N, W, *latent]: ODE completion of window state k (k = 0 … W−1)
    state_evaluations: int = 0              # velocity evaluations of single states (CFG pairs count once)
    model_calls: int = 0                    # batched forward invocations (before chunking)
    fork_paths: list[list[int]] = field(default_factory=list)
    call_rows: list[int] = field(default_factory=list)  # states per transformer invocation (after chunking)

    @property
    def evaluations_per_sample(self) -> float:
        return self.state_evaluations / self.final_latents.shape[0]


def completion_path(start: int, num_steps: int, completion_steps: int | None) -> list[int]:
    """Main-schedule indices a fork visits from state ``start`` to σ_T = 0 (inclusive of both ends).

    All remaining steps by default; with ``completion_steps = m`` an evenly spaced sub-path of at most m steps."""
    remaining = num_steps - start
    if completion_steps is None or completion_steps >= remaining:
        return list(range(start, num_steps + 1))
    idx = np.round(np.linspace(start, num_steps, completion_steps + 1)).astype(int)
    return sorted(set(idx.tolist()))


def _velocity(model: FlowModel, x: torch.Tensor, sigma: float, cond: PromptEmbeds, uncond: PromptEmbeds | None,
              guidance_scale: float, max_batch: int, call_rows: list[int] | None = None) -> torch.Tensor:
    """Velocities for a batch of states at one σ, in chunks of at most ``max_batch`` states."""
    per_call = max(1, max_batch // (2 if uncond is not None and guidance_scale != 1.0 else 1))
    out = []
    for lo in range(0, x.shape[0], per_call):
        sl = slice(lo, lo + per_call)
        if call_rows is not None:
            call_rows.append(min(per_call, x.shape[0] - lo))
        out.append(model.velocity(x[sl], sigma, cond.index(sl), None if uncond is None else uncond.index(sl),
                                  guidance_scale))
    return torch.cat(out)


def _draw(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def sample_rollout(model: FlowModel, plan: RolloutPlan, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                   initial_noise: torch.Tensor, generators: Sequence[torch.Generator]) -> Rollout:
    """Run N trajectories (and their forks) from ``initial_noise`` [N, *latent]; ``generators`` (one per sample)
    draw the transition noise of the stochastic steps, so results do not depend on how samples are batched."""
    sig = plan.sigmas.tolist()
    T = plan.num_steps
    window = list(plan.window)
    if window and (window != list(range(window[0], window[0] + len(window))) or window[-1] >= T - 1):
        raise ValueError(f"window {window} must be consecutive steps ending before the final step {T - 1}")
    n = initial_noise.shape[0]
    x = initial_noise.float().clone()
    w_pos = {step: k for k, step in enumerate(window)}
    window_latents: list[torch.Tensor] = []
    log_probs = torch.zeros(n, len(window))
    evals, calls = 0, 0
    # live forks: origin k → [current latent, remaining path (main indices)]
    forks: dict[int, list] = {}
    finished: dict[int, torch.Tensor] = {}
    fork_paths: dict[int, list[int]] = {}
    cached_v: dict[int, torch.Tensor] = {}
    call_rows: list[int] = []
    lockstep = plan.fork_window_states and plan.completion == "lockstep"

    for i in range(T):
        due = [k for k, (_, path) in forks.items() if path[0] == i]
        batch_x = torch.cat([x] + [forks[k][0] for k in due])
        batch_c = PromptEmbeds.cat([cond] * (1 + len(due)))
        batch_u = None if uncond is None else PromptEmbeds.cat([uncond] * (1 + len(due)))
        v_all = _velocity(model, batch_x, sig[i], batch_c, batch_u, plan.guidance_scale, plan.max_batch, call_rows)
        evals += batch_x.shape[0]
        calls += 1
        v = v_all[:n]
        for j, k in enumerate(due):  # ODE step of each due fork along its path
            lat, path = forks[k]
            nxt = path[1]
            lat = lat - (sig[i] - sig[nxt]) * v_all[n * (j + 1): n * (j + 2)]
            path = path[1:]
            if nxt == T:
                finished[k] = lat
                del forks[k]
            else:
                forks[k] = [lat, path]
        if i in w_pos:
            k = w_pos[i]
            window_latents.append(x)
            if plan.fork_window_states:
                path = completion_path(i, T, plan.completion_steps)
                fork_paths[k] = path
                if lockstep:  # first step reuses the main trajectory's velocity at x_i
                    lat = x - (sig[i] - sig[path[1]]) * v
                    if path[1] == T:
                        finished[k] = lat
                    else:
                        forks[k] = [lat, path[1:]]
                else:
                    cached_v[k] = x
            mean, std = transition(plan.kernel, x, v, sig[i], sig[i + 1], plan.noise_level)
            x_next = mean + std * _draw(generators, x.shape[1:])
            log_probs[:, k] = log_prob(x_next, mean, std, plan.logprob)
            x = x_next
            if k == len(window) - 1:
                window_latents.append(x)
        else:
            x = x - (sig[i] - sig[i + 1]) * v

    if plan.fork_window_states and not lockstep:  # one origin state after another (reference behaviour)
        for k, x_k in cached_v.items():
            lat = x_k
            path = fork_paths[k]
            for a, b in zip(path[:-1], path[1:]):
                vk = _velocity(model, lat, sig[a], cond, uncond, plan.guidance_scale, plan.max_batch, call_rows)
                evals += n
                calls += 1
                lat = lat - (sig[a] - sig[b]) * vk
            finished[k] = lat

    fork_latents = None
    if plan.fork_window_states:
        fork_latents = torch.stack([finished[k] for k in range(len(window))], dim=1)
    return Rollout(
        window=window,
        window_latents=torch.stack(window_latents, dim=1) if window else x.new_zeros((n, 0, *x.shape[1:])),
        log_probs=log_probs,
        final_latents=x,
        fork_latents=fork_latents,
        state_evaluations=evals,
        model_calls=calls,
        fork_paths=[fork_paths[k] for k in sorted(fork_paths)],
        call_rows=call_rows,
    )


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One N(0, I) latent per generator (drawn first, before any transition noise)."""
    return _draw(generators, shape)


@torch.no_grad()
def sample_ode(model: FlowModel, sigmas: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None,
               noise: torch.Tensor, guidance_scale: float, max_batch: int = 256) -> torch.Tensor:
    """Deterministic ODE sampling (evaluation): final latents [N, *latent]."""
    plan = RolloutPlan(sigmas=sigmas, window=(), guidance_scale=guidance_scale, max_batch=max_batch)
    return sample_rollout(model, plan, cond, uncond, noise, []).final_latents
