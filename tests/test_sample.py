"""``tpgrpo sample``: the files it writes, seeds that do not depend on batching, ``--lora`` from a run directory, a
checkpoint or an exported LoRA, and one-line exit-2 errors for bad input (before the model loads)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from tpgrpo.checkpoint import save_checkpoint
from tpgrpo.cli import main
from tpgrpo.config import load_config
from tpgrpo.ema import EMA
from tpgrpo.export import LORA_WEIGHT_NAME, add_lora, export_lora
from tpgrpo.models.toy import ShapesModel
from tpgrpo.trainer import Trainer

PROMPTS = ["red circle", "blue square"]


def _overrides(model_path, **extra) -> list[str]:
    fields = {"model.path": str(model_path), "sampling.eval_num_steps": 3, "sampling.guidance_scale": 2.0,
              "training.lora_rank": 2, "training.lora_alpha": 4, **extra}
    return [f"{k}={v}" for k, v in fields.items()]


def _sample(out: Path, model_path, *flags, prompts=PROMPTS, **extra) -> Path:
    argv = ["sample", "--out", str(out), *[a for p in prompts for a in ("--prompt", p)], *map(str, flags),
            *_overrides(model_path, **extra)]
    assert main(argv) == 0
    return out


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("p*_s*.png"))}


def _max_diff(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a)


def test_writes_images_index_csv_and_grid(tiny_model_path, tmp_path):
    out = _sample(tmp_path / "out", tiny_model_path, "--n-per-prompt", 2)
    names = ["p0000_s00.png", "p0000_s01.png", "p0001_s00.png", "p0001_s01.png"]
    assert sorted(p.name for p in out.glob("p*.png")) == names
    index = json.loads((out / "index.json").read_text())
    assert [e["file"] for e in index["images"]] == names
    assert [e["prompt"] for e in index["images"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert len({e["seed"] for e in index["images"]}) == 4
    assert index["settings"]["steps"] == 3 and index["settings"]["sampler"] == "ode"
    rows = list(csv.DictReader(open(out / "index.csv", encoding="utf-8")))
    assert [(r["file"], r["prompt"], int(r["seed"])) for r in rows] == \
        [(e["file"], e["prompt"], e["seed"]) for e in index["images"]]
    assert np.asarray(Image.open(out / "p0000_s00.png")).shape == (32, 32, 3)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 32 and grid.height > 32
    # the same prompts from a file (comments and blank lines skipped) give the same images
    (tmp_path / "prompts.txt").write_text("# two prompts\nred circle\n\nblue square\n")
    argv = ["sample", "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "file", "--n-per-prompt", 2,
            *_overrides(tiny_model_path)]
    assert main([str(a) for a in argv]) == 0
    assert all((tmp_path / "file" / n).read_bytes() == (out / n).read_bytes() for n in names)


@pytest.mark.parametrize("sampler", ["ode", "cps", "sde"])
def test_seeded_per_image_whatever_the_batch(sampler, tiny_model_path, tmp_path):
    flags = ["--n-per-prompt", 2, "--sampler", sampler, "--steps", 4]
    a = _sample(tmp_path / "a", tiny_model_path, *flags)
    b = _sample(tmp_path / "b", tiny_model_path, *flags)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in _images(a))  # same run: same bytes
    assert _max_diff(_images(a), _images(_sample(tmp_path / "c", tiny_model_path, *flags, "--seed", 1))) > 10
    # one image per model call: the same images up to the last float bits of a differently composed batch
    single = _images(_sample(tmp_path / "d", tiny_model_path, *flags, **{"training.max_batch": 1}))
    assert _max_diff(_images(a), single) <= 1
    # image (i, j) does not depend on the other prompts or samples
    alone = _images(_sample(tmp_path / "e", tiny_model_path, "--sampler", sampler, "--steps", 4, prompts=PROMPTS[:1]))
    assert np.abs(alone["p0000_s00.png"].astype(int) - _images(a)["p0000_s00.png"]).max() <= 1
    if sampler != "ode":
        ode = _images(_sample(tmp_path / "ode", tiny_model_path, "--n-per-prompt", 2, "--steps", 4))
        assert _max_diff(_images(a), ode) > 10


@pytest.fixture(scope="module")
def trained_run(tiny_model_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("samplerun") / "run"
    cfg = load_config(None, tiny_overrides(tiny_model_path, run, **{"reward.name": "jpeg_compressibility",
                                                                     "training.lr": 5e-2, "training.ema_decay": 0.5}))
    Trainer(cfg, log_trackers=False).train()
    return run


def test_lora_from_a_run_directory(trained_run, tiny_model_path, tmp_path):
    base = _images(_sample(tmp_path / "base", tiny_model_path))
    run = _sample(tmp_path / "run", tiny_model_path, "--lora", trained_run)
    assert _max_diff(base, _images(run)) > 10
    latest = _sample(tmp_path / "latest", tiny_model_path, "--lora", trained_run / "checkpoints" / "latest")
    assert all((latest / n).read_bytes() == (run / n).read_bytes() for n in base)
    raw = _images(_sample(tmp_path / "raw", tiny_model_path, "--lora", trained_run, "--raw"))
    assert _max_diff(raw, _images(run)) > 10  # the EMA is not the raw weights
    assert json.loads((run / "index.json").read_text())["settings"]["lora_weights"] == "ema"


def test_lora_rank_and_alpha_come_from_the_run(trained_run, tiny_model_path, tmp_path):
    """A run trained with rank 2 loads whatever rank and alpha ``-c`` says: its own config.yaml decides."""
    run = _images(_sample(tmp_path / "run", tiny_model_path, "--lora", trained_run))
    other = _images(_sample(tmp_path / "other", tiny_model_path, "--lora", trained_run,
                            **{"training.lora_rank": 4, "training.lora_alpha": 32}))
    assert _max_diff(run, other) == 0



def test_lora_loaded_from_a_run_directory_keeps_the_runs_alpha(trained_run, tiny_model_path):
    """``eval --lora RUN`` passes the run directory itself: its alpha must still come from the run."""
    from tpgrpo.export import load_lora_into

    models = []
    for alpha in (4, 32):  # the run's own alpha, and another -c
        model = ShapesModel.load(tiny_model_path)
        load_lora_into(model, load_config(None, _overrides(tiny_model_path, **{"training.lora_alpha": alpha})),
                       trained_run)
        models.append(model)
    x, sigma = torch.randn(2, *models[0].latent_shape(), generator=torch.Generator().manual_seed(0)), 0.7
    cond = models[0].encode_prompts(PROMPTS)
    with torch.no_grad():
        assert torch.equal(*(m.velocity(x, sigma, cond, None, 1.0) for m in models))

def _checkpoint(model, run_dir: Path, params) -> Path:
    params = list(params)
    return save_checkpoint(run_dir, 1, {"lora": {n: p.detach().clone() for n, p in params},
                                        "ema": EMA([p for _, p in params], 0.9).state_dict(), "optimizer": {},
                                        "state": {"epoch": 1, "optimizer_steps": 1, "nonfinite_in_row": 0}})


def test_exported_lora_gives_the_checkpoints_images(tiny_model_path, tmp_path):
    model = ShapesModel.load(tiny_model_path)
    add_lora(model, rank=2, alpha=4)
    g = torch.Generator().manual_seed(1)
    lora = [(n, p) for n, p in model.transformer.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for _, p in lora:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ck = _checkpoint(model, tmp_path / "run", lora)
    export_lora(model, tmp_path / "exported")
    from_ck = _images(_sample(tmp_path / "ck", tiny_model_path, "--lora", ck, "--sampler", "cps"))
    exported = _sample(tmp_path / "ex", tiny_model_path, "--lora", tmp_path / "exported", "--sampler", "cps")
    assert _max_diff(from_ck, _images(exported)) <= 1
    assert _max_diff(from_ck, _images(_sample(tmp_path / "base", tiny_model_path, "--sampler", "cps"))) > 10
    as_file = _sample(tmp_path / "file", tiny_model_path, "--lora", tmp_path / "exported" / LORA_WEIGHT_NAME,
                      "--sampler", "cps")
    assert all((as_file / n).read_bytes() == (exported / n).read_bytes() for n in from_ck)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exported_lora_of_diffusers_models(family, tmp_path):
    """SD3 / FLUX (tiny random pipelines): the exported LoRA loads into the transformer like the checkpoint."""
    from test_models_diffusers import RES, SEQ, _perturb_lora, build_flux, build_sd3
    from tpgrpo.models import load_model

    torch.manual_seed(0)
    (build_sd3 if family == "sd3" else build_flux)().save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    extra = {"model.kind": family, "model.resolution": RES, "model.max_sequence_length": SEQ, "model.device": "cpu"}
    model = load_model(load_config(None, _overrides(tmp_path / "pipe", **extra)).model)
    model.requires_grad_(False)
    add_lora(model, rank=2, alpha=4)
    _perturb_lora(model, scale=0.5)
    ck = _checkpoint(model, tmp_path / "run", [(n, p) for n, p in model.transformer.named_parameters() if "lora_" in n])
    export_lora(model, tmp_path / "exported")
    runs = {name: _images(_sample(tmp_path / name, tmp_path / "pipe", *flags, "--sampler", "sde",
                                  prompts=["a photo of a red cat"], **extra))
            for name, flags in (("base", []), ("ck", ["--lora", ck]), ("ex", ["--lora", tmp_path / "exported"]))}
    assert _max_diff(runs["ck"], runs["ex"]) <= 1
    assert _max_diff(runs["ck"], runs["base"]) > 10


def test_full_finetune_checkpoint(tiny_model_path, tmp_path):
    model = ShapesModel.load(tiny_model_path)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ck = _checkpoint(model, tmp_path / "run", model.transformer.named_parameters())
    full = {"model.full_finetune": "true"}
    tuned = _images(_sample(tmp_path / "ft", tiny_model_path, "--lora", ck, **full))
    assert _max_diff(tuned, _images(_sample(tmp_path / "base", tiny_model_path))) > 10
    # export-lora writes a full fine-tuning checkpoint as OUT/transformer; --lora OUT loads it
    assert main(["export-lora", "--checkpoint", str(ck), "--out", str(tmp_path / "exported"),
                 *_overrides(tiny_model_path, **full)]) == 0
    assert _max_diff(tuned, _images(_sample(tmp_path / "ex", tiny_model_path, "--lora", tmp_path / "exported"))) <= 1


def _bad_cases(tmp: Path, not_a_run: Path) -> list[tuple[list, str, bool]]:
    """(argv after ``sample``, text the error line names, whether it must fail before the model loads)."""
    empty = tmp / "empty.txt"
    empty.write_text("# nothing\n\n")
    a_file = tmp / "a_file.txt"
    a_file.write_text("x\n")
    p = ["--prompt", "red circle"]
    return [
        ([], "--prompt", True),
        (["--prompts", empty, *p], "--prompt", True),
        (["--prompts", tmp / "missing.txt"], "--prompts", True),
        (["--prompts", empty], "--prompts", True),
        (["--prompt", "   "], "--prompt", True),
        ([*p, "--n-per-prompt", 0], "--n-per-prompt", True),
        ([*p, "--n-per-prompt", 10_001], "--n-per-prompt", True),
        (["--prompts", "shapes:train", "--n-per-prompt", 100], "--n-per-prompt", True),
        ([*p, "--out", a_file], "--out", True),
        ([*p, "--out", a_file / "below"], "--out", True),
        ([*p, "--lora", tmp / "no_such_run"], "--lora", True),
        ([*p, "--lora", not_a_run], "--lora", True),
        ([*p, "--raw"], "--raw", True),
        ([*p, "--steps", 0], "--steps", True),
        ([*p, "--steps", 1001], "--steps", True),
        ([*p, "--guidance", "nan"], "--guidance", True),
        ([*p, "--guidance", "inf"], "--guidance", True),
        ([*p, "--noise-level", "nan"], "--noise-level", True),
        ([*p, "--noise-level", -1], "--noise-level", True),
        ([*p, "--seed", -1], "--seed", True),
        ([*p, "--sampler", "euler"], "--sampler", True),
        ([*p, "--steps", "many"], "--steps", True),
        ([*p, "sampling.eval_num_steps=0"], "eval_num_steps", True),
        (["--prompt", "red dodecahedron"], "--prompt", False),
        ([*p, "--lora", tmp / "junk_lora"], "junk_lora", False),
    ]


BAD = list(range(25))


@pytest.mark.parametrize("i", BAD)
def test_bad_input_is_one_line_exit_2(i, tiny_model_path, tmp_path, capsys, monkeypatch):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "junk_lora").mkdir()
    (tmp_path / "junk_lora" / LORA_WEIGHT_NAME).write_bytes(b"\0" * 64)
    cases = _bad_cases(tmp_path, tmp_path / "not_a_run")
    assert len(cases) == len(BAD)
    argv, needle, before_load = cases[i]
    if before_load:
        import tpgrpo.models

        monkeypatch.setattr(tpgrpo.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["sample", "--out", str(tmp_path / "out"), *map(str, argv), f"model.path={tiny_model_path}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert e.value.code == 2 and "Traceback" not in err, (argv, err)
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], (argv, err)
    assert not list((tmp_path / "out").glob("*.png"))
