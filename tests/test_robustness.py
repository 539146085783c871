"""Hostile input (docs/design.md §10, README "Bad input"): hundreds of bad configurations, CLI arguments and checkpoint
corruptions, each a one-line error with exit code 2 and no traceback; runs that never mix; exact resume from a
checkpoint copied anywhere; a stop at any moment leaves something to resume."""

from __future__ import annotations

import json
import random
import shutil
import typing
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from tpgrpo.checkpoint import CHECKSUMS, find_latest_checkpoint, load_checkpoint
from tpgrpo.cli import main
from tpgrpo.config import Config, _Section, load_config
from tpgrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def _run_cli(argv, capsys) -> tuple[int, str]:
    """``tpgrpo ARGV`` in this process: (exit code, stderr). A traceback would escape as an exception."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_bad(argv, capsys, needle: str | None = None) -> None:
    code, err = _run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, err[-500:])
    assert "Traceback" not in err, (argv, err)
    if lines and lines[0].startswith("usage:"):  # argparse: usage line(s), then one error line
        lines = [ln for ln in lines if ln.startswith("tpgrpo") and "error:" in ln]
    assert len(lines) == 1 and "error" in lines[0], (argv, err)
    if needle is not None:
        assert needle in lines[0], (argv, needle, lines[0])


# --- configurations ---------------------------------------------------------------------------------------------
def _leaf_fields(model=Config, prefix=""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ann


def _kinds(ann) -> set:
    args = typing.get_args(ann)
    return {a for a in (args or (ann,))}


def _bad_values(ann) -> list[str]:
    kinds = _kinds(ann)
    if float in kinds:
        return [".nan", ".inf", "-.inf", "abc", "[1, 2]", "true", "1e400"]
    if int in kinds:
        return ["1.5", ".nan", "abc", "[1]", "true", "1e30", "-99999999999999999999999"]
    if bool in kinds:
        return ["maybe", "[1]", "2"]
    if typing.get_origin(ann) is typing.Literal or any(typing.get_origin(k) is typing.Literal for k in kinds):
        return ["no-such-choice", "[1]", "1"]
    if any(typing.get_origin(k) is dict for k in kinds):
        return ["[1, 2]", "abc"]
    return ["{a: 1}"]  # a mapping where a string or a list belongs


BAD_CONFIGS = [(f"{field}={value}", field.split(".")[-1]) for field, ann in _leaf_fields()
               for value in _bad_values(ann)]
BAD_CONFIGS += [
    ("sampling.num_steps=1000000000", "sampling.num_steps"), ("sampling.eval_num_steps=10000000", "eval_num_steps"),
    ("data.eval_per_tag=1000000000", "eval_per_tag"), ("training.prompts_per_epoch=1000000000", "prompts_per_epoch"),
    ("training.lora_rank=100000", "lora_rank"), ("tempflow.children=1000000000", "children"),
    ("training.lr=inf", "training.lr"), ("training.weight_decay=inf", "weight_decay"),
    ("training.lora_alpha=inf", "lora_alpha"), ("sampling.guidance_scale=inf", "guidance_scale"),
    ("training.clip_range=inf", "clip_range"), ("reward.weights={shapes: .nan}", "weights"),
    ("reward.weights={shapes: 0}", "weights"), ("seed=99999999999999999999999", "seed"), ("seed=-1", "seed"),
    ("model.lora_target_modules=[]", "lora_target_modules"), ("run_dir=", "run_dir"),
    ("training.prompts_per_epoch=65536", "prompts_per_epoch"), ("bogus.section=1", "bogus"),
    ("training=3", "training"), ("training.lrr=1", "lrr"), ("=1", "override"), ("nokey", "override"),
]


def test_at_least_three_hundred_bad_inputs_are_generated():
    assert len(BAD_CONFIGS) + len(BAD_CLI) + len(CORRUPTIONS) >= 300


@pytest.mark.parametrize("override, needle", BAD_CONFIGS)
def test_bad_config_value_is_one_line_exit_2(override, needle, tmp_path, capsys):
    ok_before = load_config(DEFAULT)  # noqa: F841 (the preset itself is valid)
    _assert_bad(["train", "--config", DEFAULT, f"run_dir={tmp_path / 'run'}", override], capsys, needle)


@pytest.mark.parametrize("text, needle", [
    ("a: &x [1, 2]\nb: *x\n", "aliases"),
    ("lol: &a [1,1,1,1,1,1,1,1,1]\nlol2: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nlol3: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n",
     "aliases"),
    ("seed: 1\nseed: 2\n", "duplicate key"),
    ("training:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "duplicate key"),
    ("- a\n", "mapping"), ("seed: [\n", "not valid YAML"), ("\x00\x01\x02", "YAML"),
])
def test_bad_config_files(text, needle, tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    _assert_bad(["train", "--config", f, f"run_dir={tmp_path / 'run'}"], capsys, needle)


def test_utf8_bom_config_and_prompt_file_are_read(tmp_path):
    f = tmp_path / "bom.yaml"
    f.write_bytes(b"\xef\xbb\xbfseed: 3\n")
    assert load_config(f).seed == 3
    from tpgrpo.prompts import load_prompt_source

    p = tmp_path / "prompts.txt"
    p.write_bytes(b"\xef\xbb\xbfa red circle\n")
    assert load_prompt_source(str(p), "data.train_prompts").prompts[0][0] == "a red circle"


# --- CLI arguments and paths ------------------------------------------------------------------------------------
def _cli_cases(tmp: Path, model: str) -> list[tuple[list, str]]:
    a_file = tmp / "a_file.txt"
    garbage = tmp / "garbage.safetensors"
    return [
        (["--threads", "-1", "train"], "--threads"), (["--threads", "0", "train"], "--threads"),
        (["--threads", "abc", "train"], "--threads"),
        (["compare", "--jobs", "-1"], "--jobs"), (["compare", "--threads-per-run", "0"], "--threads-per-run"),
        (["bench", "--repeats", "0"], "--repeats"), (["bench", "--out", tmp], "--out"),
        (["bench", "--out", a_file / "x.json"], "--out"),
        (["pretrain-shapes", "--steps", "-1", "--out", tmp / "p"], "--steps"),
        (["pretrain-shapes", "--steps", "0", "--out", tmp / "p"], "--steps"),
        (["pretrain-shapes", "--batch-size", "0", "--out", tmp / "p"], "--batch-size"),
        (["pretrain-shapes", "--lr", "nan", "--out", tmp / "p"], "--lr"),
        (["pretrain-shapes", "--lr", "-1", "--out", tmp / "p"], "--lr"),
        (["pretrain-shapes", "--lr", "inf", "--out", tmp / "p"], "--lr"),
        (["pretrain-shapes", "--warmup", "-5", "--out", tmp / "p"], "--warmup"),
        (["pretrain-shapes", "--out", a_file], "--out"), (["pretrain-shapes", "--out", a_file / "sub"], "--out"),
        (["pretrain-shapes", "--init", garbage, "--out", tmp / "p"], "--init"),
        (["pretrain-shapes", "--init", tmp / "missing.safetensors", "--out", tmp / "p"], "--init"),
        (["pretrain-shapes", "--seed", "-3", "--out", tmp / "p"], "--seed"),
        (["eval", "--grid", tmp / "g.txt", f"model.path={model}"], "--grid"),
        (["eval", "--grid", tmp, f"model.path={model}"], "--grid"),
        (["eval", "--json", tmp, f"model.path={model}"], "--json"),
        (["eval", "--json", a_file / "out.json", f"model.path={model}"], "--json"),
        (["eval", f"model.path={garbage}"], "garbage.safetensors"),
        (["eval", f"model.path={tmp / 'missing.safetensors'}"], "missing.safetensors"),
        (["eval", "--paired", f"model.path={model}"], "--lora"),
        (["eval", "--lora", tmp / "no_run", f"model.path={model}"], "no_run"),
        (["export-lora", "--checkpoint", tmp / "no_run", "--out", a_file, f"model.path={model}"], "--out"),
        (["train", f"run_dir={a_file}", f"model.path={model}"], "run_dir"),
        (["train", f"run_dir={a_file / 'below'}", f"model.path={model}"], "run_dir"),
        (["train", f"model.path={garbage}", f"run_dir={tmp / 'r'}"], "garbage.safetensors"),
        (["train", "--resume", "--overwrite", f"run_dir={tmp / 'r'}"], "--overwrite"),
        (["train", "--resume", f"run_dir={tmp / 'empty_run'}", f"model.path={model}"], "no checkpoint"),
        (["compare", tmp / "missing_spec.yaml"], "missing_spec.yaml"),
        (["compare", a_file], "a_file.txt"),
        (["report", tmp / "no_run"], "no_run"),
        (["no-such-command"], "invalid choice"),
        (["serve-reward", "--reward", "brightness", "--port", "70000"], "--port"),
        (["serve-reward", "--reward", "brightness", "--port", "-1"], "--port"),
        (["serve-reward", "--reward", "brightness", "--max-request-mb", "nan"], "--max-request-mb"),
        (["serve-reward", "--reward", "brightness", "--max-request-mb", "inf"], "--max-request-mb"),
        (["serve-reward", "--reward", "brightness", "--batch-wait-ms", "nan"], "--batch-wait-ms"),
        (["serve-reward", "--reward", "brightness", "--read-timeout", "inf"], "--read-timeout"),
        (["serve-reward", "--reward", "no_such_reward"], "no_such_reward"),
    ]


BAD_CLI = list(range(45))  # indices into _cli_cases (built per test, with its temporary paths)


@pytest.mark.parametrize("i", BAD_CLI)
def test_bad_cli_argument_is_one_line_exit_2(i, tmp_path, capsys, tiny_model_path):
    (tmp_path / "a_file.txt").write_text("not a directory\n")
    (tmp_path / "garbage.safetensors").write_bytes(random.Random(i).randbytes(512))
    cases = _cli_cases(tmp_path, str(tiny_model_path))
    assert len(cases) == len(BAD_CLI)
    argv, needle = cases[i]
    _assert_bad(argv, capsys, needle)


# --- checkpoints --------------------------------------------------------------------------------------------------
def _train(model_path, run_dir, resume=None, **extra):
    extra.setdefault("reward.name", "jpeg_compressibility")
    tr = Trainer(load_config(None, tiny_overrides(model_path, run_dir, **extra)), resume=resume, log_trackers=False)
    tr.train()
    return tr


@pytest.fixture(scope="module")
def one_checkpoint_run(tiny_model_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckrun") / "run"
    _train(tiny_model_path, run, **{"training.epochs": 1})
    return run


def _flip(path: Path, offset_frac: float, n: int = 4096, seed: int = 0):
    data = bytearray(path.read_bytes())
    lo = min(int(len(data) * offset_frac), max(0, len(data) - n))
    data[lo:lo + n] = random.Random(seed).randbytes(min(n, len(data) - lo))
    path.write_bytes(bytes(data))


CORRUPTIONS = []
for _name in ("lora.safetensors", "ema.safetensors", "optimizer.pt", "state.json", CHECKSUMS):
    CORRUPTIONS += [(_name, "truncate"), (_name, "empty"), (_name, "random"), (_name, "delete")]
for _name in ("lora.safetensors", "ema.safetensors", "optimizer.pt"):
    CORRUPTIONS += [(_name, f"flip{f}") for f in (0.0, 0.5, 0.9)]
CORRUPTIONS += [("state.json", s) for s in ("[]", "{}", '{"epoch": "2", "optimizer_steps": 1, "nonfinite_in_row": 0}',
                                          '{"epoch": -5, "optimizer_steps": 1, "nonfinite_in_row": 0}',
                                          '{"epoch": true, "optimizer_steps": 1, "nonfinite_in_row": 0}',
                                          '{"epoch": 99, "optimizer_steps": 1, "nonfinite_in_row": 0}')]


def _corrupt(ck: Path, name: str, how: str) -> None:
    f = ck / name
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "random":
        f.write_bytes(random.Random(len(name)).randbytes(max(64, f.stat().st_size)))
    elif how == "delete":
        f.unlink()
    elif how.startswith("flip"):
        _flip(f, float(how[4:]))
    else:  # replacement text for state.json, with its checksum updated (a consistent but invalid state)
        f.write_text(how)
        import hashlib

        sums = json.loads((ck / CHECKSUMS).read_text())
        sums[name] = hashlib.sha256(f.read_bytes()).hexdigest()
        (ck / CHECKSUMS).write_text(json.dumps(sums))


@pytest.mark.parametrize("name, how", CORRUPTIONS)
def test_corrupt_checkpoint_is_one_line_naming_the_file(name, how, one_checkpoint_run, tmp_path, capsys,
                                                        tiny_model_path):
    run = tmp_path / "run"
    shutil.copytree(one_checkpoint_run, run)
    ck = find_latest_checkpoint(run)
    _corrupt(ck, name, how)
    if '"epoch": 99' not in how:  # (epoch 99 is a valid checkpoint, but not of a 2-epoch run)
        with pytest.raises(ValueError) as e:
            load_checkpoint(ck)
        assert "\n" not in str(e.value) and str(ck) in str(e.value)
    overrides = tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility", "training.epochs": 2})
    _assert_bad(["train", "--resume", *overrides], capsys, ck.name)
    if '"epoch": 99' not in how:
        _assert_bad(["eval", "--lora", run, *overrides], capsys, ck.name)


def test_resume_falls_back_to_the_previous_checkpoint_and_says_so(tiny_model_path, tmp_path, capsys):
    run = tmp_path / "run"
    _train(tiny_model_path, run, **{"training.epochs": 2})
    _flip(run / "checkpoints" / "epoch_000002" / "lora.safetensors", 0.5)
    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility",
                                                                           "training.epochs": 3})),
                 resume=True, log_trackers=False)
    assert tr.epoch == 1
    assert "epoch_000002" in capsys.readouterr().err


def test_new_run_over_an_old_one_refuses_and_overwrite_replaces_it(tiny_model_path, tmp_path, capsys):
    run = tmp_path / "run"
    _train(tiny_model_path, run, **{"training.epochs": 3})
    before = (run / "metrics.jsonl").read_text()
    overrides = tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility", "training.epochs": 1,
                                                        "seed": 7})
    _assert_bad(["train", *overrides], capsys, "--overwrite")
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched
    code, _ = _run_cli(["train", "--overwrite", *overrides], capsys)
    assert code == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000001", "latest"]
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert load_config(run / "config.yaml").seed == 7


def test_crash_litter_is_tidied_and_latest_agrees_with_resume_and_eval(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    _train(tiny_model_path, run, **{"training.epochs": 2})
    root = run / "checkpoints"
    (root / "latest").write_text("epoch_000001\n")  # a crash between the rename and the pointer update
    (root / ".tmp-epoch_000003-999999999").mkdir()  # a writer killed mid-save (no such process)
    (root / ".tmp-epoch_000003-999999999" / "lora.safetensors").write_bytes(b"half")
    from tpgrpo.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(root / "latest").name == "epoch_000002"  # eval --lora RUN/checkpoints/latest
    assert resolve_checkpoint(run).name == "epoch_000002"              # eval --lora RUN
    tr = Trainer(load_config(None, tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility",
                                                                           "training.epochs": 3})),
                 resume=True, log_trackers=False)
    assert tr.epoch == 2
    assert (root / "latest").read_text().strip() == "epoch_000002"
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_a_metrics_line_cut_by_a_crash_does_not_block_resume(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    _train(tiny_model_path, run, **{"training.epochs": 2})
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "reward_me')
    tr = _train(tiny_model_path, run, resume=True, **{"training.epochs": 3})
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3] and tr.epoch == 3


def test_a_stop_during_the_first_evaluation_leaves_a_resumable_state(tiny_model_path, tmp_path):
    """SIGTERM while epoch 0 is being evaluated: the stop is honoured before epoch 1, with a checkpoint to resume."""
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility"}))
    tr = Trainer(cfg, log_trackers=False)
    real = tr.evaluate

    def evaluate_then_signal(epoch, **kw):
        out = real(epoch, **kw)
        tr._request_stop(15, None)
        return out

    tr.evaluate = evaluate_then_signal
    summary = tr.train()
    assert summary["interrupted"] and summary["epoch"] == 0
    assert find_latest_checkpoint(run).name == "epoch_000000"
    resumed = _train(tiny_model_path, run, resume=True)
    assert resumed.epoch == 2
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2]  # the epoch-0 evaluation is not repeated


def test_resume_from_a_checkpoint_copied_elsewhere_is_bit_identical(tiny_model_path, tmp_path):
    """The way it was once broken: copy an uninterrupted run's checkpoint into a new directory and resume there."""
    extra = {"training.epochs": 4, "training.eval_every": 2}
    full = _train(tiny_model_path, tmp_path / "full", **extra)
    copy = tmp_path / "elsewhere" / "run"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "epoch_000002", copy / "checkpoints" / "epoch_000002")
    resumed = _train(tiny_model_path, copy, resume=True, **extra)
    assert resumed.optimizer_steps == full.optimizer_steps
    a, b = full.lora_state(), resumed.lora_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(full.ema.shadow, resumed.ema.shadow))
