"""DiffusionNFT (arXiv 2509.16117): the loss from its definition, against a transcription of the reference
(NVlabs/DiffusionNFT @ 24af555, scripts/train_nft_sd3.py L908–970), the old-policy decay (L169–189, L1033–1039),
the deterministic draws of noise levels and noise, and exact resume."""

import json

import pytest
import torch

from tpgrpo.config import ConfigError, load_config
from tpgrpo.methods.diffusion_nft import DiffusionNFT, nft_loss, return_decay

from conftest import tiny_overrides


def _reference_loss(forward_prediction, old_prediction, ref_forward_prediction, x0, xt, t, advantages, beta,
                    adv_clip_max, kl_beta):
    """train_nft_sd3.py L908–970, transcribed (config.beta → beta, config.train.beta → kl_beta; adv_mode 'all')."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return policy_loss + kl_beta * torch.mean(kl_div_loss)


def _inputs(seed=0, B=5, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    te = t.view(-1, 1, 1, 1)
    xt = (1 - te) * x0 + te * eps
    v_old = eps - x0 + 0.3 * torch.randn(B, *shape, generator=g)
    v = (v_old + 0.1 * torch.randn(B, *shape, generator=g)).requires_grad_()
    v_ref = v_old + 0.2 * torch.randn(B, *shape, generator=g)
    adv = torch.randn(B, generator=g) * 4
    return v, v_old, v_ref, x0, xt, t, adv


@pytest.mark.parametrize("beta,kl", [(1.0, 0.0), (0.1, 1e-4), (0.37, 0.5)])
def test_loss_and_gradient_match_the_reference_transcription(beta, kl):
    v, v_old, v_ref, x0, xt, t, adv = _inputs()
    ours, _ = nft_loss(v, v_old, x0, xt, t, adv, beta=beta, adv_clip_max=5.0, v_ref=v_ref, kl_weight=kl)
    (g_ours,) = torch.autograd.grad(ours, v)
    ref = _reference_loss(v, v_old, v_ref, x0, xt, t, adv, beta, 5.0, kl)
    (g_ref,) = torch.autograd.grad(ref, v)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-9)


def test_beta_one_is_flow_matching_weighted_by_r_and_one_minus_r():
    """β = 1: v⁺ = v_θ and v⁻ = 2·v_old − v_θ, so L = c·mean(r·‖x̂0(v_θ) − x0‖²/w⁺ + (1 − r)·‖x̂0(v⁻) − x0‖²/w⁻),
    x̂0(v) = x_t − t·v, i.e. t²·‖v − (ε − x0)‖²/w: flow matching on v_θ (positive) and on the reflected v⁻."""
    v, v_old, _, x0, xt, t, adv = _inputs(1)
    c = 5.0
    loss, _ = nft_loss(v, v_old, x0, xt, t, adv, beta=1.0, adv_clip_max=c)
    te = t.view(-1, 1, 1, 1)
    target = (xt - x0) / te  # ε − x0, the flow-matching target
    r = (adv.clamp(-c, c) / c / 2 + 0.5)
    v_neg = 2 * v_old - v
    w_pos = (te * (v - target)).abs().mean((1, 2, 3))
    w_neg = (te * (v_neg - target)).abs().mean((1, 2, 3))
    fm_pos = (te ** 2 * (v - target) ** 2).mean((1, 2, 3)) / w_pos.detach()
    fm_neg = (te ** 2 * (v_neg - target) ** 2).mean((1, 2, 3)) / w_neg.detach()
    expected = (c * (r * fm_pos + (1 - r) * fm_neg)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0, check_dtype=False)  # w± is float64, as in L942–955


def test_r_one_and_r_zero_and_the_adaptive_weight_by_hand():
    """One sample, one element per side: x0 = 0, x_t = 1, t = 0.5, v_old = 1, v_θ = 2, β = 0.5.
    v⁺ = 1.5, x̂0⁺ = 1 − 0.75 = 0.25, w⁺ = 0.25, L⁺ = 0.0625/0.25 = 0.25;
    v⁻ = 1.5·1 − 0.5·2 = 0.5, x̂0⁻ = 0.75, w⁻ = 0.75, L⁻ = 0.5625/0.75 = 0.75.
    A = +c (r = 1): c·L⁺/β = 2·0.25·… with c = 2: 2·0.25/0.5 = 1.0; A = −c (r = 0): 2·0.75/0.5 = 3.0;
    A = 0 (r = 0.5): 2·(0.125 + 0.375)/0.5 = 2.0; |A| beyond c is clipped."""
    def L(a, v=2.0, x0=0.0):
        return float(nft_loss(torch.tensor([[v]]), torch.tensor([[1.0]]), torch.tensor([[x0]]), torch.tensor([[1.0]]),
                              torch.tensor([0.5]), torch.tensor([a]), beta=0.5, adv_clip_max=2.0)[0])
    assert L(2.0) == pytest.approx(1.0)
    assert L(7.0) == pytest.approx(1.0)
    assert L(-2.0) == pytest.approx(3.0)
    assert L(-9.0) == pytest.approx(3.0)
    assert L(0.0) == pytest.approx(2.0)
    # the adaptive weight is floored at 1e-5: a perfect x0 prediction (x̂0⁺ = x0) gives L⁺ = 0, not NaN
    assert L(2.0, v=1.0, x0=0.5) == pytest.approx(0.0)


def test_gradient_direction_pulls_positive_and_pushes_negative():
    """At v_θ = v_old the gradient of the policy loss is ∝ (2r − 1)·∂‖v − target‖²: descent moves v_θ towards the
    flow-matching target for A > 0 and away from it for A < 0, and not at all for A = 0."""
    _, v_old, _, x0, xt, t, _ = _inputs(2, B=3)
    target = (xt - x0) / t.view(-1, 1, 1, 1)
    v = v_old.clone().requires_grad_()
    loss, _ = nft_loss(v, v_old, x0, xt, t, torch.tensor([3.0, -3.0, 0.0]), beta=1.0, adv_clip_max=5.0)
    (g,) = torch.autograd.grad(loss, v)
    toward = -(g * (target - v_old)).flatten(1).sum(1)
    assert toward[0] > 0 > toward[1]
    assert torch.allclose(g[2], torch.zeros_like(g[2]), atol=1e-6)


def test_return_decay_matches_the_reference_table():
    assert [return_decay(s, 0) for s in (0, 10, 10_000)] == [0.0, 0.0, 0.0]
    assert [return_decay(s, 1) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx([0, 0.001, 0.1, 0.499, 0.5, 0.5])
    assert [return_decay(s, 2) for s in (0, 74, 75, 76, 100, 10_000)] == pytest.approx([0, 0, 0, 0.0075, 0.1875, 0.999])


def test_draws_are_per_sample_and_deterministic():
    cfg = load_config(None, ["algorithm=diffusion_nft", "sampling.num_steps=10"])
    m = DiffusionNFT(cfg)
    assert m.num_train == 9  # int(10 · 0.99), train_nft_sd3.py L569
    sched = torch.linspace(1, 0, 11)
    t1, n1 = m.draw(123, sched, (2, 3))
    t2, n2 = m.draw(123, sched, (2, 3))
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and n1.shape == (9, 2, 3)
    assert len(set(t1.tolist())) == 9 and set(t1.tolist()) <= set(sched[:10].tolist())  # σ_0 … σ_{T−1}, no repeat
    assert not torch.equal(m.draw(124, sched, (2, 3))[1], n1)


def test_config_needs_no_window_for_diffusion_nft():
    load_config(None, ["algorithm=diffusion_nft", "sampling.num_steps=4"])  # the default window_size 9 is unused
    with pytest.raises(ConfigError, match="sampling.window_size"):
        load_config(None, ["algorithm=flow_grpo", "sampling.num_steps=4"])
    with pytest.raises(ConfigError, match="nft.beta"):
        load_config(None, ["algorithm=diffusion_nft", "nft.beta=0"])
    with pytest.raises(ConfigError, match="nft.decay_type"):
        load_config(None, ["algorithm=diffusion_nft", "nft.decay_type=3"])


def _trainer(tiny_model_path, run_dir, resume=None, **extra):
    from tpgrpo.trainer import Trainer

    extra = {"algorithm": "diffusion_nft", "reward.name": "brightness", "nft.decay_type": 2, "training.beta": 0.01, "training.inner_epochs": 2,
             "training.train_batch_size": 4, **extra}
    return Trainer(load_config(None, tiny_overrides(tiny_model_path, run_dir, **extra)), resume=resume,
                   log_trackers=False)


def test_old_policy_update_and_first_epoch(tiny_model_path, tmp_path):
    """Epoch 1 samples and computes v_old with old = initial weights; after the epoch old ← d·old + (1 − d)·θ with
    d = return_decay(optimizer steps) (type 1: 0.001·steps)."""
    tr = _trainer(tiny_model_path, tmp_path / "run", **{"nft.decay_type": 1, "training.epochs": 1})
    before = [p.detach().clone() for p in tr.trainable]
    batch, _ = tr.collect(1)
    info = tr.optimise(batch, 1)
    steps = tr.optimizer_steps
    assert info["old_deviate"] > 0  # v_θ moved away from v_old within the epoch
    assert steps == 4  # 8 samples / 4 per step × 2 inner epochs
    d = 0.001 * steps
    assert info["old_decay"] == pytest.approx(d)
    for o, b, p in zip(tr.old.shadow, before, tr.trainable):
        torch.testing.assert_close(o, d * b + (1 - d) * p.detach(), rtol=1e-6, atol=1e-7)
    assert info["grad_norm"] > 0 and not all(torch.equal(p, b) for b, p in zip(before, tr.trainable))


def test_resume_is_bit_identical(tiny_model_path, tmp_path):
    full = _trainer(tiny_model_path, tmp_path / "full", **{"training.epochs": 4})
    full.train()
    part = _trainer(tiny_model_path, tmp_path / "part", **{"training.epochs": 2})
    part.train()
    assert (tmp_path / "part" / "checkpoints" / "epoch_000002" / "old.safetensors").is_file()
    resumed = _trainer(tiny_model_path, tmp_path / "part", resume=True, **{"training.epochs": 4})
    assert resumed.epoch == 2
    resumed.train()
    assert full.optimizer_steps == resumed.optimizer_steps == 16
    a, b = full.lora_state(), resumed.lora_state()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for pairs in ((full.ema.shadow, resumed.ema.shadow), (full.old.shadow, resumed.old.shadow)):
        for x, y in zip(*pairs):
            assert torch.equal(x, y)
    recs = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    full_recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in recs] == [r.get("loss") for r in full_recs]
    assert recs[-1]["eval"] == full_recs[-1]["eval"]
    # a checkpoint of another method cannot resume a diffusion_nft run (no old weights)
    from tpgrpo.trainer import Trainer
    other = Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path / "grpo", **{"training.epochs": 1})),
                    log_trackers=False)
    other.train()
    from tpgrpo.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="old-policy"):
        _trainer(tiny_model_path, tmp_path / "grpo", resume=str(tmp_path / "grpo" / "checkpoints" / "epoch_000001"),
                 **{"training.epochs": 2})


def test_chunked_calls_accumulate_to_the_same_update(tiny_model_path, tmp_path):
    """training.max_batch splits a micro-batch's model calls; the gradients accumulate to the same update (up to
    float summation order)."""
    whole = _trainer(tiny_model_path, tmp_path / "whole", **{"training.epochs": 1, "training.max_batch": 64})
    split = _trainer(tiny_model_path, tmp_path / "split", **{"training.epochs": 1, "training.max_batch": 3})
    whole.train()
    split.train()
    for a, b in zip(whole.trainable, split.trainable):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_as_one(tiny_model_path, tmp_path):
    """2 gloo processes (torchrun): each rolls out, draws and trains its own rows of every global micro-batch; the
    weights, EMA and old policy match one process's up to float summation order."""
    from safetensors.torch import load_file
    from test_distributed import TORCHRUN, _overrides, _torchrun

    from tpgrpo.trainer import Trainer

    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    extra = {"algorithm": "diffusion_nft", "training.epochs": 2, "training.beta": 0.01, "training.eval_every": 100}
    _torchrun(["-m", "tpgrpo.cli", "train", *_overrides(tiny_model_path, tmp_path / "dist", **extra)])
    Trainer(load_config(None, _overrides(tiny_model_path, tmp_path / "single", **extra)), log_trackers=False).train()
    for name in ("lora", "ema", "old"):
        got = load_file(str(tmp_path / "dist" / "checkpoints" / "epoch_000002" / f"{name}.safetensors"))
        want = load_file(str(tmp_path / "single" / "checkpoints" / "epoch_000002" / f"{name}.safetensors"))
        assert got.keys() == want.keys()
        scale = max(float(v.abs().max()) for v in want.values())
        diff = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert diff <= 1e-5 * scale, (name, diff, scale)
