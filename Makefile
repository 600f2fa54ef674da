# SpeechLM TTS trainer. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
# CPU torch that lies on disk; transformers/trl/datasets pinned to the versions the images ship.
CONSTRAINTS := constraints/cpu-dev.txt
STAMP := $(VENV)/.installed

.PHONY: help install test test-slow lint demo bench manifests clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	bash .ci/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	# resemblyzer's own dependency `webrtcvad` does not build on current setuptools; the
	# webrtcvad-wheels package (a core dependency) provides the same module.
	$(PIP) install -q --no-deps resemblyzer==0.1.4
	bash .ci/install-k8s-tools.sh
	touch $(STAMP)

# X-codec2's own code and the vector-quantize-pytorch release it pins, kept out of the venv: the codec
# parity tests run them in a separate interpreter (tests/xcodec2_reference.py).
XCODEC2_REF := .tools/xcodec2-ref
$(XCODEC2_REF)/.installed: $(STAMP)
	$(PIP) install -q --no-deps --upgrade --target $(XCODEC2_REF) \
		vector-quantize-pytorch==1.17.8 xcodec2==0.1.5 einx==0.4.3 frozendict==2.4.7
	touch $@

install: $(STAMP) $(XCODEC2_REF)/.installed  ## create .venv and install the project (editable, dev extras, CPU torch) + helm/kubectl

test: $(STAMP) $(XCODEC2_REF)/.installed  ## run the fast test suite (what CI runs)
	$(BIN)/pytest

test-slow: $(STAMP)  ## run the slow tests too
	$(BIN)/pytest -m 'not gpu'

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

demo: $(STAMP)  ## the main job: the whole recipe on the local backend, CPU, example data
	$(BIN)/ttsctl run example/pipeline.yaml --backend local

bench: $(STAMP)  ## benchmarks (CPU sizes; each prints a ratio against its baseline)
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/codec_encode.py
	$(BIN)/python bench/rewards.py
	$(BIN)/python bench/sft_throughput.py

manifests: $(STAMP)  ## regenerate manifests/ from example/pipeline.yaml
	$(BIN)/ttsctl render example/pipeline.yaml -o manifests/

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs experiments .pytest_cache .ruff_cache
