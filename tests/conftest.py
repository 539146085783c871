import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY = {"num_layers": 1, "width": 32, "heads": 2, "text_layers": 1}


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny shapes model with random weights, saved like the real base model."""
    from tpgrpo.models.toy import ShapesModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ShapesModel(TINY).save(path)
    return path


@pytest.fixture()
def tiny_model(tiny_model_path):
    from tpgrpo.models.toy import ShapesModel

    return ShapesModel.load(tiny_model_path)


def tiny_overrides(model_path, run_dir, **extra):
    base = {
        "model.path": str(model_path), "run_dir": str(run_dir),
        "sampling.num_steps": 4, "sampling.eval_num_steps": 2, "sampling.window_size": 2,
        "sampling.window_start_max": 1, "sampling.guidance_scale": 2.0,
        "training.epochs": 2, "training.prompts_per_epoch": 2, "training.group_size": 4,
        "training.sample_batch_size": 4, "training.train_batch_size": 4, "training.lr": 1e-3,
        "training.eval_every": 100, "training.checkpoint_every": 1, "training.lora_rank": 2,
        "data.eval_per_tag": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def full_and_resumed(make, tmp_path, epochs: int, stop: int):
    """Train one run for ``epochs`` epochs, and another stopped after ``stop`` epochs and resumed to ``epochs``;
    ``make(run_dir, resume=None, **overrides)`` builds a Trainer. Returns (full, resumed), both trained."""
    full = make(tmp_path / "full", **{"training.epochs": epochs})
    full.train()
    make(tmp_path / "part", **{"training.epochs": stop}).train()
    resumed = make(tmp_path / "part", resume=True, **{"training.epochs": epochs})
    resumed.train()
    return full, resumed
