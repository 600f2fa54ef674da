#!/usr/bin/env bash
# Every GPU check in one run (<= 10 minutes on one H100/H200), figures written to one file.
#
#   Step 1, where pip reaches PyPI (the dev machine), from the repo root:
#       bash bench/gpu_check.sh --fetch-wheels
#     downloads the pinned pure-Python dependencies the GPU machine lacks (and the versions our pins
#     need where it has others: transformers 4.57, its tokenizers/huggingface-hub) as py3.12 x86-64
#     wheels into .whl/ (git-ignored; about 20 MB, so it fits the 64 MiB a device call carries).
#   Step 2, on the GPU machine (torch + CUDA there; nothing else of ours), with .whl/ copied along:
#       bash bench/gpu_check.sh [--out FILE]          # default FILE: gpu_check_results.txt
#     installs .whl/*.whl into /tmp/site (no index, no deps: the machine has no network), puts it
#     first on PYTHONPATH, then runs the checks. A check that fails is recorded and the next runs.
#     Each check has a time limit; they add up to 9 minutes, so one 10-minute device command holds it
#     (e.g. carry .whl, command `bash bench/gpu_check.sh --out $OUT/gpu_check_results.txt`).
#   CPU smoke run (tiny shapes, every branch except the CUDA-only ones; what CI tests):
#       bash bench/gpu_check.sh --smoke --out /tmp/smoke.txt
#
# Checks: SFT throughput of the llama-3.2-1b shape (ours vs the padded baseline in the same run; flex
# and SDPA packed attention, flash-attn varlen when importable), bf16 loss parity vs fp32 and FSDP2 on
# one GPU (tiny model, real CLI), codec encode throughput at batch 16 (full preset), inference RTF.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
OUT_FILE=gpu_check_results.txt
WHEELS=.whl
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT_FILE="$2"; shift ;;
    --fetch-wheels) MODE=fetch ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

# The versions of the dev venv (constraints/) that the checks import and the GPU image lacks or has in
# another version: its transformers 5.x / huggingface-hub 1.x are newer than the stack we ship and test.
# Found by tracing the imports of a --smoke run against the image's package list.
PINS=(
  transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 torch-einops-utils==0.2.0 loguru==0.7.3
  soundfile==0.14.0 soxr==1.1.0 num2words==0.5.14 docopt==0.6.2
)

if [ "${MODE:-}" = fetch ]; then
  mkdir -p "$WHEELS"
  for pin in "${PINS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$pin" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$pin" \
    || { echo "could not fetch $pin" >&2; exit 1; }
  done
  du -sh "$WHEELS"
  exit 0
fi

# The wheels are the GPU machine's (py3.12); a smoke run uses the dev venv as it is.
if [ "$SMOKE" = 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

FAILED=()
: > "$OUT_FILE"
# run NAME SECONDS CMD...: one check, its output appended to the results file, bounded in time.
run() {
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date -u +%H:%M:%S)): $*" | tee -a "$OUT_FILE"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT_FILE"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT_FILE"
  [ "$rc" = 0 ] || FAILED+=("$name")
}

"$PY" - <<'PY' 2>&1 | tee -a "$OUT_FILE"
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} gpu {gpu}")
PY

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  run sft_throughput 600 "$PY" bench/sft_throughput.py --device cpu --attention sdpa --samples 200 \
    --pack_length 512 --rows 2 --baseline_batch 4 --steps 2 --warmup 1
  run train_checks 900 "$PY" bench/train_checks.py --steps 3
  run codec_encode 600 "$PY" bench/codec_encode.py --preset tiny --device cpu --clips 2 --batch-size 16
  run infer_rtf 600 "$PY" bench/infer_rtf.py --device cpu --max_new_tokens 20 --repeats 1
else
  DEVICE=cuda
  ATTENTION=flex,sdpa
  if "$PY" -c "import flash_attn" 2>/dev/null; then ATTENTION=$ATTENTION,flash_attention_2; fi
  run sft_throughput 270 "$PY" bench/sft_throughput.py --preset llama-3.2-1b --device cuda \
    --codebook_size 65536 --pack_length 16384 --rows 1 --baseline_batch 8 --steps 8 --warmup 3 \
    --attention "$ATTENTION"
  run train_checks 120 "$PY" bench/train_checks.py --steps 20
  run codec_encode 75 "$PY" bench/codec_encode.py --preset full --device cuda --clips 64 --batch-size 16
  run infer_rtf 75 "$PY" bench/infer_rtf.py --preset llama-3.2-1b --codec_preset full --device cuda \
    --max_new_tokens 500 --repeats 3
fi

echo "device $DEVICE; failed checks: ${FAILED[*]:-none}" | tee -a "$OUT_FILE"
[ ${#FAILED[@]} = 0 ]
