"""AWM, advantage-weighted matching (tpgrpo.methods.awm): the log-likelihood and the clipped loss by hand and
against a transcription of Flow-Factory's definition, the gradient's direction, the first update on-policy, exact
resume. (The brightness learning check is in tests/test_learning.py.)"""

import json
from functools import partial

import pytest
import torch

from conftest import full_and_resumed, tiny_overrides
from tpgrpo.config import load_config
from tpgrpo.methods.awm import awm_loss, matching_logprob
from tpgrpo.trainer import Trainer


def _reference(model_output, target, t, weighting, adv, old_log_prob, clip):
    """Flow-Factory trainers/awm.py (X-GenGroup/Flow-Factory @0574042), in my words: the log-prob is minus the mean
    squared matching error over all non-batch dimensions, in float64, times t or t² for those weightings
    (``compute_weighted_log_prob``); the loss is mean(max(−A·ρ, −A·clamp(ρ, 1 + lo, 1 + hi))) with ρ = exp(lp − old)
    (``optimize``, step 3), here with a symmetric clip range (lo, hi) = (−ε, ε)."""
    lp = -((model_output.double() - target.double()) ** 2).mean(dim=tuple(range(1, model_output.ndim)))
    if weighting == "t":
        lp = lp * t
    elif weighting == "t2":
        lp = lp * t ** 2
    lp = lp.float()
    ratio = torch.exp(lp - old_log_prob)
    return torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))), lp


def test_logprob_by_hand():
    x0 = torch.zeros(1, 1, 2)
    eps = torch.tensor([[[1.0, 3.0]]])
    t = torch.tensor([0.5])
    xt = (1 - t) * x0 + t * eps
    v = torch.tensor([[[2.0, 3.0]]])  # errors (2 − 1, 3 − 3) = (1, 0): mean square 0.5
    assert matching_logprob(v, x0, xt, t).item() == pytest.approx(-0.5)
    assert matching_logprob(v, x0, xt, t, "t").item() == pytest.approx(-0.25)
    assert matching_logprob(v, x0, xt, t, "t2").item() == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="awm.weighting"):
        matching_logprob(v, x0, xt, t, "huber")


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2"])
def test_loss_matches_the_reference_transcription(weighting):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(6, 4, 3, 3, generator=g)
    v = (v_old + 0.05 * torch.randn(6, 4, 3, 3, generator=g)).requires_grad_(True)
    adv = torch.randn(6, generator=g) * 2
    loss, info = awm_loss(v, v_old, x0, xt, t, adv, clip_range=0.001, adv_clip_max=5.0, weighting=weighting)
    v2 = v.detach().clone().requires_grad_(True)
    _, old = _reference(v_old, eps - x0, t.double(), weighting, adv, torch.zeros(6), 0.001)
    want, _ = _reference(v2, eps - x0, t.double(), weighting, adv, old, 0.001)
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-7)
    loss.backward()
    want.backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-8)
    assert 0 < info["clipfrac"] < 1  # some ratios beyond 1 ± 0.001 here


def test_on_policy_gradient_pulls_good_samples_and_pushes_bad_ones():
    """At ρ = 1 the gradient is −A·∇log p̂: descending it moves v towards ε − x0 for A > 0, away for A < 0."""
    x0, eps, t = torch.zeros(2, 1, 1), torch.ones(2, 1, 1), torch.tensor([0.5, 0.5])
    xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    v = torch.full((2, 1, 1), 0.5, requires_grad=True)  # target 1
    loss, _ = awm_loss(v, v.detach(), x0, xt, t, torch.tensor([1.0, -1.0]), clip_range=0.2, adv_clip_max=5)
    loss.backward()
    assert v.grad[0].item() < 0 < v.grad[1].item()  # a gradient step raises v[0] towards 1, lowers v[1]


def _trainer(model, run, resume=None, **extra):
    ov = {"algorithm": "awm", "reward.name": "jpeg_compressibility", "training.prompts_per_epoch": 2, "training.group_size": 4,
          "training.sample_batch_size": 4, "training.train_batch_size": 4, "training.clip_range": 0.2, **extra}
    return Trainer(load_config(None, tiny_overrides(model, run, **ov)), resume=resume, log_trackers=False)


def test_first_update_is_on_policy_and_resume_is_exact(tiny_model_path, tmp_path):
    tr = _trainer(tiny_model_path, tmp_path / "one", **{"training.epochs": 1})
    assert tr.old is None  # no second copy of the weights: old = the policy before the epoch's updates
    batch, _ = tr.collect(1)
    info = tr.optimise(batch, 1)
    assert info["grad_norm"] > 0 and info["old_deviate"] > 0
    full, resumed = full_and_resumed(partial(_trainer, tiny_model_path), tmp_path, epochs=3, stop=2)
    a, b = full.lora_state(), resumed.lora_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    full_recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in recs] == [r.get("loss") for r in full_recs]
