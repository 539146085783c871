"""SD3 and FLUX adapters on tiny random-weight pipelines built from configs, saved with ``save_pretrained`` and loaded
back through ``load_model`` (the real loading path), with the committed fixture tokenizers (no hub access)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from tpgrpo.config import ModelConfig, load_config
from tpgrpo.export import (LORA_WEIGHT_NAME, add_lora, export_lora, export_lora_cli, load_lora_into, make_reference,
                           prepare_full_finetune)
from tpgrpo.models import load_model, model_sigmas
from tpgrpo.rollout import RolloutPlan, initial_noise, make_generators, sample_ode, sample_rollout
from tpgrpo.sampling import log_prob, sigma_schedule, transition

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
REPO = Path(__file__).resolve().parents[1]
RES = 16          # pixels; the tiny VAE downsamples by 2 → 8×8 latents (FLUX: 4×4 packed tokens)
SEQ = 16          # T5 tokens
PROMPTS = ["a photo of a red cat", "two blue squares left of a green circle"]
FAMILIES = ["sd3", "flux"]


# --- tiny pipelines ---------------------------------------------------------------------------------------------
def _clip(with_projection: bool, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=1100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=1095, eos_token_id=1096, pad_token_id=1096)
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=288, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=RES, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def _tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    return CLIPTokenizer.from_pretrained(FIXTURES / "clip"), T5TokenizerFast.from_pretrained(FIXTURES / "t5")


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, t5_tok = _tokenizers()
    transformer = SD3Transformer2DModel(sample_size=RES // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                        pos_embed_max_size=16, qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(1.5305, 0.0609),
        text_encoder=_clip(True, 16), tokenizer=clip_tok, text_encoder_2=_clip(True, 16), tokenizer_2=clip_tok,
        text_encoder_3=_t5(32), tokenizer_3=t5_tok)


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = _tokenizers()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=_clip(False, 32),
                        tokenizer=clip_tok, text_encoder_2=_t5(32), tokenizer_2=t5_tok, transformer=transformer)


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for family, build in (("sd3", build_sd3), ("flux", build_flux)):
        d = tmp_path_factory.mktemp(f"{family}_pipeline")
        build().save_pretrained(str(d), safe_serialization=True)
        out[family] = d
    return out


def model_cfg(pipeline_dirs, family, **kw) -> ModelConfig:
    return ModelConfig(kind=family, path=str(pipeline_dirs[family]), resolution=RES, max_sequence_length=SEQ,
                       device="cpu", **kw)


def _perturb_lora(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _inputs(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.latent_shape(), generator=g)
    cond = model.encode_prompts(PROMPTS[:n])
    uncond = model.encode_prompts([""]).expand(n)
    return x, cond, uncond


# --- loading ----------------------------------------------------------------------------------------------------
def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_model(ModelConfig(kind="sd3", path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_model(ModelConfig(kind="flux", path=str(tmp_path)))
    with pytest.raises(ValueError, match="model.path: required"):
        load_model(ModelConfig(kind="sd3"))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_encode_sample_decode(pipeline_dirs, family):
    model = load_model(model_cfg(pipeline_dirs, family))
    assert model.latent_shape() == (16, RES // 2, RES // 2)
    assert not any(p.requires_grad for m in [model.vae, *model.text_encoders] for p in m.parameters())
    emb = model.encode_prompts(PROMPTS)
    assert emb.hidden.dtype == torch.float32 and emb.pooled.dtype == torch.float32
    assert emb.hidden.shape[0] == 2 and emb.pooled.shape == (2, 32)
    uncond = model.encode_prompts([""]).expand(2)
    gens = make_generators([3, 4])
    noise = initial_noise(gens, model.latent_shape())
    plan = RolloutPlan(sigmas=sigma_schedule(4, 3.0), kernel="cps", noise_level=0.7, window=[0, 1],
                       fork_window_states=True, guidance_scale=3.0)
    r = sample_rollout(model, plan, emb, uncond, noise, gens)
    assert r.final_latents.shape == (2, 16, RES // 2, RES // 2)
    assert r.fork_latents.shape == (2, 2, 16, RES // 2, RES // 2)
    assert r.log_probs.shape == (2, 2)
    for t in (r.final_latents, r.fork_latents, r.log_probs):
        assert torch.isfinite(t).all()
    images = model.decode(r.final_latents)
    assert images.dtype == np.uint8 and images.shape == (2, RES, RES, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_ode_sampling_matches_the_diffusers_pipeline(pipeline_dirs, family):
    """Our conventions (timestep, CFG / guidance embedding, packing, schedule) reproduce the pipeline's sampler."""
    model = load_model(model_cfg(pipeline_dirs, family))
    x, cond, uncond = _inputs(model)
    T, g = 3, 3.5
    pipe = model.pipe
    sig = model_sigmas(model, load_config(None, [f"sampling.shift={pipe.scheduler.config.shift}"]).sampling, T)
    if family == "sd3":
        ours = sample_ode(model, sig, cond, uncond, x, g)
        ref = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.hidden,
                   negative_pooled_prompt_embeds=uncond.pooled, latents=x.clone(), num_inference_steps=T,
                   guidance_scale=g, height=RES, width=RES, output_type="latent").images
    else:  # FluxPipeline's own σ grid (linspace(1, 1/T, T), shifted by μ): what users evaluate with
        ours = sample_ode(model, sig, cond, None, x, g)
        packed = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, latents=model.pack(x.clone()),
                      num_inference_steps=T, guidance_scale=g, height=RES, width=RES, output_type="latent").images
        ref = model.unpack(packed, RES // 2, RES // 2)
        assert torch.allclose(pipe.scheduler.sigmas, sig, atol=1e-7)
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


# --- training ---------------------------------------------------------------------------------------------------
def _train_step(model, lr=1e-2):
    x, cond, uncond = _inputs(model)
    sig, sig_next = 0.8, 0.6
    with torch.no_grad():
        v0 = model.velocity(x, sig, cond, uncond, 3.0)
        mean0, std = transition("cps", x, v0, sig, sig_next, 0.7)
        x_next = mean0 + std * torch.randn_like(x)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    model.transformer.train()
    v = model.velocity(x, sig, cond, uncond, 3.0)
    assert v.dtype == torch.float32 and v.requires_grad
    mean, std = transition("cps", x, v, sig, sig_next, 0.7)
    logp = log_prob(x_next, mean, std)
    loss = -(torch.tensor([1.0, -0.5]) * logp).mean()
    loss.backward()
    grads = {id(p): p.grad.clone() for p in trainable if p.grad is not None}
    opt.step()
    model.transformer.eval()
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_step_changes_only_lora(pipeline_dirs, family):
    model = load_model(model_cfg(pipeline_dirs, family))
    model.requires_grad_(False)
    add_lora(model, rank=2, alpha=4)
    names = [n for n, _ in model.transformer.named_parameters()]
    lora = {n for n in names if "lora_" in n}
    targets = {n.rsplit(".lora_", 1)[0].split(".", 2)[-1] for n in lora}
    expected = set(model.lora_target_modules)
    found = {t.split("attn.", 1)[-1] for t in targets}
    assert found <= expected and expected - found <= {"to_add_out"}  # SD3's last block has no to_add_out
    before = {n: p.detach().clone() for n, p in model.transformer.named_parameters()}
    _train_step(model)
    after = dict(model.transformer.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in names if n not in lora)


def test_gradient_checkpointing_gives_the_same_gradients(pipeline_dirs):
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = load_model(model_cfg(pipeline_dirs, "sd3", gradient_checkpointing=gc))
        model.requires_grad_(False)
        add_lora(model, rank=2, alpha=4)
        _perturb_lora(model)
        torch.manual_seed(1)
        grads.append(list(_train_step(model).values()))
        assert model.transformer.is_gradient_checkpointing == gc
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_resume_gives_identical_velocities(pipeline_dirs, family, tmp_path):
    from tpgrpo.checkpoint import find_latest_checkpoint, save_checkpoint
    from tpgrpo.ema import EMA

    cfg = load_config(None, [f"model.kind={family}", f"model.path={pipeline_dirs[family]}", f"model.resolution={RES}",
                             f"model.max_sequence_length={SEQ}", "model.device=cpu", "training.lora_rank=2",
                             "training.lora_alpha=4"])
    model = load_model(cfg.model)
    model.requires_grad_(False)
    add_lora(model, cfg.training.lora_rank, cfg.training.lora_alpha)
    _perturb_lora(model)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    lora = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path, 1, {"lora": lora, "ema": EMA(trainable, 0.9).state_dict(),
                                  "optimizer": opt.state_dict(),
                                  "state": {"epoch": 1, "optimizer_steps": 0, "nonfinite_in_row": 0}})
    fresh = load_model(cfg.model)
    load_lora_into(fresh, cfg, find_latest_checkpoint(tmp_path), use_ema=False)
    x, cond, uncond = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.velocity(x, 0.7, cond, uncond, 2.0), fresh.velocity(x, 0.7, cond, uncond, 2.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_lora_loads_with_diffusers(pipeline_dirs, family, tmp_path):
    model = load_model(model_cfg(pipeline_dirs, family))
    add_lora(model, rank=2, alpha=8)  # alpha ≠ rank: the scale must survive the round trip
    _perturb_lora(model)
    path = export_lora(model, tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME and path.is_file()
    fresh = load_model(model_cfg(pipeline_dirs, family))
    x, cond, uncond = _inputs(model)
    with torch.no_grad():
        base = fresh.velocity(x, 0.5, cond, uncond, 2.0)
        fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
        assert fresh.transformer is fresh.pipe.transformer
        ours = model.velocity(x, 0.5, cond, uncond, 2.0)
        theirs = fresh.velocity(x, 0.5, cond, uncond, 2.0)
    assert not torch.allclose(base, ours, atol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_lora_of_the_shapes_model(tiny_model, tiny_model_path, tmp_path):
    from tpgrpo.models.toy import ShapesModel

    add_lora(tiny_model, rank=2, alpha=4)
    _perturb_lora(tiny_model)
    export_lora(tiny_model, tmp_path)
    fresh = ShapesModel.load(tiny_model_path)
    fresh.transformer.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    x = torch.randn(2, *tiny_model.latent_shape())
    cond = tiny_model.encode_prompts(["red circle", "blue square"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.5, cond), tiny_model.velocity(x, 0.5, cond), atol=1e-5,
                                   rtol=1e-5)


def test_export_lora_cli(pipeline_dirs, tmp_path):
    from tpgrpo.checkpoint import save_checkpoint
    from tpgrpo.ema import EMA

    overrides = ["model.kind=sd3", f"model.path={pipeline_dirs['sd3']}", f"model.resolution={RES}",
                 f"model.max_sequence_length={SEQ}", "model.device=cpu", "training.lora_rank=2",
                 "training.lora_alpha=4"]
    cfg = load_config(None, overrides)
    model = load_model(cfg.model)
    model.requires_grad_(False)
    add_lora(model, 2, 4)
    _perturb_lora(model)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    ck = save_checkpoint(tmp_path / "run", 3, {
        "lora": {n: p.detach().clone() for n, p in model.transformer.named_parameters() if p.requires_grad},
        "ema": EMA(trainable, 0.9).state_dict(), "optimizer": {},
        "state": {"epoch": 3, "optimizer_steps": 0, "nonfinite_in_row": 0}})
    rc = export_lora_cli(argparse.Namespace(config=None, overrides=overrides, checkpoint=str(ck),
                                            out=str(tmp_path / "out"), raw=False))
    assert rc == 0 and (tmp_path / "out" / LORA_WEIGHT_NAME).is_file()
    rc = export_lora_cli(argparse.Namespace(config=None, overrides=overrides, checkpoint=str(tmp_path / "nope"),
                                            out=str(tmp_path / "out2"), raw=False))
    assert rc == 2


# --- full fine-tuning and the reference ---------------------------------------------------------------------------
def test_full_finetune_reference_is_a_frozen_copy(pipeline_dirs):
    model = load_model(model_cfg(pipeline_dirs, "sd3", full_finetune=True))
    model.requires_grad_(False)
    ref = make_reference(model)
    trainable = prepare_full_finetune(model)
    assert len(trainable) == len(list(model.transformer.parameters()))
    x, cond, uncond = _inputs(model)
    with torch.no_grad():
        v_before = model.velocity(x, 0.6, cond, uncond, 2.0)
    _train_step(model, lr=1e-2)
    with torch.no_grad():
        v_after = model.velocity(x, 0.6, cond, uncond, 2.0)
    v_ref = ref(x, 0.6, cond, uncond, 2.0)
    assert not v_ref.requires_grad and v_ref.dtype == torch.float32
    assert not torch.allclose(v_after, v_before, atol=1e-4)
    torch.testing.assert_close(v_ref, v_before, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in ref.transformer.parameters())
    assert model.transformer is not ref.transformer


def test_lora_reference_is_the_base_model(pipeline_dirs):
    model = load_model(model_cfg(pipeline_dirs, "flux"))
    x, cond, _ = _inputs(model)
    with torch.no_grad():
        base = model.velocity(x, 0.6, cond, None, 3.5)
    add_lora(model, 2, 4)
    _perturb_lora(model)
    ref = make_reference(model)
    assert ref.transformer is None
    torch.testing.assert_close(ref(x, 0.6, cond, None, 3.5), base, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model.velocity(x, 0.6, cond, None, 3.5), base, atol=1e-4)


def test_bf16_autocast_keeps_fp32_latents_and_lora(pipeline_dirs):
    model = load_model(model_cfg(pipeline_dirs, "sd3", dtype="bf16"))
    assert model.transformer.dtype == torch.bfloat16
    add_lora(model, 2, 4)
    assert all(p.dtype == torch.float32 for n, p in model.transformer.named_parameters() if "lora_" in n)
    x, cond, uncond = _inputs(model)
    with torch.no_grad():
        v = model.velocity(x, 0.5, cond, uncond, 2.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert model.decode(x).dtype == np.uint8


# --- presets ----------------------------------------------------------------------------------------------------
PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("compare_"))  # training presets


@pytest.mark.parametrize("name, epochs", [("compare_shapes", 20), ("compare_latent", 30)])
def test_compare_spec_arms_are_valid_training_configs(name, epochs):
    """Every arm of the shipped comparison specs resolves to a valid training config, also at 16× the samples."""
    from tpgrpo.compare import CompareSpec, scaled_overrides

    spec = CompareSpec.load(REPO / "configs" / f"{name}.yaml")
    assert {"flow_grpo", "tpgrpo"} <= {a.name for a in spec.arms}
    for arm in spec.arms:
        cfg = load_config(REPO / arm.config, spec.common + arm.overrides)
        assert cfg.training.epochs == epochs
        load_config(REPO / arm.config, spec.common + arm.overrides + scaled_overrides(arm, spec.common, [], 16))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_load(path):
    cfg = load_config(path)
    if path.name.startswith("sd35m_"):
        assert cfg.model.kind == "sd3" and cfg.model.path == "stabilityai/stable-diffusion-3.5-medium"
    if path.name.startswith("flux_dev_"):
        assert cfg.model.kind == "flux" and cfg.model.path == "black-forest-labs/FLUX.1-dev"


def test_real_model_presets_exist():
    names = {p.name for p in PRESETS}
    for fam in ("sd35m", "flux_dev"):
        for alg in ("tpgrpo", "flow_grpo", "dance_grpo", "tempflow_grpo", "diffusion_nft", "awm", "mix_grpo",
                    "grpo_guard"):
            assert f"{fam}_{alg}.yaml" in names


# --- the real trainer on a tiny pipeline --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_runs_one_epoch(pipeline_dirs, family, tmp_path):
    from tpgrpo.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n")
    cfg = load_config(None, [
        f"model.kind={family}", f"model.path={pipeline_dirs[family]}", f"model.resolution={RES}",
        f"model.max_sequence_length={SEQ}", "model.device=cpu", f"run_dir={tmp_path / 'run'}",
        f"data.train_prompts={prompts}", f"data.eval_prompts={prompts}", "data.eval_per_tag=2",
        "reward.name=jpeg_compressibility", "sampling.num_steps=3", "sampling.eval_num_steps=2",
        "sampling.window_size=2", "sampling.guidance_scale=2.0", "training.epochs=1", "training.prompts_per_epoch=2",
        "training.group_size=2", "training.sample_batch_size=4", "training.train_batch_size=4",
        "training.lora_rank=2", "training.beta=0.01", "training.eval_every=100"])
    trainer = Trainer(cfg, log_trackers=False)
    before = trainer.lora_state()
    summary = trainer.train()
    assert summary["epoch"] == 1
    after = trainer.lora_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --- the random SD3.5-M-sized pipeline of the GPU benchmark (scripts/make_random_pipeline.py) -------------------
def _random_pipeline_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_random_pipeline", REPO / "scripts" / "make_random_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_pipeline_is_sd35m_sized():
    from diffusers import SD3Transformer2DModel

    mod = _random_pipeline_script()
    with torch.device("meta"):  # shapes only: no memory, no init time
        n = sum(p.numel() for p in SD3Transformer2DModel(**mod.SD35M_TRANSFORMER).parameters())
    assert 2.2e9 < n < 2.3e9  # SD3.5 Medium's MMDiT-X: 2.24 B


def test_random_pipeline_script_builds_a_loadable_pipeline(tmp_path):
    _random_pipeline_script().main([str(tmp_path / "p"), "--size", "tiny", "--dtype", "fp32", "--device", "cpu"])
    model = load_model(ModelConfig(kind="sd3", path=str(tmp_path / "p"), resolution=64, max_sequence_length=SEQ,
                                   device="cpu"))
    assert model.latent_shape() == (16, 8, 8)
    cond = model.encode_prompts(PROMPTS)
    # the stand-in encoders have SD3.5's output widths: CLIP-L + CLIP-G = 2048 pooled, T5 = 4096 per token
    assert cond.pooled.shape == (2, 2048) and cond.hidden.shape == (2, 77 + SEQ, 4096)
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, 0.5, cond, model.encode_prompts([""]).expand(2), guidance_scale=4.5)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert model.decode(x).shape == (2, 64, 64, 3)
