"""The built-in world's learned reward (shapes_pref): its losses and measurements from their definitions, the
committed weights' behaviour, the held-out rule metric in evaluation, and TP-GRPO's diagnostics and dense ablation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from tpgrpo.config import ConfigError, load_config
from tpgrpo.methods import ScoredRollout, build_method
from tpgrpo.rewards import build_reward
from tpgrpo.shapes.grammar import parse_prompt, split_prompts
from tpgrpo.shapes.preference import ShapesPreferenceModel
from tpgrpo.shapes.pretrain import neighbours
from tpgrpo.shapes.pretrain_reward import (bradley_terry_loss, clip_loss, pairwise_accuracy, ranked_pairs)
from tpgrpo.shapes.render import render_prompt


# --- losses and measurements, by hand ---------------------------------------------------------------------------
def test_clip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2·img·txtᵀ = [[2, 1.2], [0, 1.6]]; image→text rows, text→image columns.
    i2t = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) + math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    t2i = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    got = clip_loss(img, txt, ["a circle", "a square"], scale)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_clip_loss_rows_with_the_same_caption_share_the_target():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Every logit is equal and both rows are positives: the target (½, ½) is the softmax itself; loss = log 2.
    assert clip_loss(img, txt, ["a circle", "a circle"], torch.tensor(5.0)).item() == pytest.approx(math.log(2))


def test_bradley_terry_loss_by_hand():
    s_b, s_w = torch.tensor([0.3, 0.1]), torch.tensor([0.1, 0.3])
    expected = (math.log1p(math.exp(-10 * 0.2)) + math.log1p(math.exp(10 * 0.2))) / 2
    assert bradley_terry_loss(s_b, s_w, torch.tensor(10.0)).item() == pytest.approx(expected, rel=1e-6)


def test_ranked_pairs_and_pairwise_accuracy():
    groups = np.array([0, 0, 0, 1, 1, 2])
    key = np.array([1.0, 2.0, 2.0, 0.0, 3.0, 5.0])
    pairs = {tuple(p) for p in ranked_pairs(groups, key).tolist()}
    assert pairs == {(1, 0), (2, 0), (4, 3)}  # equal keys and single-sample groups make no pair
    score = np.array([0.0, 0.5, 0.0, 1.0, 0.2, 9.0])
    # (1,0): right; (2,0): a tie, ½; (4,3): wrong → 1.5 / 3.
    acc, n = pairwise_accuracy(groups, key, score)
    assert (acc, n) == (pytest.approx(0.5), 3)


# --- the model and its committed weights ------------------------------------------------------------------------
def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    m = ShapesPreferenceModel({"channels": 8, "embed_dim": 16, "text_width": 16, "text_layers": 1, "heads": 2})
    path = tmp_path / "pref.safetensors"
    m.save(path)
    a, b = ShapesPreferenceModel.load(path), ShapesPreferenceModel.load(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "two squares", "a circle left of a square"]
    sa = a.score(x, prompts)
    assert torch.equal(sa, b.score(x, prompts))  # the same file and inputs through the same code
    assert bool(((sa >= -1 - 1e-6) & (sa <= 1 + 1e-6)).all())
    assert not any(p.requires_grad for p in a.parameters())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a shapes preference model"):
        ShapesPreferenceModel.load(bad)
    with pytest.raises(FileNotFoundError, match="pretrain-reward"):
        ShapesPreferenceModel.load(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def pref_reward():
    return build_reward("shapes_pref")


def test_committed_reward_prefers_the_render_of_the_prompt_over_its_neighbour(pref_reward):
    """On exact renders of train prompts, the committed model scores the prompt's own render above the render of a
    neighbour (one slot changed) in most cases: it reads shapes, counts, colours and relations."""
    train = split_prompts("train")
    near = neighbours(train)
    rng = np.random.default_rng(0)
    specs = [train[i] for i in rng.choice(len(train), 120, replace=False) if near[train[i].text]]
    own = np.stack([render_prompt(s, 10_000 + k) for k, s in enumerate(specs)])
    other = np.stack([render_prompt(near[s.text][k % len(near[s.text])], 20_000 + k) for k, s in enumerate(specs)])
    texts = [s.text for s in specs]
    a = pref_reward(own, texts)["shapes_pref"]
    b = pref_reward(other, texts)["shapes_pref"]
    assert np.mean(a > b) >= 0.8


def test_committed_reward_is_continuous(pref_reward):
    """A small change of an image changes its learned score (a rule score with few levels would not move)."""
    img = render_prompt(parse_prompt("two circles"), 3)[None]
    moved = img.copy()
    moved[0, 10:12, 10:12] = np.clip(moved[0, 10:12, 10:12].astype(int) + 30, 0, 255).astype(np.uint8)
    s = pref_reward(np.concatenate([img, moved]), ["two circles"] * 2)["shapes_pref"]
    assert s[0] != s[1]
    assert np.all(np.abs(s) <= 1 + 1e-6)


def test_reward_rejects_bad_input(pref_reward):
    with pytest.raises(ValueError, match="shapes_pref: 1 images but 2 prompts"):
        pref_reward(np.zeros((1, 32, 32, 3), np.uint8), ["a circle", "a square"])
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        pref_reward.validate_prompts(["a dog"])
    with pytest.raises(ValueError, match="batch_size"):
        build_reward("shapes_pref", batch_size=0)


# --- configuration ----------------------------------------------------------------------------------------------
def test_held_out_reward_must_not_be_trained():
    with pytest.raises(ConfigError, match="held_out.*also a training reward"):
        load_config(None, ["reward.name=shapes", "reward.held_out=shapes"])


def test_reference_regime_presets_have_no_degenerate_trained_step():
    from tpgrpo.models import model_sigmas
    from tpgrpo.sampling import transition_std

    for name in ("tpgrpo_latent_pref", "flow_grpo_latent_pref"):
        cfg = load_config(f"configs/{name}.yaml")
        s = cfg.sampling
        assert (s.num_steps, s.window_size, cfg.reward.name, cfg.reward.held_out) == (10, 9, "shapes_pref", "shapes")

        class _Model:  # model_sigmas reads only the pipeline attributes a real adapter may carry
            pass

        sig = model_sigmas(_Model(), s, s.num_steps)
        stds = [float(transition_std(s.kernel, sig[i], sig[i + 1], s.noise_level)) for i in range(s.window_size)]
        assert min(stds) > 0.05, stds


# --- TP-GRPO: the dense ablation and the diagnostics ------------------------------------------------------------
def _credit(overrides, R):
    cfg = load_config(None, ["algorithm=tpgrpo", *overrides])
    m = build_method("tpgrpo", cfg)
    R = torch.tensor(R, dtype=torch.float64)
    n = len(R)
    scored = ScoredRollout(R[:, -1], R[:, :-1])
    groups = torch.zeros(n, dtype=torch.long)
    return m.credit(scored, groups, groups, list(range(R.shape[1] - 1)), torch.Generator().manual_seed(0))


def test_dense_ablation_gives_group_normalised_incremental_rewards():
    # Two trajectories of one group, W = 2. r = [[.1, .2], [.3, -.2]]; per step, the group mean and population std:
    # step 1: mean .2, std .1 → [−1, 1]; step 2: mean 0, std .2 → [1, −1] (÷ (std + 1e-4)).
    R = [[0.0, 0.1, 0.3], [0.0, 0.3, 0.1]]
    credit = _credit(["tpgrpo.turning_points=false"], R)
    expected = torch.tensor([[-0.1 / 0.1001, 0.2 / 0.2001], [0.1 / 0.1001, -0.2 / 0.2001]])
    assert torch.allclose(credit.advantages, expected.float(), atol=1e-6)
    assert not credit.stats["is_tp"].any()
    # With turning points, trajectory 1 (D = +1) has a first-step turning point at step 1 (g_1 = .3): different.
    with_tp = _credit([], R)
    assert with_tp.stats["is_tp"].any()
    assert not torch.allclose(with_tp.advantages, credit.advantages)


def test_diagnostics_count_exact_zero_incremental_rewards():
    R = [[0.5, 0.5, 1.0], [0.5, 0.0, 0.0], [1.0, 1.0, 1.0]]
    st = _credit([], R).stats["tp"]
    # r = [[0, .5], [−.5, 0], [0, 0]]: step 1 has two zeros of three, step 2 two of three.
    assert st["r_zero_per_step"] == pytest.approx([2 / 3, 2 / 3])


# --- end to end: train on the learned reward, report the rule scorer --------------------------------------------
def test_training_on_the_learned_reward_reports_the_held_out_rule_metric(tiny_model_path, tmp_path):
    from tpgrpo.trainer import Trainer

    ov = tiny_overrides(tiny_model_path, tmp_path / "run", **{
        "algorithm": "tpgrpo", "reward.name": "shapes_pref", "reward.held_out": "shapes", "training.epochs": 1,
        "training.eval_every": 1})
    Trainer(load_config(None, ov), log_trackers=False).train()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = recs[-1]["eval"]
    assert ev["held_out_name"] == "shapes_partial"
    assert 0.0 <= ev["strict"] <= 1.0 and 0.0 <= ev["held_out"] <= 1.0
    assert -1.0 <= ev["partial"] <= 1.0  # the learned score's cosine
    assert all("held_out" in v for v in ev["per_tag"].values())
    train_rec = next(r for r in recs if "tp" in r)
    assert len(train_rec["adv_zero_per_step"]) == 2 and len(train_rec["tp"]["r_zero_per_step"]) == 2
    from tpgrpo.compare import run_diagnostics
    from tpgrpo.report import write_run_report

    page = write_run_report(tmp_path / "run").read_text()
    assert "held out: shapes_partial" in page and "Turning points" in page
    diag = run_diagnostics(recs)
    assert len(diag["adv_zero_per_step"]) == 2 and len(diag["r_zero_per_step"]) == 2


def test_evaluation_scorers_see_their_own_copy_of_the_images(tiny_model):
    from tpgrpo.evaluation import evaluate
    from tpgrpo.prompts import load_prompt_source
    from tpgrpo.sampling import sigma_schedule

    class Vandal:  # a trained reward that blanks its input in place
        primary = "vandal"

        def __call__(self, images, prompts, metadata=None):
            images[:] = 0
            return {"vandal": np.zeros(len(images))}

    rule = build_reward("shapes")
    src = load_prompt_source("shapes:test", "data.eval_prompts")
    res = evaluate(tiny_model, src, Vandal(), sigma_schedule(2), guidance_scale=1.0, per_tag=1, held_out=rule)
    assert res["images"].any()  # the saved images are the model's, not the vandal's zeros
    again = rule(res["images"], res["prompts"])
    assert np.array_equal(again["shapes_partial"], res["held_out_scores"])


# --- tpgrpo pretrain-reward -------------------------------------------------------------------------------------
def _pretrain(out, steps, **kw):
    from tpgrpo.shapes.pretrain_reward import RewardPretrainConfig, pretrain_reward

    cfg = RewardPretrainConfig(out=str(out), base="latent", steps=steps, batch_size=4, pairs=4,
                               pool_per_prompt=2, warmup=1, ckpt_every=2, agreement_groups=1, agreement_per_group=2,
                               **kw)
    return pretrain_reward(cfg)


@pytest.mark.slow
def test_pretrain_reward_resumes_exactly_and_reports_agreement(tmp_path):
    full = _pretrain(tmp_path / "full", 4)
    _pretrain(tmp_path / "part", 2)
    (tmp_path / "part" / "shapes_pref.safetensors").unlink()
    resumed = _pretrain(tmp_path / "part", 4)
    from safetensors.torch import load_file

    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same code, same inputs, same order
    rep = json.loads((tmp_path / "full" / "agreement.json").read_text())
    for split in ("train", "test"):
        assert rep[split]["samples"] == 6 * 1 * 2 and set(rep[split]["per_tag"]) == {
            "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert set(rep["smoothness"]) == {"0.05", "0.1", "0.2"}
    assert rep["throughput"]["learned_images_per_s"] > 0 and rep["throughput"]["rule_images_per_s"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "expected an integer in [1, 1000000]"),
    (["--pref-weight", "-1"], "pref-weight must be >= 0"),
    (["--base", "missing.safetensors"], "missing.safetensors"),
    (["--warmup", "-1"], "warmup must be >= 0"),
])
def test_pretrain_reward_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    from tpgrpo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain-reward", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and needle in err[0]  # argparse's usage lines aside, one line says what is wrong


def test_pretrain_reward_refuses_a_pool_without_preference_pairs(tiny_model_path, tmp_path):
    """A base model whose samples all score the same gives no pairs: a clear error, not a crash in the loop."""
    from tpgrpo.shapes.pretrain_reward import RewardPretrainConfig, pretrain_reward

    out = tmp_path / "o"
    out.mkdir()
    np.savez(out / "pool.npz", images=np.zeros((2, 32, 32, 3), np.uint8), latents=np.zeros((2, 4, 8, 8), np.float32),
             partial=np.zeros(2), strict=np.zeros(2), group=np.zeros(2, np.int64), texts=np.array(["a circle"] * 2),
             tags=np.array(["single_object"] * 2))
    with pytest.raises(ValueError, match="no preference pairs"):
        pretrain_reward(RewardPretrainConfig(out=str(out), base=str(tiny_model_path), steps=1))


def test_equal_time_checkpoint_is_the_latest_within_the_budget(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("equal_time_eval",
                                                  Path(__file__).parents[1] / "scripts" / "equal_time_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    recs = [{"epoch": 0, "eval": {}}] + [{"epoch": e, "time_epoch": 10.0} for e in range(1, 7)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for e in (2, 4, 6):
        (run / "checkpoints" / f"epoch_{e:06d}").mkdir()
    assert mod.cumulative_seconds(run) == {e: 10.0 * e for e in range(1, 7)}
    assert mod.checkpoint_at(run, 45.0) == (4, 40.0)   # epoch 4 (40 s) fits, epoch 6 (60 s) does not
    assert mod.checkpoint_at(run, 60.0) == (6, 60.0)
    assert mod.checkpoint_at(run, 15.0) is None


def test_held_out_reward_checks_the_evaluation_prompts(tiny_model_path, tmp_path):
    from tpgrpo.trainer import Trainer

    prompts = tmp_path / "eval.txt"
    prompts.write_text("circle a red\n")  # words the model knows, not a prompt of the grammar
    ov = tiny_overrides(tiny_model_path, tmp_path / "run", **{"reward.name": "brightness", "reward.held_out": "shapes",
                                                            "data.eval_prompts": str(prompts)})
    with pytest.raises(ValueError, match="data.eval_prompts: .*not in the shapes grammar"):
        Trainer(load_config(None, ov), log_trackers=False)
