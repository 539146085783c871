"""The lockstep fork engine (docs/design.md §4).

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
from .sampling import dpm_solver_2m_step, log_prob, transition


@dataclass
class RolloutPlan:
    sigmas: torch.Tensor                 # [T+1], σ_0 = 1 … σ_T = 0
    kernel: str = "cps"                  # kind of the window steps
    noise_level: float = 0.7
    window: Sequence[int] = ()           # consecutive step indices with the stochastic kernel (trained)
    fork_window_states: bool = False     # TP-GRPO: ODE-complete the state before each window step
    branch_children: int = 0             # TempFlow-GRPO: C SDE children per window step; main stays ODE
    completion: str = "lockstep"         # lockstep | sequential
    completion_steps: int | None = None  # ODE steps of a fork's completion (None: every remaining step)
    guidance_scale: float = 1.0
    logprob: str = "gaussian"
    max_batch: int = 256                 # states per model call (CFG doubles the rows of a call)
    tail_sigmas: torch.Tensor | None = None  # MixGRPO-Flash: σ grid after the window (from σ_{L+1} to 0), DPM++ 2M
    keep_means: bool = False             # GRPO-Guard: keep each window transition's Gaussian mean

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass
class Rollout:
    """What one batch of trajectories produced. Window step w is the transition x_{window[w]} → x_{window[w]+1}."""

    window: list[int]
    window_latents: torch.Tensor            # [N, W, *latent]: main states before each window step
    next_latents: torch.Tensor              # [N, W, *latent]: main states after each window step
    log_probs: torch.Tensor                 # [N, W] log-probs of the main transitions under the sampling policy
    final_latents: torch.Tensor             # [N, *latent]
    fork_latents: torch.Tensor | None       # [N, W, *latent]: ODE completion of window state k (k = 0 … W−1)
    child_next_latents: torch.Tensor | None = None   # [N, W, C, *latent]: children's states after their SDE step
    child_log_probs: torch.Tensor | None = None      # [N, W, C]
    child_final_latents: torch.Tensor | None = None  # [N, W, C, *latent]: children finished with the ODE
    transition_means: torch.Tensor | None = None     # [N, W, *latent]: mean of each window transition (keep_means)
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


def _dpm_tail(model, x, v, tail: list[float], history, cond, uncond, plan: RolloutPlan, call_rows: list[int]):
    """The main trajectory from σ = tail[0] (its velocity ``v`` already evaluated) to 0 with DPM-Solver++ 2M;
    ``history`` = (x̂0, σ) of the previous step. Returns the final states, state evaluations and model calls."""
    x0_prev, s_prev = history
    evals = calls = 0
    for j in range(len(tail) - 1):
        if j:
            v = _velocity(model, x, tail[j], cond, uncond, plan.guidance_scale, plan.max_batch, call_rows)
            evals, calls = evals + x.shape[0], calls + 1
        x, x0_prev, s_prev = dpm_solver_2m_step(x, v, tail[j], tail[j + 1], x0_prev, s_prev), x - tail[j] * v, tail[j]
    return x, evals, calls


@dataclass
class _Fork:
    """States that continue with the ODE along ``path`` (main-schedule indices; path[0] = current σ index)."""

    lat: torch.Tensor
    owner: torch.Tensor  # [n_f] index of the sample each state belongs to (for its prompt embedding)
    path: list[int]


@torch.no_grad()
def sample_rollout(model: FlowModel, plan: RolloutPlan, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                   initial_noise: torch.Tensor, generators: Sequence[torch.Generator]) -> Rollout:
    """Run N trajectories (and their forks) from ``initial_noise`` [N, *latent]; ``generators`` (one per sample)
    draw the transition noise of the stochastic steps, so results do not depend on how samples are batched."""
    sig = plan.sigmas.tolist()
    T = plan.num_steps
    window = list(plan.window)
    if window != sorted(set(window)) or (window and (window[0] < 0 or window[-1] >= T - 1)):
        raise ValueError(f"window {window}: steps must be increasing and end before the final step {T - 1}")
    if plan.fork_window_states and window != list(range(window[0], window[0] + len(window))):
        raise ValueError(f"window {window}: TP-GRPO forks need consecutive window steps")
    C = plan.branch_children
    tail = None if plan.tail_sigmas is None or not window else plan.tail_sigmas.tolist()
    if tail is not None and (plan.fork_window_states or C or abs(tail[0] - sig[window[-1] + 1]) > 1e-6
                             or tail[-1] != 0.0):
        raise ValueError("tail_sigmas: must run from the σ after the window to 0, without forks or children")
    n = initial_noise.shape[0]
    shape = tuple(initial_noise.shape[1:])
    x = initial_noise.float().clone()
    w_pos = {step: k for k, step in enumerate(window)}
    window_latents, next_latents = [], []
    log_probs = torch.zeros(n, len(window))
    child_next = torch.zeros(n, len(window), C, *shape) if C else None
    child_logp = torch.zeros(n, len(window), C) if C else None
    means = torch.zeros(n, len(window), *shape) if plan.keep_means else None
    evals, calls = 0, 0
    forks: dict[int, _Fork] = {}           # live forks by key (window position k; children: k + len(window))
    finished: dict[int, torch.Tensor] = {}
    fork_paths: dict[int, list[int]] = {}
    pending: dict[int, _Fork] = {}         # sequential mode: completions run after the main trajectory
    call_rows: list[int] = []
    lockstep = plan.completion == "lockstep"
    everyone = torch.arange(n)
    history: tuple = (None, None)  # (x̂0, σ) of the previous main step (MixGRPO-Flash's DPM++ 2M)

    def advance(key: int, f: _Fork, v: torch.Tensor, i: int) -> None:
        """ODE step of fork ``f`` from σ_i (= σ_{path[0]}) to σ_{path[1]}."""
        nxt = f.path[1]
        f = _Fork(f.lat - (sig[i] - sig[nxt]) * v, f.owner, f.path[1:])
        if nxt == T:
            finished[key] = f.lat
            forks.pop(key, None)
        else:
            forks[key] = f

    for i in range(T):
        due = [k for k, f in forks.items() if f.path[0] == i]
        owners = torch.cat([everyone] + [forks[k].owner for k in due])
        batch_x = torch.cat([x] + [forks[k].lat for k in due])
        v_all = _velocity(model, batch_x, sig[i], cond.index(owners), None if uncond is None else uncond.index(owners),
                          plan.guidance_scale, plan.max_batch, call_rows)
        evals += batch_x.shape[0]
        calls += 1
        v = v_all[:n]
        lo = n
        for k in due:
            m = forks[k].lat.shape[0]
            advance(k, forks[k], v_all[lo:lo + m], i)
            lo += m
        if tail is not None and i == window[-1] + 1:  # MixGRPO-Flash: the rest on the compressed grid
            x, e, c = _dpm_tail(model, x, v, tail, history, cond, uncond, plan, call_rows)
            evals, calls = evals + e, calls + c
            break
        history = (x - sig[i] * v, sig[i])  # this step's data prediction x̂0 = x − σ·v (DPM++ 2M history)
        if i not in w_pos:
            x = x - (sig[i] - sig[i + 1]) * v
            continue
        k = w_pos[i]
        window_latents.append(x)
        if plan.fork_window_states:  # TP-GRPO: ODE completion of the state before window step k
            path = completion_path(i, T, plan.completion_steps)
            fork_paths[k] = path
            if lockstep:  # the first step reuses the main trajectory's velocity at x_i
                advance(k, _Fork(x, everyone, path), v, i)
            else:
                pending[k] = _Fork(x, everyone, path)
        if C:  # TempFlow-GRPO: C children leave x_i by one stochastic step, then finish with the ODE
            owner = everyone.repeat_interleave(C)
            mean, std = transition(plan.kernel, x[owner], v[owner], sig[i], sig[i + 1], plan.noise_level)
            nxt = mean + std * _draw([generators[o] for o in owner.tolist()], shape)
            if means is not None:  # every child of a state has the same transition mean
                means[:, k] = mean.view(n, C, *shape)[:, 0]
            child_next[:, k] = nxt.view(n, C, *shape)
            child_logp[:, k] = log_prob(nxt, mean, std, plan.logprob).view(n, C)
            path = completion_path(i + 1, T, plan.completion_steps)
            fork_paths[len(window) + k] = path
            forks[len(window) + k] = _Fork(nxt, owner, path)
            x = x - (sig[i] - sig[i + 1]) * v  # the main trajectory itself stays on the ODE
        else:
            mean, std = transition(plan.kernel, x, v, sig[i], sig[i + 1], plan.noise_level)
            if means is not None:
                means[:, k] = mean
            x = mean + std * _draw(generators, shape)
            log_probs[:, k] = log_prob(x, mean, std, plan.logprob)
        next_latents.append(x)

    for k, f in pending.items():  # one origin state after another (the reference's behaviour)
        while f.path[0] != T:
            i = f.path[0]
            vk = _velocity(model, f.lat, sig[i], cond.index(f.owner), None if uncond is None else uncond.index(f.owner),
                           plan.guidance_scale, plan.max_batch, call_rows)
            evals += f.lat.shape[0]
            calls += 1
            advance(k, f, vk, i)
            f = forks.pop(k, None) or _Fork(finished[k], f.owner, [T])

    W = len(window)
    empty = x.new_zeros((n, 0, *shape))
    return Rollout(
        window=window,
        window_latents=torch.stack(window_latents, dim=1) if W else empty,
        next_latents=torch.stack(next_latents, dim=1) if W else empty,
        log_probs=log_probs,
        final_latents=x,
        fork_latents=torch.stack([finished[k] for k in range(W)], dim=1) if plan.fork_window_states else None,
        child_next_latents=child_next,
        child_log_probs=child_logp,
        child_final_latents=(torch.stack([finished[W + k].view(n, C, *shape) for k in range(W)], dim=1)
                             if C else None),
        transition_means=means,
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
