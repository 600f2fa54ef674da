#!/usr/bin/env bash
# Debian packages the pipeline and tests need: speech synthesis for the example data (flite,
# espeak-ng, sox), libsndfile for soundfile, a compiler + ninja for DeepSpeed's JIT ops.
set -euo pipefail
need=()
for cmd in flite espeak-ng sox g++ ninja; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  flite espeak-ng sox libsox-fmt-all libsndfile1 g++ ninja-build >/dev/null
