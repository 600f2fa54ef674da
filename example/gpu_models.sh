#!/usr/bin/env bash
# The example SpeechLM on one GPU (issue 16): one prepared device command (<= 10 minutes) trains two
# sizes of it at once on the vectorized corpus, each keeping its lowest-val-loss model; they come back
# here to be judged by our eval (pocketsphinx, resemblyzer and DNSMOS run on this machine's CPU).
#
# Why this shape: SFT on 2 CPU cores reaches ~2,000 tokens/s, so a session trains ~10M tokens and the
# model still babbles (bench/RESULTS.md); one H200 trains the same corpus for dozens of epochs in minutes.
# A device call carries at most 64 MiB and brings back at most 8 files of 16 MiB: the corpus travels as
# its codes (the audio is GBs), the models come back as float16 tarballs split into 15 MiB parts.
#
#   1. Here (dev machine, after `make install`): the corpus, its codes, and what the call carries.
#        python example/make_dataset.py corpus --n 12000 --n_pairs 3000 --out CORPUS   # ~6 min
#        tts-train vectorize --config example/configs/models/vectorize-corpus.yaml \
#          --set vectorize.dataset_path=CORPUS/train.jsonl \
#          --set vectorize.codec_model_path=example/models/codec-small --set vectorize.output_dir=VEC
#        bash example/gpu_models.sh --prepare VEC [VEC...]   # merges each, packs .gpu/ (site + codes)
#      More corpora add data (each VEC is a dataset of equal weight; val: all their val splits): e.g. also
#      the default-size corpus (`corpus --out C3000`), whose training sentences avoid c12k's held-out ones.
#   2. On the GPU machine (the device tool's `run`, carry [".gpu"], timeout_s 600):
#        bash example/gpu_models.sh --out $OUT
#   3. Here again, with the files that came back:
#        bash example/gpu_models.sh --collect FILES_AT --to DIR [--eval_list CORPUS/eval_list.jsonl]
#      reassembles DIR/<arm>/model (float16 weights; our loaders read them as float32) and, given an
#      eval list, judges each arm with `tts-train eval` on its first --eval_items (20) items.
#   CPU smoke run of step 2 (a few steps, the same code path but CUDA; what CI tests):
#        bash example/gpu_models.sh --smoke --out DIR
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_site.sh

PY=${PYTHON:-python3}
MODE=train SMOKE=0 OUT= VECS=() FILES= TO= EVAL_LIST= EVAL_ITEMS=20
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare; shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do VECS+=("$1"); shift; done
               continue ;;
    --collect) MODE=collect; FILES="$2"; shift ;;
    --to) TO="$2"; shift ;;
    --eval_list) EVAL_LIST="$2"; shift ;;
    --eval_items) EVAL_ITEMS="$2"; shift ;;
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
DATA_TARBALL=$GPU_DIR/vectorized.tar.xz
# The two arms: name, model preset, peak learning rate (the CPU runs used 1e-3 at 4 rows per step;
# here 32 rows per step).
ARMS=("small small 2e-3" "small-wide small-wide 1.5e-3")

if [ "$MODE" = prepare ]; then
  [ ${#VECS[@]} -gt 0 ] || { echo "--prepare VEC [VEC...]" >&2; exit 2; }
  stage=$(mktemp -d)
  for i in "${!VECS[@]}"; do
    vec=${VECS[$i]}
    [ -d "$vec" ] || { echo "--prepare: $vec is not a vectorized dataset directory" >&2; exit 2; }
    if ! ls "$vec"/train_codes.npy >/dev/null 2>&1; then
      "$PY" -m trainer merge --set merge.dataset_path="$vec" --set merge.remove_shards=false || exit 1
    fi
    mkdir -p "$stage/$i"
    for f in train_codes.npy train_codes_index.npy train_samples.jsonl val_codes.npy val_codes_index.npy \
             val_samples.jsonl dataset_info.json; do
      ln -s "$(realpath "$vec/$f")" "$stage/$i/$f" || exit 1
    done
  done
  gpu_site_ready "$PY" || exit 1
  mkdir -p "$GPU_DIR"
  tar -chJf "$DATA_TARBALL.tmp" -C "$stage" . && mv "$DATA_TARBALL.tmp" "$DATA_TARBALL" || exit 1
  rm -rf "$stage"
  ls -l "$DATA_TARBALL"
  travel_mib
  exit
fi

if [ "$MODE" = collect ]; then
  [ -n "$FILES" ] && [ -n "$TO" ] || { echo "--collect FILES_AT --to DIR" >&2; exit 2; }
  mkdir -p "$TO"
  cp "$FILES"/results.txt "$TO"/ 2>/dev/null
  for arm in "${ARMS[@]}"; do
    read -r name _ <<< "$arm"
    ls "$FILES/$name".tar.part-* >/dev/null 2>&1 || { echo "no $name model came back" >&2; continue; }
    rm -rf "${TO:?}/$name" && cat "$FILES/$name".tar.part-* | tar -x -C "$TO" || exit 1
    if [ -n "$EVAL_LIST" ]; then
      "$PY" -m trainer eval --config example/configs/models/eval-corpus.yaml \
        --set eval.model_path="$TO/$name/model" --set eval.codec_model_path=example/models/codec-small \
        --set eval.test_list="$EVAL_LIST" --set eval.max_items="$EVAL_ITEMS" --set eval.output_dir="$TO/$name/eval" \
        || exit 1
    fi
  done
  exit
fi

[ -n "$OUT" ] || { echo "--out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$SMOKE" = 1 ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  DATA=${GPU_MODELS_SMOKE_DATA:?the smoke run trains on GPU_MODELS_SMOKE_DATA (a directory as --prepare packs)}
  # A few steps of each arm: every stage of the run, in minutes on a CPU.
  STEPS=4 EVAL_STEPS=2 BATCH=2 WARMUP=1 LIMIT=600 PRECISION=fp32 WORKERS=0
else
  gpu_site_install || exit 1
  mkdir -p "$WORK/data" && tar -xJf "$DATA_TARBALL" -C "$WORK/data" || exit 1
  DATA=$WORK/data
  # ~100M tokens per arm: dozens of epochs of the corpus, so the best model is kept by val loss. LIMIT
  # stops an arm (SIGTERM: it saves and exits) should the GPU be slower than planned.
  STEPS=3000 EVAL_STEPS=100 BATCH=32 WARMUP=200 LIMIT=450 PRECISION=bf16 WORKERS=4
fi
gpu_versions "$PY" 2>&1 | tee "$RESULTS"

# Every packed corpus at weight 1.0, for training and for validation.
DATASETS=$(cd "$DATA" && shopt -s nullglob && for d in */; do printf '"%s": 1.0\n' "$DATA/${d%/}"; done | paste -sd, -)
[ -n "$DATASETS" ] || { echo "no datasets under $DATA" >&2; exit 1; }

# train_arm NAME PRESET LR [SET...]: one SFT run of the arm, bounded by LIMIT seconds.
train_arm() {
  local name="$1" preset="$2" lr="$3"; shift 3
  timeout -s TERM -k 30 "$LIMIT" "$PY" -m trainer sft --config example/configs/models/sft-small.json \
    --set modeling.parameters.model_name="$preset" --set training.learning_rate="$lr" \
    --set training.precision="$PRECISION" --set training.batch_size="$BATCH" --set training.max_steps="$STEPS" \
    --set training.warmup_steps="$WARMUP" --set training.eval_steps="$EVAL_STEPS" \
    --set training.num_workers="$WORKERS" --set training.logging_steps=50 \
    --set training.output_dir="$WORK/runs" --set training.run_name="$name" \
    --set checkpointing.save_steps=500 --set checkpointing.save_best=true \
    --set "train_weighted_datasets={$DATASETS}" --set "val_weighted_datasets={$DATASETS}" \
    --set metrics.port=0 "$@" > "$WORK/$name.log" 2>&1
}

# retry_with_sdpa NAME PRESET LR: after a failed first attempt with no best model yet, once more with
# SDPA attention (flex attention compiles kernels: the newest path), if a minute or more is left.
retry_with_sdpa() {
  local left=$((LIMIT - (SECONDS - start)))
  [ -d "$WORK/runs/$1/best_model" ] || [ "$left" -lt 60 ] && return 1
  mv "$WORK/$1.log" "$WORK/$1.flex.log"
  LIMIT=$left train_arm "$@" --set modeling.parameters.attn_implementation=sdpa
}

# Both arms at once (a GPU this size is far from busy with either).
start=$SECONDS
for arm in "${ARMS[@]}"; do
  read -r name preset lr <<< "$arm"
  ( train_arm "$name" "$preset" "$lr" || retry_with_sdpa "$name" "$preset" "$lr" ) &
done
wait

# Each arm: its best model (float16), log, metrics and best.json in one tarball, split into parts that
# the device tool brings back (<= 16 MiB a file).
for arm in "${ARMS[@]}"; do
  read -r name _ <<< "$arm"
  run=$WORK/runs/$name
  {
    echo "=== $name"
    logs=("$WORK/$name.log"); [ -f "$WORK/$name.flex.log" ] && logs+=("$WORK/$name.flex.log")
    grep -hE "training [0-9]+ steps|eval_loss|best model|stopped by SIGTERM|final model|Error|error" \
      "${logs[@]}" | tail -60
  } >> "$RESULTS"
  model=$run/best_model
  [ -d "$model" ] || model=$run/final_model
  [ -d "$model" ] || { echo "$name: no model (see its log above)" >> "$RESULTS"; continue; }
  mkdir -p "$WORK/pack/$name"
  "$PY" -m trainer export --set export.checkpoint_path="$model" --set export.output_path="$WORK/pack/$name/model" \
    --set export.dtype=float16 >> "$WORK/$name.log" 2>&1 || { echo "$name: export failed" >> "$RESULTS"; continue; }
  cp "${logs[@]}" "$run/metrics.jsonl" "$model"/best.json "$WORK/pack/$name/" 2>/dev/null
  tar -cf - -C "$WORK/pack" "$name" | split -b 15M -d -a 1 - "$OUT/$name.tar.part-"
  echo "$name: $(cat "$model/best.json" 2>/dev/null || echo final model) -> $(ls "$OUT/$name".tar.part-* | wc -l) part(s)" \
    >> "$RESULTS"
done
echo "elapsed $((SECONDS - start)) s" >> "$RESULTS"
rm -rf "$WORK"
ls "$OUT"/*.tar.part-* >/dev/null 2>&1
