"""Configuration validation, the command line's bad-input handling and prompt sources (docs/design.md §10)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpgrpo.config import Config, ConfigError, dump_config, load_config, parse_overrides
from tpgrpo.prompts import MAX_PROMPT_CHARS, load_prompt_source
from tpgrpo.shapes.grammar import TAGS, split_prompts

SRC = Path(__file__).resolve().parents[1] / "src"


# --- load_config --------------------------------------------------------------------------------------------------

def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.algorithm == "tpgrpo" and cfg.training.lr == 3e-4 and cfg.sampling.num_steps == 10
    assert cfg.data.train_prompts == "shapes:train" and cfg.data.eval_prompts == "shapes:test"
    assert cfg.samples_per_epoch == cfg.training.prompts_per_epoch * cfg.training.group_size


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ntraining:\n  lr: 0.01\n  epochs: 4\nsampling:\n  kernel: sde\n", encoding="utf-8")
    cfg = load_config(p)
    assert (cfg.seed, cfg.training.lr, cfg.training.epochs, cfg.sampling.kernel) == (3, 0.01, 4, "sde")
    cfg = load_config(p, ["training.lr=1e-3", "seed=5"])
    assert cfg.training.lr == pytest.approx(1e-3) and isinstance(cfg.training.lr, float)
    assert cfg.seed == 5 and cfg.training.epochs == 4  # untouched fields keep the file's values
    assert load_config(str(p)).seed == 3  # str paths work too
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config(empty) == Config()


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["training.lr=0.002", "sampling.kernel=sde", "model.path=weights.safetensors"])
    p = tmp_path / "dumped.yaml"
    p.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(p) == cfg


def test_override_values_are_yaml():
    got = dict(parse_overrides(["a=3", "b=0.5", "c=1.0e-3", "d=true", "e=no", "f=null", "g=~", "h=", "i=hello",
                                "j=[1, 2]", "k='7'", "l=x=y"]))
    assert got == {"a": 3, "b": 0.5, "c": 1e-3, "d": True, "e": False, "f": None, "g": None, "h": None,
                   "i": "hello", "j": [1, 2], "k": "7", "l": "x=y"}
    assert type(got["a"]) is int and type(got["b"]) is float and type(got["d"]) is bool
    cfg = load_config(None, ["training.epochs=7", "training.global_std=true", "model.path=null",
                             "sampling.noise_level=0.5", "tpgrpo.completion_steps=null", "tpgrpo.balance=off"])
    assert cfg.training.epochs == 7 and cfg.training.global_std is True and cfg.model.path is None
    assert cfg.sampling.noise_level == 0.5 and cfg.tpgrpo.completion_steps is None and cfg.tpgrpo.balance is False


@pytest.mark.parametrize("overrides, field", [
    (["bogus=1"], "bogus"),
    (["training.lrr=1"], "training.lrr"),
    (["training.epochs=abc"], "training.epochs"),
    (["training.epochs=1.5"], "training.epochs"),
    (["sampling.noise_level=-0.1"], "sampling.noise_level"),
    (["sampling.window_size=10", "sampling.num_steps=10"], "sampling.window_size"),
    (["sampling.window_start_max=1"], "sampling.window_size"),  # 1 + 9 reaches step 9 of 10
    (["sampling.window_start_min=2", "sampling.window_start_max=1", "sampling.window_size=2"],
     "sampling.window_start_max"),
    (["training.sample_batch_size=7"], "training.sample_batch_size"),
    (["training.train_batch_size=48"], "training.train_batch_size"),
    (["training.group_size=1"], "training.group_size"),
    (["sampling.kernel=ode"], "sampling.kernel"),
    (["training=3"], "training"),
    (["seed.x=1"], "seed"),
    (["training.lr"], "training.lr"),
])
def test_bad_values_name_the_field_on_one_line(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
    assert msg.startswith("config error:")


def _one_line_error(path, overrides=(), contains=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert (contains or Path(path).name) in msg, msg
    return msg


def test_file_errors_name_the_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "missing.yaml")
    bad = tmp_path / "malformed.yaml"
    bad.write_text("training: [1, 2\n  lr: : :\n", encoding="utf-8")
    assert "YAML" in _one_line_error(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- training\n- sampling\n", encoding="utf-8")
    assert "mapping" in _one_line_error(lst)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n", encoding="utf-8")
    assert "mapping" in _one_line_error(scalar)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1  # café\n".encode("latin-1"))
    _one_line_error(latin1)
    _one_line_error(tmp_path, contains=tmp_path.name)  # a directory is not a config file
    nested = tmp_path / "nested.yaml"
    nested.write_text("training:\n  lrr: 1\n", encoding="utf-8")
    _one_line_error(nested, contains="training.lrr")


# --- the command line ---------------------------------------------------------------------------------------------

def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    return subprocess.run([sys.executable, "-m", "tpgrpo.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _assert_bad_input(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_is_runnable_as_a_module(tmp_path):
    res = _cli("--help", cwd=tmp_path)
    assert res.returncode == 0 and "train" in res.stdout


@pytest.mark.parametrize("args, needles", [
    (["training.lrr=1"], ["training.lrr", "unknown key"]),
    (["bogus=1"], ["bogus"]),
    (["training.epochs=abc"], ["training.epochs"]),
    (["training.sample_batch_size=7"], ["training.sample_batch_size"]),
    (["sampling.noise_level=-0.1"], ["sampling.noise_level"]),
    (["--config", "no_such_config.yaml"], ["no_such_config.yaml"]),
    (["training.lr"], ["training.lr"]),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, args, needles):
    _assert_bad_input(_cli("train", *args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path), *needles)


def test_cli_bad_config_file_contents(tmp_path):
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n", encoding="utf-8")
    _assert_bad_input(_cli("train", "--config", lst, cwd=tmp_path), "list.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"seed: 1  # caf\xe9\n")
    _assert_bad_input(_cli("eval", "--config", latin1, cwd=tmp_path), "latin1.yaml")


def test_cli_empty_prompt_file_exits_2_with_one_line(tmp_path, tiny_model_path):
    # The trainer loads the model before the prompt files (≈5–8 s in a subprocess, mostly importing torch and
    # diffusers), so only this one prompt-file case goes through the CLI; the others test load_prompt_source.
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n", encoding="utf-8")
    res = _cli("train", f"model.path={tiny_model_path}", f"run_dir={tmp_path / 'run'}",
               f"data.train_prompts={empty}", cwd=tmp_path)
    _assert_bad_input(res, "data.train_prompts", "empty.txt")


# --- prompt sources -----------------------------------------------------------------------------------------------

def test_shapes_sources():
    for split in ("train", "test"):
        src = load_prompt_source(f"shapes:{split}", "data.train_prompts")
        assert src.prompts == [(p.text, p.tag) for p in split_prompts(split)]
        assert src.tags == list(TAGS) and src.shapes_split == split
    with pytest.raises(ValueError, match="data.eval_prompts: .*'val'"):
        load_prompt_source("shapes:val", "data.eval_prompts")


def test_text_file_source(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# my prompts\n\na red circle\n   two squares   \n  # indented comment\n\nthree triangles\n",
                 encoding="utf-8")
    src = load_prompt_source(str(p), "data.train_prompts")
    assert src.prompts == [("a red circle", "prompts"), ("two squares", "prompts"), ("three triangles", "prompts")]
    assert src.tags == ["prompts"] and src.shapes_split is None
    items = src.eval_items(2)
    assert [(i.text, i.tag) for i in items] == [("a red circle", "prompts"), ("two squares", "prompts")]


def test_sampling_is_deterministic():
    src = load_prompt_source("shapes:train", "data.train_prompts")
    a = src.sample(random.Random(42), 50)
    assert a == src.sample(random.Random(42), 50)
    assert a != src.sample(random.Random(43), 50)
    texts = {t for t, _ in src.prompts}
    assert set(a) <= texts
    # a tag is drawn uniformly first: rare tags (3 single-object prompts out of 190) still appear often
    many = src.sample(random.Random(0), 600)
    single = sum(t in {"a circle", "a square", "a triangle"} for t in many)
    assert 60 < single < 150


@pytest.mark.parametrize("case", ["missing", "empty", "comments_only", "non_utf8", "long_line", "directory"])
def test_bad_prompt_files(tmp_path, case):
    p = tmp_path / "prompts.txt"
    if case == "empty":
        p.write_text("", encoding="utf-8")
    elif case == "comments_only":
        p.write_text("# nothing here\n\n\t\n", encoding="utf-8")
    elif case == "non_utf8":
        p.write_bytes(b"a red circle\na caf\xe9 square\n")
    elif case == "long_line":
        p.write_text("a red circle\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n", encoding="utf-8")
    elif case == "directory":
        p = tmp_path
    with pytest.raises(ValueError) as e:
        load_prompt_source(str(p), "data.train_prompts")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.train_prompts: ") and p.name in msg, msg
    if case == "long_line":
        assert f"{p}:2" in msg
    if case == "non_utf8":
        assert "UTF-8" in msg


def test_prompt_line_at_the_limit_is_accepted(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("y" * MAX_PROMPT_CHARS + "\n", encoding="utf-8")
    assert load_prompt_source(str(p), "data.train_prompts").prompts == [("y" * MAX_PROMPT_CHARS, "prompts")]


def test_prompt_outside_the_vocabulary_fails_before_training(tiny_model_path, tmp_path):
    from conftest import tiny_overrides
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer

    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\na pink elephant\n")
    with pytest.raises(ValueError, match=r"data.train_prompts: .*prompts.txt: .*pink"):
        Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **{"data.train_prompts": str(f)})),
                log_trackers=False)
    f.write_text("a red circle\na circle and a circle\n")  # known words, not in the shapes grammar
    with pytest.raises(ValueError, match=r"not in the shapes grammar"):
        Trainer(load_config(None, tiny_overrides(tiny_model_path, tmp_path / "run", **{"data.train_prompts": str(f)})),
                log_trackers=False)


@pytest.mark.parametrize("override", ["training.epochs=true", "seed=false", "training.lr=true",
                                      "tpgrpo.completion_steps=true"])
def test_boolean_where_a_number_belongs_is_rejected(override):
    from tpgrpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"^config error: {re.escape(override.split('=')[0])}: expected a number"):
        load_config("configs/default.yaml", [override])
    assert load_config("configs/default.yaml", ["tpgrpo.balance=false"]).tpgrpo.balance is False


def test_tag_weights_draw_training_tags_in_proportion():
    import random
    from collections import Counter

    from tpgrpo.prompts import load_prompt_source
    from tpgrpo.shapes.grammar import parse_prompt

    src = load_prompt_source("shapes:train", "data.train_prompts")
    drawn = src.sample(random.Random(0), 6000, {"position": 3, "counting": 1})
    tags = Counter(parse_prompt(p).tag for p in drawn)
    assert set(tags) == {"position", "counting"}  # tags left out have weight 0
    assert tags["position"] / 6000 == pytest.approx(0.75, abs=0.02)
    assert src.sample(random.Random(0), 5) == src.sample(random.Random(0), 5, None)
    with pytest.raises(ValueError, match=r"data\.tag_weights: unknown tag\(s\) positon"):
        src.check_tag_weights({"positon": 1}, "data.tag_weights")
    with pytest.raises(ValueError, match="every tag has weight 0"):
        src.check_tag_weights({"position": 0}, "data.tag_weights")
