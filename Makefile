# nemo-surgery developer tasks. `make install demo` is the fresh-machine quick start.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= out/demo

MODEL_OUT ?= out/demo-model
DEVICE ?= cpu

.PHONY: install demo demo-model test bench lint clean check-floors

install:  ## CPU torch from local disk when no torch is present, the package with test extras, chromium (report screenshot test)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		|| echo "chromium not installed: the report screenshot test will be skipped"; \
	else echo "no chromium and no apt-get as root: the report screenshot test will be skipped"; fi

demo:  ## the main job on the embedded demo model: scan -> apply -> verify (offline, CPU, a few minutes)
	mkdir -p $(OUT)
	nemo-surgery scan prompts/demo_memorized.txt --out $(OUT)/neurons.json --force || [ $$? -eq 3 ]
	nemo-surgery apply nemo_surgery/demo/assets/model --neurons $(OUT)/neurons.json \
		--out $(OUT)/pruned-model --force --holdout prompts/demo_holdout.txt \
		--train-images nemo_surgery/demo/assets/train_images --guidance 3 --steps 20 \
		--seeds 6 --holdout-seeds 2 --drift-seeds 1 || [ $$? -eq 3 ]

demo-model:  ## retrain the demo model from scratch (tools/demo_model/chain.py; ~18 h on 2 CPU cores, DEVICE=cuda for a GPU; resumes)
	$(PYTHON) -m tools.demo_model.chain --out $(MODEL_OUT) --device $(DEVICE)

test:  ## the whole suite (what CI runs)
	$(PYTHON) -m pytest -q

bench:  ## benchmarks print ratios measured in one run
	$(PYTHON) benchmarks/bench_scan.py
	$(PYTHON) benchmarks/bench_apply.py

lint:
	$(PYTHON) -m ruff check nemo_surgery tests benchmarks tools

clean:
	rm -rf out .pytest_cache build *.egg-info

# The lowest versions pyproject.toml allows, installed exactly (==) in a throwaway venv, then the
# demo model loads and a representative part of the suite runs. torch comes from local disk (CPU).
FLOORS_VENV ?= /tmp/nemo-surgery-floors
FLOOR_TESTS ?= tests/test_bad_input.py tests/test_vpred.py tests/test_real_inputs.py tests/test_layers_keymap.py tests/test_apply_cli.py tests/test_console.py
check-floors:  ## install the dependency floors (==) in a throwaway venv and run the demo model + floor tests there
	rm -rf $(FLOORS_VENV) && $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q "torch==2.13.0"
	$(FLOORS_VENV)/bin/pip install -q $$($(PYTHON) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print(' '.join(r.replace('>=', '==') for r in d['project']['dependencies'] + d['project']['optional-dependencies']['test'] if not r.startswith('torch')))")
	$(FLOORS_VENV)/bin/pip install -q "setuptools>=68" && $(FLOORS_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(FLOORS_VENV)/bin/pip list 2>/dev/null | grep -i -E '^(torch|diffusers|transformers|tokenizers|huggingface.hub|safetensors|click|rich|scikit.image|numpy|pytest) '
	$(FLOORS_VENV)/bin/python -c "from nemo_surgery.demo.paths import DEMO_MODEL_DIR; from nemo_surgery.engine.model import load_model; m = load_model(DEMO_MODEL_DIR, device='cpu'); print('demo model loads:', len(m.layers), 'value layers')"
	PATH="$(FLOORS_VENV)/bin:$$PATH" $(FLOORS_VENV)/bin/python -m pytest -q -x -p no:cacheprovider $(FLOOR_TESTS)
