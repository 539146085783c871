"""``tpgrpo report RUN_DIR``: one self-contained HTML page per run (issue 7).

Everything the page shows is read from the run directory — ``config.yaml``, ``metrics.jsonl``, the evaluation grids
in ``eval/`` and ``turning_points.png`` — and every figure is embedded as a base64 PNG, so the page opens offline
and can be mailed or committed on its own. Sections: summary, curves (rewards, per-tag strict accuracy, epoch time
split), TP-GRPO turning-point diagnostics over epochs (when the run has them), the evaluation grids, the config.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plots import read_metrics  # noqa: E402

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}h2{border-bottom:1px solid #ddd}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return _img(buf.getvalue())


def _img(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _records(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a tpgrpo run directory?)")
    recs = read_metrics(p)
    if not recs:
        raise ValueError(f"{p}: empty")
    return recs


def _curves(recs: list[dict]) -> str:
    tr = [r for r in recs if "reward_mean" in r]
    ev = [r for r in recs if "eval" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    if tr:
        a1.plot([r["epoch"] for r in tr], [r["reward_mean"] for r in tr], alpha=0.6, label="train reward")
    if ev:
        e = [r["epoch"] for r in ev]
        a1.plot(e, [r["eval"]["partial"] for r in ev], "o-", label="test reward (partial)")
        a1.plot(e, [r["eval"]["strict"] for r in ev], "s--", label="test strict accuracy")
        if all("held_out" in r["eval"] for r in ev):  # a held-out reward beside the trained one
            a1.plot(e, [r["eval"]["held_out"] for r in ev], "d:", label=f"held out: {ev[-1]['eval']['held_out_name']}")
        tags = list(ev[-1]["eval"].get("per_tag", {}))
        for t in tags:
            a2.plot(e, [r["eval"]["per_tag"].get(t, {}).get("strict", np.nan) for r in ev], "o-", ms=3, label=t)
    a1.set_xlabel("epoch")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xlabel("epoch")
    a2.set_title("test strict accuracy per tag", fontsize=10)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _time_split(recs: list[dict]) -> str:
    tr = [r for r in recs if "time_epoch" in r]
    if not tr:
        return ""
    e = np.array([r["epoch"] for r in tr])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = np.zeros(len(tr))
    for key, label in (("time_rollout", "rollout"), ("time_score", "scoring"), ("time_credit", "credit"),
                       ("time_train", "training")):
        v = np.array([r.get(key, 0.0) for r in tr])
        ax.bar(e, v, bottom=bottom, label=label)
        bottom += v
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _turning_points(recs: list[dict]) -> str:
    tp = [r for r in recs if "tp" in r]
    if not tp:
        return ""
    e = [r["epoch"] for r in tp]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 3.4))
    a1.plot(e, [r["tp"]["tp_rate"] for r in tp], "k-", label="turning-point rate, before balancing (left)")
    a1b = a1.twinx()
    a1b.plot(e, [r["tp"]["num_pos_after"] for r in tp], "g.-", alpha=0.7, label="# positive kept (right)")
    a1b.plot(e, [r["tp"]["num_neg_after"] for r in tp], "r.-", alpha=0.7, label="# negative kept (right)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("fraction of (trajectory, step)")
    a1.legend(loc="upper left", fontsize=7)
    a1b.legend(loc="upper right", fontsize=7)
    a1.grid(alpha=0.3)
    r_abs = np.array([r["tp"]["mean_abs_r_per_step"] for r in tp])
    im = a2.imshow(r_abs.T, aspect="auto", origin="lower", cmap="viridis",
                   extent=(e[0] - 0.5, e[-1] + 0.5, 0.5, r_abs.shape[1] + 0.5))
    fig.colorbar(im, ax=a2)
    a2.set_xlabel("epoch")
    a2.set_ylabel("window step t")
    a2.set_title("mean |r_t| (incremental reward) per step", fontsize=10)
    steps = np.arange(1, r_abs.shape[1] + 1)
    for key, style, label in (("r_zero_per_step", "o-", "r_t exactly 0"),
                              ("tp_rate_per_step", "s--", "turning point, before balancing"),
                              ("tp_rate_per_step_after", "s-", "turning point, after balancing")):
        if all(key in r["tp"] for r in tp):
            a3.plot(steps, np.mean([r["tp"][key] for r in tp], axis=0), style, ms=3, label=label)
    zero = [r["adv_zero_per_step"] for r in tp if r.get("adv_zero_per_step")]
    if zero:
        a3.plot(steps, np.mean(zero, axis=0)[:len(steps)], "^-", ms=3, label="advantage exactly 0")
    a3.set_xlabel("window step t")
    a3.set_ylabel("fraction of trajectories")
    a3.set_title("per step, averaged over epochs", fontsize=10)
    a3.legend(fontsize=7)
    a3.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _eval_table(recs: list[dict]) -> str:
    ev = [r for r in recs if "eval" in r]
    if not ev:
        return "<p>No evaluation yet.</p>"
    tags = list(ev[0]["eval"].get("per_tag", {}))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tags)
    rows = []
    for r in ev:
        x = r["eval"]
        cells = "".join(f"<td>{x['per_tag'].get(t, {}).get('strict', float('nan')):.3f}</td>" for t in tags)
        held = f"<td>{x['held_out']:.3f}</td>" if "held_out" in x else ""
        rows.append(f"<tr><td>{r['epoch']}</td><td>{x['partial']:.3f}</td>{held}<td>{x['strict']:.3f}</td>{cells}</tr>")
    held_head = f"<th>held out: {html.escape(ev[-1]['eval']['held_out_name'])}</th>" if "held_out" in ev[-1]["eval"] else ""
    return (f"<table><tr><th>epoch</th><th>partial</th>{held_head}<th>strict</th>{head}</tr>{''.join(rows)}</table>"
            "<p>Per-tag columns are strict accuracy. <i>partial</i> is the trained reward's primary score; a held-out "
            "reward is scored at evaluation only.</p>")


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    recs = _records(run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg_text = cfg_path.read_text() if cfg_path.is_file() else "(no config.yaml)"
    algo = next((ln.split(":", 1)[1].strip() for ln in cfg_text.splitlines() if ln.startswith("algorithm:")), "?")
    ev = [r for r in recs if "eval" in r]
    trained = [r for r in recs if "time_epoch" in r]
    summary = [f"<b>algorithm</b> {html.escape(algo)}", f"<b>epochs</b> {recs[-1]['epoch']}",
               f"<b>training time</b> {sum(r['time_epoch'] for r in trained):.0f} s"]
    if len(ev) >= 2:
        a, b = ev[0]["eval"], ev[-1]["eval"]
        summary.append(f"<b>test reward (partial)</b> {a['partial']:.3f} → {b['partial']:.3f}; "
                       f"<b>strict</b> {a['strict']:.3f} → {b['strict']:.3f} (epoch {ev[0]['epoch']} → "
                       f"{ev[-1]['epoch']})")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tpgrpo run {html.escape(run_dir.name)}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>tpgrpo run: {html.escape(str(run_dir))}</h1><p>{' · '.join(summary)}</p>",
             "<h2>Curves</h2>", _curves(recs), _eval_table(recs)]
    ts = _time_split(recs)
    if ts:
        parts += ["<h2>Time per epoch</h2>", ts]
    tp = _turning_points(recs)
    if tp:
        parts += ["<h2>Turning points (TP-GRPO)</h2>", tp]
        last = run_dir / "turning_points.png"
        if last.is_file():
            parts += ["<p>Latest epoch:</p>", _img(last.read_bytes(), "turning points, latest epoch")]
    grids = sorted((run_dir / "eval").glob("epoch_*.png")) if (run_dir / "eval").is_dir() else []
    if grids:
        parts.append("<h2>Evaluation grids (EMA weights, ODE sampling)</h2>")
        for g in grids:
            parts += [f"<h3>{html.escape(g.stem.replace('_', ' '))}</h3>", _img(g.read_bytes(), g.stem)]
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(cfg_text)}</pre>", "</body></html>"]
    out = Path(out) if out else run_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out
