#!/usr/bin/env bash
# GPU smoke test and SD3.5-Medium-sized benchmark on a random-weight pipeline (no model hub needed).
#
#   bash scripts/gpu_check.sh smoke OUTDIR    # 2 TP-GRPO epochs + evaluation + checkpoint, then resume for a third
#   bash scripts/gpu_check.sh bench OUTDIR    # tpgrpo bench: TP-GRPO (lockstep and one state at a time) vs Flow-GRPO
#   bash scripts/gpu_check.sh mismatch OUTDIR # rollout/training log-prob mismatch: TP-GRPO (cps) and Flow-GRPO (sde),
#                                             # 2 epochs each with and without training.recompute_old_logprobs
#                                             # (RECOMPUTE="true" and EPOCHS=1 for a shorter check)
#   bash scripts/gpu_check.sh latent OUTDIR   # configs/compare_latent.yaml at SCALE× (16) the samples per update,
#                                             # ARMS × SEEDS (flow_grpo tpgrpo diffusion_nft × 0 1 2) all at once,
#                                             # EPOCHS (20) epochs, each followed by its paired evaluation (the
#                                             # spec's paired_eval: 768 test images, evaluation seed 7); runs,
#                                             # evaluations and report in OUTDIR/latent.tgz. LIMIT=SECONDS stops
#                                             # the runs in time for the tar to still collect what they wrote.
#
# Environment: EXTRA="section.field=value ..." adds overrides (e.g. tpgrpo.completion_steps=3), NAME names the
# outputs (default: smoke / bench_sd35m), REPEATS sets the benchmark's repeats (default 2).
#
# Needs a CUDA GPU, python3 with torch and tpgrpo's dependencies importable (PYTHONPATH may point at src/), and
# writes logs, metrics and the benchmark's JSON/markdown into OUTDIR. Results: docs/gpu.md.
set -euo pipefail
stage=${1:?stage: smoke, bench or mismatch}
out=${2:?output directory}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
pipe=${PIPELINE_DIR:-/tmp/sd35m_random}
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
$py -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', \
accelerate.__version__)" | tee -a "$out/gpu.txt"
[ "$stage" = latent ] || [ -f "$pipe/model_index.json" ] || $py scripts/make_random_pipeline.py "$pipe" --size sd35m --dtype bf16 2>&1 \
    | grep -v "shards" | tee -a "$out/gpu.txt"

# both stages: SD3.5-M reference settings (configs/sd35m_*.yaml) at 512², bf16 (random weights can overflow fp16),
# 2 prompts × 8 samples per epoch, shapes prompts, brightness reward (no reward model needed), the same β for both
# methods so that both pay the KL reference pass
common=(model.path="$pipe" model.dtype=bf16 data.train_prompts=shapes:train data.eval_prompts=shapes:test
        reward.name=brightness training.prompts_per_epoch=2 training.group_size=8 training.beta=0.0001 ${EXTRA:-})

case "$stage" in
smoke)
    name=${NAME:-smoke}
    run=/tmp/gpu_$name
    rm -rf "$run"
    args=(-c configs/sd35m_tpgrpo.yaml "${common[@]}" run_dir=$run data.eval_per_tag=1 sampling.eval_num_steps=10
          training.eval_every=2 training.checkpoint_every=1)
    /usr/bin/time -v $py -m tpgrpo.cli train "${args[@]}" training.epochs=2 > "$out/${name}_train.log" 2>&1 \
        || { tail -30 "$out/${name}_train.log"; exit 1; }
    if [ -z "${NO_RESUME:-}" ]; then
        $py -m tpgrpo.cli train "${args[@]}" training.epochs=3 --resume > "$out/${name}_resume.log" 2>&1 \
            || { tail -30 "$out/${name}_resume.log"; exit 1; }
    fi
    cp $run/metrics.jsonl "$out/${name}_metrics.jsonl"
    ls -R $run | head -40 > "$out/${name}_run_dir.txt"
    grep -E "Maximum resident|Elapsed" "$out/${name}_train.log" || true
    $py - "$out/${name}_metrics.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
            if k in ("epoch", "reward_mean", "ratio_first", "loss", "kl", "grad_norm", "time_rollout", "time_train",
                     "time_epoch", "time_eval", "evaluations_per_sample", "peak_gpu_gib", "first_update_ratio_max_dev",
                     "first_update_clipfrac", "old_logprob_max_dev", "old_logprob_clipfrac", "clipfrac")}
    if "eval" in r:
        keep["eval"] = {k: v for k, v in r["eval"].items() if not isinstance(v, list)}
    print(keep)
EOF
    ;;
bench)
    name=${NAME:-bench_sd35m}
    $py -m tpgrpo.cli bench -c configs/sd35m_tpgrpo.yaml --preset flow_grpo=configs/sd35m_flow_grpo.yaml \
        --out "$out/$name.json" --repeats "${REPEATS:-2}" "${common[@]}" > "$out/$name.log" 2>&1 \
        || { tail -30 "$out/$name.log"; exit 1; }
    cat "$out/$name.md"
    ;;
mismatch)
    for preset in ${PRESETS:-sd35m_tpgrpo sd35m_flow_grpo}; do
        for recompute in ${RECOMPUTE:-false true}; do
            name=mismatch_${preset}_recompute_$recompute
            run=/tmp/gpu_$name
            rm -rf "$run"
            $py -m tpgrpo.cli train -c configs/$preset.yaml "${common[@]}" run_dir=$run training.epochs=${EPOCHS:-2} \
                training.recompute_old_logprobs=$recompute data.eval_per_tag=1 sampling.eval_num_steps=2 \
                training.eval_every=100 training.checkpoint_every=100 > "$out/$name.log" 2>&1 \
                || { tail -30 "$out/$name.log"; exit 1; }
            cp $run/metrics.jsonl "$out/$name.jsonl"
            $py - "$out/$name.jsonl" "$name" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "first_update_ratio_max_dev" in r:
        print(sys.argv[2], {k: r.get(k) for k in ("epoch", "first_update_ratio_max_dev", "first_update_clipfrac",
              "old_logprob_max_dev", "old_logprob_clipfrac", "ratio_max_dev", "clipfrac", "time_train")})
EOF
        done
    done
    ;;
latent)
    runs=${RUNS:-/tmp/gpu_latent}
    arms=(${ARMS:-flow_grpo tpgrpo diffusion_nft})
    seeds=(${SEEDS:-0 1 2})
    timeout "${LIMIT:-0}" /usr/bin/time -v $py -m tpgrpo.cli compare configs/compare_latent.yaml training.epochs="${EPOCHS:-20}" ${EXTRA:-} \
        --scale "${SCALE:-16}" --arms "${arms[@]}" --seeds "${seeds[@]}" --jobs $(( ${#arms[@]} * ${#seeds[@]} )) \
        --runs-dir "$runs" --out "$runs/report" > "$runs.log" 2>&1 || tail -30 "$runs.log"
    cp "$runs.log" "$out/latent.log"
    tar czf "$out/latent.tgz" --exclude=optimizer.pt --exclude=tensorboard -C "$(dirname "$runs")" "$(basename "$runs")"
    ;;
*)
    echo "unknown stage $stage (smoke, bench, mismatch or latent)" >&2; exit 2;;
esac
