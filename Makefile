# The two commands of the quick start: `make train` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/diffusion_nft_latent.yaml

.PHONY: install train test test-all bench compare compare-latent compare-pref pretrain-latent pretrain-reward clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: that exact CPU wheel is served locally; anything else would pull CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	@$(PY) -c "import importlib.util, sys; sys.exit('torchvision must not be installed (it breaks diffusers/transformers imports here)' if importlib.util.find_spec('torchvision') else 0)"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(VENV)/bin/tpgrpo train --config $(CONFIG)

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/tpgrpo bench --config configs/tpgrpo_latent.yaml --out docs/bench.json

# the four-method comparison of docs/RESULTS.md (about an hour on 2 cores; re-running resumes/skips finished runs)
compare: install
	$(VENV)/bin/tpgrpo compare configs/compare_shapes.yaml --jobs 2 \
	  --arms flow_grpo tpgrpo dance_grpo tempflow_grpo tpgrpo_def41 tpgrpo_nobalance tpgrpo_coarse3 --out docs/compare

# the latent world's comparison at equal samples with paired evaluations (docs/RESULTS.md, "The latent world";
# about 1.5 hours on 2 cores; re-running resumes/skips finished runs and evaluations)
compare-latent: install
	$(VENV)/bin/tpgrpo compare configs/compare_latent.yaml --jobs 2 --runs-dir runs/compare_latent \
	  --out docs/compare_latent

# the latent built-in world's base model (docs/RESULTS.md, "The latent world"): autoencoder (3,000 steps), flow model
# (6,000 steps), then a fine-tuning stage at a lower lr (3,000 steps); every stage resumes where it stopped.
# About an hour on 2 cores. Writes pretrain_latent/stage3/shapes_base.safetensors.
pretrain-latent: install
	$(VENV)/bin/tpgrpo --threads 1 pretrain-shapes --out pretrain_latent/stage12 --steps 6000 --batch-size 64 \
	  --ae-steps 3000 --layers 4 --warmup 300
	$(VENV)/bin/tpgrpo --threads 1 pretrain-shapes --init pretrain_latent/stage12/shapes_base.safetensors \
	  --out pretrain_latent/stage3 --steps 3000 --batch-size 64 --lr 3e-4 --warmup 100

# TP-GRPO in its own regime (docs/RESULTS.md, "TP-GRPO in its regime"): the learned reward trains, the rule scorer is
# held out; 10 steps, SDE window of 9. Re-running resumes/skips finished runs and evaluations.
compare-pref: install
	$(VENV)/bin/tpgrpo compare configs/compare_latent_pref.yaml --jobs 2 --runs-dir runs/compare_latent_pref \
	  --out docs/compare_latent_pref

# the learned reward of the built-in world (shapes_pref): a pool of rule-ranked base-model samples, then 1,500 steps
# of contrastive + preference training, then its agreement with the rules (about 12 minutes on 2 cores; resumable).
# Writes pretrain_reward/shapes_pref.safetensors and pretrain_reward/agreement.json.
pretrain-reward: install
	$(VENV)/bin/tpgrpo --threads 2 pretrain-reward --out pretrain_reward --steps 1500

clean-venv:
	rm -rf $(VENV)
