"""Summarise several runs' before/after evaluation (mean ± spread over seeds) as a markdown table."""

import json
import statistics
import sys
from pathlib import Path


def main(run_dirs: list[str]) -> None:
    rows = []
    for d in run_dirs:
        recs = [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        evals = [r for r in recs if "eval" in r]
        first, last = evals[0], evals[-1]
        secs = sum(r.get("time_epoch", 0) for r in recs)
        rows.append((d, first["eval"], last["eval"], last["epoch"], secs))
    print("| run | epochs | test reward before | after | gain | strict before | after |")
    print("|---|---|---|---|---|---|---|")
    for d, a, b, ep, secs in rows:
        print(f"| {d} | {ep} | {a['partial']:.3f} | {b['partial']:.3f} | {b['partial'] - a['partial']:+.3f} | "
              f"{a['strict']:.3f} | {b['strict']:.3f} |")
    gains = [b["partial"] - a["partial"] for _, a, b, _, _ in rows]
    finals = [b["partial"] for _, _, b, _, _ in rows]
    if len(rows) > 1:
        print(f"\ngain {statistics.mean(gains):+.3f} ± {statistics.stdev(gains):.3f} (mean ± std over {len(rows)} seeds); "
              f"final reward spread (std over seeds) {statistics.stdev(finals):.3f}")
        tags = rows[0][2]["per_tag"]
        print("\n| tag | strict before | strict after (mean over seeds) |\n|---|---|---|")
        for t in tags:
            print(f"| {t} | {rows[0][1]['per_tag'][t]['strict']:.3f} | "
                  f"{statistics.mean(r[2]['per_tag'][t]['strict'] for r in rows):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
