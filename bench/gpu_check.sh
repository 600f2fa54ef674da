#!/usr/bin/env bash
# Every GPU check in one run (<= 10 minutes on one H100/H200), figures written to one file.
#
#   Step 1, where pip reaches PyPI (the dev machine), from the repo root:
#       bash bench/gpu_check.sh --fetch-wheels
#     packs the pinned dependencies the GPU machine lacks into .gpu/ (git-ignored; bench/gpu_site.sh:
#     3.5 MiB, so the call stays under the 64 MiB a device call carries; its transformers is the image's).
#   Step 2, on the GPU machine (torch + CUDA there; nothing else of ours), with .gpu/ carried along:
#       bash bench/gpu_check.sh [--out FILE]          # default FILE: gpu_check_results.txt
#     unpacks them into /tmp/site (the machine has no network), puts it first on PYTHONPATH, then runs
#     the checks. A check that fails is recorded and the next runs.
#     Each check has a time limit; they add up to 9 minutes, so one 10-minute device command holds it
#     (e.g. carry .gpu, command `bash bench/gpu_check.sh --out $OUT/gpu_check_results.txt`).
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

source bench/gpu_site.sh

if [ "${MODE:-}" = fetch ]; then
  gpu_site_fetch "$PY" && travel_mib
  exit
fi

# The tarball is the GPU machine's (py3.12); a smoke run uses the dev venv as it is.
if [ "$SMOKE" = 0 ] && [ -f "$SITE_TARBALL" ]; then
  gpu_site_install || exit 1
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

gpu_versions "$PY" 2>&1 | tee -a "$OUT_FILE"

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
