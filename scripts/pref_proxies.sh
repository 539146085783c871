#!/usr/bin/env bash
# Gradient agreement (scripts/grad_snr.py: 6 independent 256-sample gradients at the base model) for TP-GRPO, its
# ablations and Flow-GRPO, on the learned reward and on the rule reward, at the reference window (9 of 10 steps) and
# at the latent presets' window (3 of 8). One JSON line per probe in $OUT (default docs/learned_reward/proxies.jsonl);
# probes already in the file are skipped, so the script resumes. JOBS probes run side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/learned_reward/proxies.jsonl}
JOBS=${JOBS:-2}
K=${K:-6}
PY=${PY:-.venv/bin/python}
TP=configs/tpgrpo_latent_pref.yaml
FG=configs/flow_grpo_latent_pref.yaml
RULE="reward.name=shapes reward.held_out=null"
COMMON="training.train_batch_size=256"
probes=(
  "tpgrpo|$TP|"
  "flow_grpo|$FG|"
  "tpgrpo_dense|$TP|tpgrpo.turning_points=false"
  "flow_grpo_sde_gaussian|$FG|sampling.kernel=sde sampling.logprob=gaussian"
  "tpgrpo_gaussian|$TP|sampling.logprob=gaussian"
  "rule_tpgrpo|$TP|$RULE"
  "rule_flow_grpo|$FG|$RULE"
  "rule_tpgrpo_dense|$TP|$RULE tpgrpo.turning_points=false"
  "tpgrpo_c2|$TP|tpgrpo.completion_steps=2"
  "tpgrpo_c1|$TP|tpgrpo.completion_steps=1"
  "tpgrpo_c2_dense|$TP|tpgrpo.completion_steps=2 tpgrpo.turning_points=false"
  "tpgrpo_def41|$TP|tpgrpo.consistent=false"
  "tpgrpo_nofirst|$TP|tpgrpo.first_step=false"
  "tpgrpo_nobalance|$TP|tpgrpo.balance=false"
  "w3_tpgrpo|configs/tpgrpo_latent.yaml|reward.name=shapes_pref reward.held_out=shapes"
  "w3_flow_grpo|configs/flow_grpo_latent.yaml|reward.name=shapes_pref reward.held_out=shapes"
)
mkdir -p "$(dirname "$OUT")"
touch "$OUT"
run() {
  IFS='|' read -r name cfg ov <<< "$1"
  grep -q "\"probe\": \"$name\"" "$OUT" && return 0
  local t0=$SECONDS
  # shellcheck disable=SC2086
  line=$(OMP_NUM_THREADS=1 $PY -c "import torch, sys, runpy; torch.set_num_threads(1); sys.argv=sys.argv[1:]; runpy.run_path('scripts/grad_snr.py', run_name='__main__')" \
         scripts/grad_snr.py "$cfg" "$K" $COMMON $ov 2>/dev/null | tail -n 1)
  if [[ "$line" != \{* ]]; then echo "$name FAILED" >&2; return 1; fi
  echo "{\"probe\": \"$name\", \"seconds\": $((SECONDS - t0)), ${line#\{}" >> "$OUT"
  echo "$name done in $((SECONDS - t0)) s"
}
export -f run
export OUT K PY COMMON
printf '%s\n' "${probes[@]}" | xargs -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
