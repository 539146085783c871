"""The README's commands, run as written on tiny models: the built-in run, the SD3.5-M command lines, a custom
reward, and a trained LoRA exported and loaded into a diffusers pipeline. Only what a CPU without a model hub
cannot do is changed: a tiny model (`model.path=`), tiny sizes, and the brightness reward instead of PickScore."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import tiny_overrides
from tpgrpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands(prefix: str) -> list[list[str]]:
    """Every command line of the README's bash blocks that starts with ``prefix`` (comments removed)."""
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.startswith(prefix):
                out.append(shlex.split(line, comments=True))
    assert out, f"README has no command starting with {prefix!r}"
    return out


def _run(argv: list[str], capsys) -> None:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None), (argv, capsys.readouterr().err[-2000:])


def _tiny(model_path, run_dir) -> list[str]:
    return tiny_overrides(model_path, run_dir, **{"training.epochs": 1, "data.eval_per_tag": 1})


def test_built_in_run(tmp_path, capsys, monkeypatch):
    """The README's first training command and its first ``tpgrpo sample`` line, on the shipped latent world (it is
    small enough to run as written), at tiny sizes."""
    monkeypatch.chdir(ROOT)
    cmd = _commands("tpgrpo train --config configs/tpgrpo_latent.yaml")[0]
    assert cmd == ["tpgrpo", "train", "--config", "configs/tpgrpo_latent.yaml"]
    small = {"run_dir": tmp_path / "run", "training.epochs": 1, "training.prompts_per_epoch": 2,
             "training.group_size": 4, "training.sample_batch_size": 8, "training.train_batch_size": 8,
             "data.eval_per_tag": 1}
    _run(cmd[1:] + [f"{k}={v}" for k, v in small.items()], capsys)
    assert (tmp_path / "run" / "checkpoints" / "epoch_000001").is_dir()
    # …and sampling from that run, as the README's first `tpgrpo sample` line does
    sample = _commands("tpgrpo sample -c configs/tpgrpo_latent.yaml --lora runs/tpgrpo_latent")[0]
    sample = [str(tmp_path / "run") if a == "runs/tpgrpo_latent" else str(tmp_path / "samples") if a == "samples"
              else a for a in sample[1:]]
    _run(sample + ["sampling.eval_num_steps=2"], capsys)
    assert len(list((tmp_path / "samples").glob("p0000_s*.png"))) == 8 and (tmp_path / "samples" / "grid.png").is_file()


def test_custom_reward_run(tiny_model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    [cmd] = [c for c in _commands("tpgrpo train") if any(a.startswith("reward.name=examples/") for a in c)]
    _run(cmd[1:] + _tiny(tiny_model_path, tmp_path / "run"), capsys)
    assert "colourfulness_mean" in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    import torch
    from test_models_diffusers import build_sd3

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("sd3_pipeline")
    build_sd3().save_pretrained(str(d), safe_serialization=True)
    return d


def test_sd35m_command_lines_train_and_the_lora_loads_in_diffusers(sd3_dir, tmp_path, capsys, monkeypatch):
    # the prompt file exactly as the README shows it
    [text] = [b for b in _blocks("text") if b.startswith("# data/train.txt")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text(text)
    (tmp_path / "data" / "test.txt").write_text(text)
    one_gpu = _commands("tpgrpo train -c configs/sd35m_tpgrpo.yaml")[0]
    # the multi-GPU lines are the same command behind a launcher (their process path: tests/test_distributed.py)
    args = one_gpu[2:]
    assert _commands("torchrun --nproc_per_node 8 -m tpgrpo.cli train")[0][6:] == args
    assert _commands("accelerate launch --config_file configs/accelerate/multi_gpu.yaml")[0][7:] == args

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "sd35m_tpgrpo.yaml")
    run = tmp_path / "runs" / "sd35m_tpgrpo"
    tiny = [f"model.path={sd3_dir}", "model.resolution=16", "model.max_sequence_length=16", "model.device=cpu",
            "model.dtype=fp32", "reward.name=brightness", f"run_dir={run}", "sampling.num_steps=4",
            "sampling.eval_num_steps=2", "sampling.window_size=2", "training.epochs=1", "training.prompts_per_epoch=2",
            "training.group_size=4", "training.sample_batch_size=4", "training.train_batch_size=4",
            "training.max_batch=8", "training.lora_rank=2", "training.lora_alpha=4", "data.eval_per_tag=1"]
    _run(["train", "-c", config] + one_gpu[4:] + tiny, capsys)

    [export] = _commands("tpgrpo export-lora")
    export = [config if a == "configs/sd35m_tpgrpo.yaml" else a for a in export[1:]]
    _run(export + tiny, capsys)
    lora_dir = tmp_path / "runs" / "sd35m_tpgrpo" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    [snippet] = [b for b in _blocks("python") if "load_lora_weights" in b]
    snippet = (snippet.replace('"stabilityai/stable-diffusion-3.5-medium"', repr(str(sd3_dir)))
                      .replace("torch.float16", "torch.float32")
                      .replace("num_inference_steps=40", "num_inference_steps=2, height=16, width=16"))
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert any("lora" in n for n, _ in scope["pipe"].transformer.named_parameters())
    assert scope["image"].size == (16, 16)


def test_python_api_block_is_the_tested_one():
    [block] = [b for b in _blocks("python") if "from tpgrpo import" in b]
    assert "Trainer(cfg).train()" in block and 'load_config("configs/default.yaml"' in block
    # (run on a tiny model in tests/test_custom_reward.py::test_python_api_trains_the_built_in_world_with_the_example_reward)
