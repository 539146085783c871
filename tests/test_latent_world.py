"""The latent built-in world (issue #15): the autoencoder's loss weights by hand, the latent model's protocol
(shapes, decode through the autoencoder, frozen autoencoder, save/load), and two-stage pretraining with exact resume."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tpgrpo.models.shapes_autoencoder import ShapesAutoencoder, object_weights, reconstruction_loss
from tpgrpo.models.toy import LATENT_CONFIG, ShapesModel
from tpgrpo.shapes import pretrain as pretrain_module
from tpgrpo.shapes.grammar import BACKGROUND
from tpgrpo.shapes.pretrain import PretrainConfig, pretrain

TINY_LATENT = {**LATENT_CONFIG, "num_layers": 1, "width": 32, "heads": 2, "text_layers": 1,
               "autoencoder": {"channels": 8, "latent_channels": 4}}


def test_object_weights_by_hand():
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1
    img = bg.view(1, 3, 1, 1).repeat(1, 1, 4, 4)
    img[0, 0, 1, 1] = 0.5  # one object pixel
    w = object_weights(img, bg, 4.0)
    assert w.shape == (1, 1, 4, 4)
    assert w.flatten().tolist() == [1.0] * 5 + [4.0] + [1.0] * 10
    # the loss is the weighted mean over pixels and channels (weights sum to 19 per channel)
    ae = ShapesAutoencoder({"channels": 8}).eval()  # a 4×4 image has a 1×1 latent: running statistics
    torch.manual_seed(0)
    recon, _ = ae(img, 0.0)
    want = (w * (recon - img) ** 2).sum() / (19.0 * 3)
    torch.manual_seed(0)
    assert torch.allclose(reconstruction_loss(ae, img, bg, 4.0, 0.0), want)


def test_latent_model_protocol_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY_LATENT)
    assert model.latent_shape() == (4, 8, 8)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    model.train()
    assert not model.autoencoder.training  # its latent normalisation always uses the running statistics
    x = torch.randn(3, 4, 8, 8)
    cond = model.encode_prompts(["a red circle"] * 3)
    assert model.velocity(x, 0.5, cond, model.encode_prompts([""] * 3), 2.0).shape == x.shape
    images = model.decode(x)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    lat = model.encode_images(images)
    assert lat.shape == (3, 4, 8, 8)
    model.save(tmp_path / "m.safetensors")
    again = ShapesModel.load(tmp_path / "m.safetensors")
    assert again.config["space"] == "latent" and again.config["autoencoder"]["channels"] == 8
    assert np.array_equal(again.decode(x), images)
    assert any(k.startswith("autoencoder.") for k in load_file(str(tmp_path / "m.safetensors")))


def test_two_stage_pretraining_resumes_exactly(tmp_path, monkeypatch):
    common = dict(batch_size=2, steps=3, ckpt_every=1, warmup=1, ae_steps=2, ae_batch_size=2, width=32, layers=1)
    monkeypatch.setattr(pretrain_module, "reconstruction_accuracy", lambda ae, n=300, seed=12345: 0.5)
    monkeypatch.setattr(pretrain_module, "ShapesAutoencoder", lambda: ShapesAutoencoder({"channels": 8}))
    straight = pretrain(PretrainConfig(out=str(tmp_path / "a"), **common))
    save = pretrain_module._save_state
    calls = []

    def die_in_stage_two(path, model, opt, step, rng, cfg):
        save(path, model, opt, step, rng, cfg)
        calls.append(path.name)
        if path.name == "pretrain_state.pt" and step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "_save_state", die_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(out=str(tmp_path / "b"), **common))
    assert calls == ["autoencoder_state.pt", "autoencoder_state.pt", "pretrain_state.pt"]
    monkeypatch.setattr(pretrain_module, "_save_state", save)
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "b"), **common))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = ShapesModel.load(straight)
    assert model.config["space"] == "latent" and model.latent_shape() == (4, 8, 8)
    assert (tmp_path / "a" / "autoencoder_accuracy.txt").read_text().strip() == "0.5000"


@pytest.mark.parametrize("preset", ["configs/diffusion_nft_latent.yaml", "configs/flow_grpo_latent.yaml",
                                    "configs/tpgrpo_latent.yaml", "configs/awm_latent.yaml",
                                    "configs/mix_grpo_latent.yaml", "configs/flow_grpo_guard_latent.yaml",
                                    "configs/dance_grpo_latent.yaml", "configs/tempflow_grpo_latent.yaml"])
def test_latent_presets_run_on_the_shipped_latent_model(tmp_path, preset):
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer

    small = {"run_dir": tmp_path, "training.epochs": 1, "training.prompts_per_epoch": 2, "training.group_size": 4,
             "training.sample_batch_size": 8, "training.train_batch_size": 8, "data.eval_per_tag": 1}
    tr = Trainer(load_config(preset, [f"{k}={v}" for k, v in small.items()]), log_trackers=False)
    assert tr.model.config["space"] == "latent" and tr.model.latent_shape() == (4, 8, 8)
    assert tr.uncond is not None and tr.cfg.sampling.guidance_scale == 1.0
    summary = tr.train()
    assert summary["epoch"] == 1 and (tmp_path / "checkpoints" / "epoch_000001").is_dir()
    assert 0.0 <= summary["eval_after"]["strict"] <= 1.0


def test_shapes_model_sits_on_model_device_and_answers_on_the_states_device():
    """``model.device`` places the built-in model (a GPU by default where one is visible); rollout states stay on
    the host and velocities come back there, as for SD3."""
    from tpgrpo.config import load_config
    from tpgrpo.models import load_model
    from tpgrpo.models.base import default_device

    assert load_model(load_config("configs/flow_grpo_latent.yaml", []).model).device == default_device()
    model = load_model(load_config("configs/flow_grpo_latent.yaml", ["model.device=cpu"]).model)
    assert model.device == torch.device("cpu")
    cond = model.encode_prompts(["a red circle"])
    v = model.raw_velocity(torch.zeros(1, 4, 8, 8), torch.tensor([0.5]), cond)
    assert v.device == torch.device("cpu") and v.dtype == torch.float32 and v.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="model.device: 'nonsense'"):
        load_model(load_config("configs/flow_grpo_latent.yaml", ["model.device=nonsense"]).model)
