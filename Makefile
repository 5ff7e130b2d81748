# Set-up and checks in two commands on a fresh machine:
#
#   make train    # install what is missing, then train L0_sanity (8M model, shipped sample, 100 steps)
#   make test     # the test suite (GPU tests skip themselves without CUDA and TransformerEngine)
#   make test-gpu # on a GPU host with TransformerEngine: every GPU test (`-m gpu`) on one GPU
#
# Without an active virtual or conda environment everything goes into ./.venv, which also sees the system's packages
# (an NGC container's torch and TransformerEngine are used, not reinstalled). Where no NVIDIA GPU is visible, torch
# is the CPU build (~200 MB instead of several GB of CUDA libraries). Managing your own environment instead:
# `pip install -r requirements.txt` and the commands in README.md.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
PY := $(if $(ACTIVE_ENV),python,$(VENV)/bin/python)
STAMP := $(if $(ACTIVE_ENV),$(ACTIVE_ENV),$(VENV))/.esm2-recipe-installed
# pytest-xdist processes for `make test`; each test file stays on one (its module fixtures, the SLURM cluster)
TEST_WORKERS ?= 2
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
# `make test-gpu` uses the Python that has TransformerEngine (an NGC container's, the active environment's, else
# .venv's): it installs nothing. Its workers share the one GPU; tests that share a run stay on one worker (loadgroup).
# NVIDIA_TF32_OVERRIDE=0: FP32 GEMMs are true FP32, what the FP32 references of the GPU tests assume.
GPU_PY := $(if $(ACTIVE_ENV),python,$(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON)))
GPU_TEST_WORKERS ?= 8

.PHONY: install train test test-gpu lint

install: $(STAMP)

$(STAMP): requirements.txt
	@if [ -z "$(ACTIVE_ENV)" ] && [ ! -x "$(PY)" ]; then $(PYTHON) -m venv --system-site-packages "$(VENV)"; fi
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2> /dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: kept"; \
	elif nvidia-smi -L > /dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch"; $(PY) -m pip install --quiet torch; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" --index-url "$(TORCH_CPU_INDEX)"; \
	fi
	$(PY) -m pip install --quiet -r requirements.txt
	@touch "$@"

train: install
	$(PY) train_fsdp2.py --config-name L0_sanity

test: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-gpu:
	$(TEST_ENV) NVIDIA_TF32_OVERRIDE=0 $(GPU_PY) -m pytest -m gpu -q -n $(GPU_TEST_WORKERS) --dist loadgroup

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
