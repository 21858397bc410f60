# nemo-surgery developer tasks. `make install demo` is the fresh-machine quick start.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= out/demo

.PHONY: install demo test bench lint clean

install:  ## CPU torch from local disk when no torch is present, then the package with test extras
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"

demo:  ## the main job on the embedded demo model: scan -> apply -> verify (offline, CPU, a few minutes)
	mkdir -p $(OUT)
	nemo-surgery scan prompts/demo_memorized.txt --layers all --out $(OUT)/neurons.json --force || [ $$? -eq 3 ]
	nemo-surgery apply nemo_surgery/demo/assets/model --neurons $(OUT)/neurons.json \
		--out $(OUT)/pruned-model --force --holdout prompts/demo_holdout.txt \
		--train-images nemo_surgery/demo/assets/train_images --guidance 3

test:  ## the whole suite (what CI runs)
	$(PYTHON) -m pytest -q

bench:  ## benchmarks print ratios measured in one run
	$(PYTHON) benchmarks/bench_scan.py
	$(PYTHON) benchmarks/bench_apply.py

lint:
	$(PYTHON) -m ruff check nemo_surgery tests benchmarks tools

clean:
	rm -rf out .pytest_cache build *.egg-info
