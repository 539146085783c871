#!/usr/bin/env bash
# Evaluate the shipped shapes base model: a guidance-scale sweep (16 prompts/tag) and the full report (64/tag).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/base_model
mkdir -p "$out"
for g in 1.5 3.0 4.5 6.0; do
  .venv/bin/tpgrpo eval sampling.guidance_scale=$g data.eval_per_tag=16 --json "$out/cfg_$g.json" > /dev/null
  python3 -c "import json; d=json.load(open('$out/cfg_$g.json')); print('cfg $g', round(d['strict'],3), round(d['partial'],3), {k: round(v['strict'],2) for k,v in d['per_tag'].items()})"
done
