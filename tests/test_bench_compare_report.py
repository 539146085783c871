"""``tpgrpo bench`` (every method), ``tpgrpo compare`` (arms × seeds, resume, summary) and ``tpgrpo report``."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_overrides
from tpgrpo.cli import main
from tpgrpo.compare import CompareSpec, is_finished, markdown, summarise


def _tiny(tiny_model_path, tmp_path, **extra):
    ov = tiny_overrides(tiny_model_path, tmp_path / "unused", **extra)
    return [o for o in ov if not o.startswith("run_dir=")]


def test_bench_covers_every_method(tiny_model_path, tmp_path):
    from tpgrpo.bench import run_bench
    from tpgrpo.config import load_config

    ov = _tiny(tiny_model_path, tmp_path, **{"sampling.window_start_max": 0, "reward.name": "jpeg_compressibility"})
    presets = {"flow_grpo": "configs/flow_grpo_shapes.yaml", "dance_grpo": "configs/dance_grpo_shapes.yaml"}
    cfg = load_config("configs/default.yaml", ov)
    r = run_bench(cfg, tmp_path / "b.json", repeats=1, presets=presets, overrides=ov)
    assert set(r["rollout"]) == {"tpgrpo", "tpgrpo_sequential", "flow_grpo", "dance_grpo"}
    assert set(r["epoch"]) == {"tpgrpo", "flow_grpo", "dance_grpo"}
    T, W = 4, 2
    assert r["rollout"]["flow_grpo"]["evaluations_per_sample"] == T
    # TP-GRPO: main trajectory plus ODE completions of W window states (the first step of each reuses the main
    # velocity), so strictly more than T and at most T + W·(T − 1)
    assert T < r["rollout"]["tpgrpo"]["evaluations_per_sample"] <= T + W * (T - 1)
    for x in r["rollout"].values():
        assert x["overhead_ratio"] > 0 and x["bare_calls_s"] > 0
    assert r["epoch_cost_vs_flow_grpo"]["flow_grpo"] == pytest.approx(1.0)
    md = (tmp_path / "b.md").read_text()
    assert "DanceGRPO" in md and "TP-GRPO, one state at a time" in md
    assert json.loads((tmp_path / "b.json").read_text())["peak_rss_mib"] > 0
    for x in r["rollout"].values():
        assert x["samples_per_s"] == pytest.approx(x["samples"] / x["rollout_s"])
    assert "CPU threads" in md and "peak GPU" not in md  # GPU columns only on a GPU
    # the reward scored the epoch's finals and completions: N samples × (W + 1) images
    scoring = r["reward_scoring"]["jpeg_compressibility"]
    assert scoring["images"] == r["rollout"]["tpgrpo"]["samples"] * (W + 1) and scoring["images_per_s"] > 0
    assert "| jpeg_compressibility |" in md


@pytest.mark.parametrize("preset, needle", [("flow_grpo", "METHOD=CONFIG"), ("nope=configs/default.yaml", "nope"),
                                            ("flow_grpo=no_such.yaml", "no_such.yaml")])
def test_bench_bad_preset_is_one_line(preset, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", preset])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench: --preset") and needle in err[0]


def _spec(tmp_path, tiny_model_path, arms=None, **extra):
    common = _tiny(tiny_model_path, tmp_path, **{"training.eval_every": 1, "training.epochs": 2})
    spec = {"seeds": [0, 1], "common": common, "reference": "flow_grpo",
            "arms": arms or {"flow_grpo": {"config": "configs/flow_grpo_shapes.yaml"},
                             "tpgrpo_def41": {"config": "configs/tpgrpo_shapes.yaml",
                                              "overrides": ["tpgrpo.consistent=false"]}}, **extra}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_compare_runs_summarises_and_skips_finished_runs(tiny_model_path, tmp_path, capsys):
    from tpgrpo.config import load_config

    spec = _spec(tmp_path, tiny_model_path, paired_eval={"seed": 3, "per_tag": 1})
    runs, out = tmp_path / "runs", tmp_path / "report"
    args = ["compare", str(spec), "--runs-dir", str(runs), "--out", str(out), "--jobs", "2", "--scale", "2"]
    assert main(args) == 0
    unscaled = load_config("configs/flow_grpo_shapes.yaml", yaml.safe_load(spec.read_text())["common"]).training
    for arm in ("flow_grpo", "tpgrpo_def41"):
        for s in (0, 1):
            d = runs / arm / f"seed{s}"
            assert is_finished(d)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            assert cfg["seed"] == s and cfg["training"]["epochs"] == 2
            # --scale 2: twice the samples per update at the same number of updates
            assert cfg["training"]["prompts_per_epoch"] == 2 * unscaled.prompts_per_epoch
            assert cfg["training"]["train_batch_size"] == 2 * unscaled.train_batch_size
            # the paired evaluation of the last checkpoint: 1 image per tag, evaluation seed 3
            paired = json.loads((d / "paired_eval.json").read_text())
            assert paired["n"] == 6 and paired["gain_over_base"]["strict"] == pytest.approx(
                paired["strict"] - paired["base"]["strict"])
    assert yaml.safe_load((runs / "tpgrpo_def41/seed0/config.yaml").read_text())["tpgrpo"]["consistent"] is False
    summary = json.loads((out / "summary.json").read_text())
    a = summary["arms"]["tpgrpo_def41"]
    assert a["epochs"] == [0, 1, 2] and a["seeds"] == [0, 1] and len(a["final_partial"]) == 2
    # the summary is the runs' own numbers: mean of the two seeds' final test rewards
    finals = []
    for s in (0, 1):
        recs = [json.loads(ln) for ln in (runs / f"tpgrpo_def41/seed{s}/metrics.jsonl").read_text().splitlines()]
        finals.append(recs[-1]["eval"]["partial"])
    assert a["partial_mean"][-1] == pytest.approx(sum(finals) / 2)
    assert "welch_p_vs_reference" in a and summary["arms"]["flow_grpo"]["epochs_to_reference_final"] is not None
    p = a["paired"]
    assert p["seeds"] == [0, 1] and p["images"] == 6 and len(p["strict_gain"]) == 2
    assert p["strict_gain_vs_reference"]["diff"] == pytest.approx(
        sum(p["strict_gain"]) / 2 - sum(summary["arms"]["flow_grpo"]["paired"]["strict_gain"]) / 2)
    assert p["partial_gain_vs_reference"]["diff"] == pytest.approx(
        sum(p["partial_gain"]) / 2 - sum(summary["arms"]["flow_grpo"]["paired"]["partial_gain"]) / 2)
    md = (out / "compare.md").read_text()
    assert "| tpgrpo_def41 |" in md and (out / "compare_epoch.png").is_file() and (out / "compare_time.png").is_file()
    assert "Paired evaluation" in md and "evaluation seed 3" in md
    # a second call trains and evaluates nothing: every run is finished and evaluated
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already") == 4 and "paired evaluation" not in printed


def test_mean_ci_and_welch_difference_by_hand():
    from scipy import stats

    from tpgrpo.compare import mean_ci, welch_difference

    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and h == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)
    # equal variances 1 and n 3 each: se = sqrt(1/3 + 1/3), Welch df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4
    d = welch_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert d["diff"] == pytest.approx(1.0)
    assert d["half_width"] == pytest.approx(2.776445 * (2 / 3) ** 0.5, rel=1e-6)
    assert d["p"] == pytest.approx(stats.ttest_ind([1, 2, 3], [0, 1, 2], equal_var=False).pvalue)
    assert welch_difference([1.0], [0.0, 1.0]) is None and mean_ci([0.5])[0] == 0.5


@pytest.mark.parametrize("paired", [{"seed": -1}, {"per_tag": 0}, {"sed": 1}, [7], {"seed": True}])
def test_compare_spec_rejects_bad_paired_eval(tmp_path, tiny_model_path, paired):
    with pytest.raises(ValueError, match="paired_eval"):
        CompareSpec.load(_spec(tmp_path, tiny_model_path, paired_eval=paired))


def test_compare_spec_errors_are_one_line(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"arms": {"a": {"config": "x.yaml", "overides": []}}}))
    r = subprocess.run([sys.executable, "-m", "tpgrpo.cli", "compare", str(bad), "--report-only"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "arms.a" in r.stderr
    spec = _spec(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match="--arms: 'nope'"):
        CompareSpec.load(spec).select(["nope"], None)


def test_summary_epochs_to_reference_and_equal_time(tmp_path):
    """Hand-made metrics: arm B reaches A's final reward at epoch 2; at A's total time B is interpolated."""
    def write(arm, seed, partials, t_epoch):
        d = tmp_path / arm / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("training:\n  epochs: 4\n")
        lines = []
        for e in range(5):
            rec = {"epoch": e}
            if e:
                rec["time_epoch"] = t_epoch
            if e % 2 == 0:
                rec["eval"] = {"partial": partials[e // 2], "strict": partials[e // 2] / 2, "per_tag": {}}
            lines.append(json.dumps(rec))
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    for s, off in ((0, 0.0), (1, 0.02)):
        write("A", s, [0.4, 0.42 + off, 0.45 + off], 1.0)
        write("B", s, [0.4, 0.47 + off, 0.50 + off], 2.0)
    spec = CompareSpec.load(_write_spec(tmp_path))
    sm = summarise(spec, tmp_path)
    a, b = sm["arms"]["A"], sm["arms"]["B"]
    assert a["partial_mean"][-1] == pytest.approx(0.46)
    assert b["epochs_to_reference_final"] == 2 and a["epochs_to_reference_final"] == 4
    assert b["seconds_to_reference_final"] == pytest.approx(4.0)
    # A trains 4 s in all; B's mean curve at 4 s is its epoch-2 value
    assert b["partial_at_reference_time"] == pytest.approx(0.48)
    assert b["gain_partial"] == pytest.approx([0.10, 0.12])
    assert "not reached" not in markdown(sm)


def _write_spec(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"seeds": [0, 1], "reference": "A",
                                 "arms": {"A": {"config": "a.yaml"}, "B": {"config": "b.yaml"}}}))
    return p


def test_report_is_self_contained_html(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_model_path, run, **{"training.eval_every": 1})]) == 0
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    # offline: no external resources, every image inline
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", page)
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # curves, the turning-point section (default method TP-GRPO), an eval grid per evaluation, the config
    assert "Turning points" in page and page.count("<h3>epoch ") == 3 and "algorithm: tpgrpo" in page


def test_report_bad_run_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tpgrpo.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl" in r.stderr and r.stderr.strip().count("\n") == 0


def test_resolve_checkpoint_accepts_run_dir_checkpoints_dir_and_latest(tmp_path):
    import torch

    from tpgrpo.checkpoint import resolve_checkpoint, save_checkpoint

    payload = {"lora": {"w": torch.zeros(1)}, "ema": {"shadow.0": torch.zeros(1)}, "optimizer": {}, "state": {}}
    save_checkpoint(tmp_path, 1, payload)
    newest = save_checkpoint(tmp_path, 2, payload)
    for p in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "latest", newest):
        assert resolve_checkpoint(p) == newest
    assert resolve_checkpoint(tmp_path / "checkpoints" / "epoch_000001").name == "epoch_000001"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint((tmp_path / "empty_run").mkdir() or tmp_path / "empty_run")  # no checkpoints in it
