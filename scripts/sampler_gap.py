"""Did training improve the samples it was trained on? (docs/RESULTS.md: settings tried)

Scores the base model and a run's LoRA (EMA) weights on the same fixed-seed *train* prompts with two samplers: the
deterministic ODE (what evaluation uses) and the run's own training kernel over its window (what the rewards of
training came from), both at the run's training step count and guidance. Prints the paired gain ± standard error
of each, so a gain of the training sampler that does not carry over to the ODE shows up directly.

    python scripts/sampler_gap.py RUN_DIR [PER_TAG] [EVAL_SEED]
"""

import json
import sys

import numpy as np
import torch

from tpgrpo.config import load_config
from tpgrpo.export import adapters_disabled, load_lora_into
from tpgrpo.models import load_model, model_sigmas
from tpgrpo.rewards import build_reward
from tpgrpo.rollout import RolloutPlan, initial_noise, make_generators, sample_rollout
from tpgrpo.shapes.grammar import eval_set


def scores(model, plan: RolloutPlan, texts: list[str], seeds: list[int], reward) -> np.ndarray:
    gens = make_generators(seeds)
    noise = initial_noise(gens, model.latent_shape())
    with torch.no_grad():
        out = sample_rollout(model, plan, model.encode_prompts(texts),
                             model.encode_prompts([""]).expand(len(texts)), noise, gens)
    return np.asarray(reward(model.decode(out.final_latents), texts)[reward.primary], np.float64)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    run, per_tag, seed = argv[0], int(argv[1]) if len(argv) > 1 else 32, int(argv[2]) if len(argv) > 2 else 11
    cfg = load_config(f"{run}/config.yaml", [])
    s = cfg.sampling
    if cfg.model.full_finetune:
        sys.exit("sampler_gap.py compares a LoRA run with its base model (adapters off); this run is a full fine-tune")
    model = load_model(cfg.model)
    load_lora_into(model, cfg, run)
    reward = build_reward("shapes")
    items = eval_set(per_tag, "train", seed=seed)
    texts, seeds = [it.prompt.text for it in items], [it.seed for it in items]
    sigmas = model_sigmas(model, s, s.num_steps)
    window = tuple(range(s.window_start_min, s.window_start_min + s.window_size))
    samplers = {"ode": RolloutPlan(sigmas=sigmas, window=(), guidance_scale=s.guidance_scale),
                f"{s.kernel}(η={s.noise_level}) window {window[0]}–{window[-1]}":
                    RolloutPlan(sigmas=sigmas, kernel=s.kernel, noise_level=s.noise_level, window=window,
                                guidance_scale=s.guidance_scale)}
    for name, plan in samplers.items():
        with adapters_disabled(model):
            b = scores(model, plan, texts, seeds, reward)
        t = scores(model, plan, texts, seeds, reward)
        d = t - b
        print(json.dumps({"run": run, "sampler": name, "items": len(d), "base": round(b.mean(), 4),
                          "tuned": round(t.mean(), 4), "gain": round(d.mean(), 4),
                          "se": round(d.std(ddof=1) / len(d) ** 0.5, 4)}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
