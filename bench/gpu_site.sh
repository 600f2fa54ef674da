# Sourced by the GPU scripts (bench/gpu_check.sh, example/gpu_models.sh): the Python packages our code
# needs that the GPU machine's image lacks, carried there as one xz tarball.
#
# A device call carries at most 64 MiB: the tracked tree (54 MiB, the shipped codec and SpeechLM are 51 of
# it) plus the carried paths. The pins travel unpacked and xz-compressed (3.5 MiB; as wheels they are
# several times that), and leave room for the corpus codes example/gpu_models.sh carries (~3 MiB).

GPU_DIR=${GPU_DIR:-.gpu}  # a test packs elsewhere
SITE_TARBALL=$GPU_DIR/site-py312.tar.xz
SITE_PINS=$GPU_DIR/site-py312.pins  # the pins the tarball holds: a changed pin list rebuilds it
DEVICE_LIMIT_MIB=64

# The versions of the dev venv (constraints/) of what our training code imports and the GPU image lacks;
# cffi/pycparser for soundfile. The image's own transformers (5.17 when last read) / tokenizers /
# huggingface-hub are used as they are: inside the range CI tests at both ends (4.57.6 and, by make
# test-latest, the newest 5.x), and carrying 4.57.6 (6 MiB) would not leave room for the codes.
# tests/test_gpu_check.py and tests/test_gpu_models.py run both scripts' smoke modes with only the image's
# packages (bench/gpu_image_packages.txt) and these importable.
GPU_PINS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 torch-einops-utils==0.2.0 loguru==0.7.3
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 num2words==0.5.14 docopt==0.6.2
)

# gpu_site_fetch PY: download the pins as py3.12 x86-64 wheels (where pip reaches PyPI) and pack them,
# unzipped, into $SITE_TARBALL. A wheel is a zip of what `pip install --no-deps` puts in site-packages.
gpu_site_fetch() {
  local py="$1" tmp
  tmp=$(mktemp -d)
  mkdir -p "$GPU_DIR" "$tmp/wheels" "$tmp/site"
  for pin in "${GPU_PINS[@]}"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp/wheels" "$pin" 2>/dev/null \
    || "$py" -m pip wheel -q --no-deps -w "$tmp/wheels" "$pin" \
    || { echo "could not fetch $pin" >&2; rm -rf "$tmp"; return 1; }
  done
  for wheel in "$tmp"/wheels/*.whl; do
    "$py" -m zipfile -e "$wheel" "$tmp/site" || { rm -rf "$tmp"; return 1; }
  done
  tar -cJf "$SITE_TARBALL.tmp" -C "$tmp/site" . && mv "$SITE_TARBALL.tmp" "$SITE_TARBALL" \
    && printf '%s\n' "${GPU_PINS[@]}" > "$SITE_PINS"
  rm -rf "$tmp"
  ls -l "$SITE_TARBALL"
}

# gpu_site_ready PY: fetch unless the tarball holds exactly the current pins.
gpu_site_ready() {
  [ -f "$SITE_TARBALL" ] && [ "$(cat "$SITE_PINS" 2>/dev/null)" = "$(printf '%s\n' "${GPU_PINS[@]}")" ] \
    || gpu_site_fetch "$1"
}

# gpu_site_install: on the GPU machine, unpack the tarball into /tmp/site and put it (and the repo) first
# on PYTHONPATH.
gpu_site_install() {
  [ -f "$SITE_TARBALL" ] || { echo "$SITE_TARBALL is missing: carry $GPU_DIR (made by --prepare)" >&2; return 1; }
  rm -rf /tmp/site && mkdir -p /tmp/site && tar -xJf "$SITE_TARBALL" -C /tmp/site || return 1
  export PYTHONPATH=/tmp/site:$PWD
}

# gpu_versions PY: one line of what a run ran on (python, torch, transformers, GPU), for its results file.
gpu_versions() {
  "$1" - <<'PY'
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} gpu {gpu}")
PY
}

# travel_mib: MiB a device call would carry with $GPU_DIR (the tracked and untracked-not-ignored files
# plus it); fails above the limit, so --prepare stops here rather than the call being refused there.
travel_mib() {
  local bytes
  bytes=$({ git ls-files -z --cached --others --exclude-standard; find "$GPU_DIR" -type f -print0; } \
    | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
  local mib=$((bytes / 1048576))
  echo "a device call would carry $mib MiB of at most $DEVICE_LIMIT_MIB (tracked tree + $GPU_DIR)"
  [ "$mib" -lt "$DEVICE_LIMIT_MIB" ]
}
