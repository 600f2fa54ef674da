#!/usr/bin/env bash
# Build the images a local node runs (tests/cluster, make demo-cluster) with buildah, on a machine with no
# container registry and no Docker engine:
#   pause  k8s.gcr.io/pause:3.2, the sandbox program built from the Kubernetes source we build;
#   init   localhost/debian-dnsutils:bookworm: sh, seq, sleep and nslookup for the PyTorchJob operator's
#          worker init container (its default, alpine:3.10, cannot be pulled). Not busybox: Debian's
#          busybox 1.35 nslookup fails unless every search domain answers, so the wait never ends;
#          bind9's stops at the first that does, as alpine's did;
#   cpu    images/cpu/Dockerfile, and
#   rollout images/rollout-cpu/Dockerfile (vLLM's CPU build: the RLHF stage's rollout Deployment), as a
#          user's `docker build` would:
#   1. the Dockerfile's base, python:3.11-slim-bookworm, is made locally from Debian bookworm with
#      mmdebstrap (python3 + venv + ca-certificates; `python` on PATH as in the Docker Hub image) and
#      tagged with that name, so `FROM` resolves to it (--pull-never);
#   2. `buildah bud` builds the Dockerfile (docker format: it honours SHELL). Its RUN steps see this
#      machine's pip set-up (its configuration, CA bundle and wheel directory, mounted read-only) the way
#      a user's build sees their network; download.pytorch.org is out of reach here, so TORCH_INDEX_URL
#      names PyPI and torch comes from the CPU wheel on disk;
# Each image is written as an OCI archive, ready for `ctr images import` on a node.
#
# Usage: .ci/build-images.sh     prints {"pause"|"init"|"cpu"|"rollout": {"tag": ..., "archive": ...}} as JSON
# Cache: ${TTS_IMAGES_CACHE:-~/.cache/tts-images}: the base rootfs tarball and buildah's storage (layers
#        are reused: a change to the project's sources rebuilds only the layers from `COPY trainer` on).
# Needs root, buildah and mmdebstrap (.ci/install-node-tools.sh).
set -euo pipefail

CPU_TAG="ghcr.io/speechlm/tts-cpu:dev"
ROLLOUT_TAG="ghcr.io/speechlm/tts-rollout-cpu:dev"
PAUSE_TAG="k8s.gcr.io/pause:3.2"
INIT_TAG="localhost/debian-dnsutils:bookworm"
INIT_PACKAGES="bind9-dnsutils"
BASE_TAG="docker.io/library/python:3.11-slim-bookworm"
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,passwd"
MIRROR="http://deb.debian.org/debian"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TTS_IMAGES_CACHE:-$HOME/.cache/tts-images}"
mkdir -p "$cache"
log() { echo "build-images: $*" >&2; }
exec 9>"$cache/.lock"
flock 9

# buildah's own storage lives in the cache (overlay layers survive between runs); its run state does not.
B=(buildah --root "$cache/storage" --runroot "/run/tts-buildah")

base_tar="$cache/base-bookworm-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-12).tar"
if ! "${B[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
  if [[ ! -s "$base_tar" ]]; then
    log "making the base rootfs with mmdebstrap (~30-100 s)"
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm "$base_tar.tmp" "$MIRROR" >&2
    mv "$base_tar.tmp" "$base_tar"
  fi
  ctr="$("${B[@]}" from scratch)"
  "${B[@]}" add "$ctr" "$base_tar" / >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$BASE_TAG" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
  log "tagged the local base as $BASE_TAG"
fi

# This machine's pip set-up, read-only, for the build's RUN steps: its effective configuration (files and
# PIP_* environment, as `pip config list` reports it) written as one pip.conf, and the paths it names.
pip_conf="$cache/pip.conf"
python3 -m pip config list 2>/dev/null | python3 -c '
import re, sys
settings = {}
for line in sys.stdin:
    m = re.match(r"^(?:global|:env:)\.([a-z-]+)=(.*)$", line.strip())
    if m:
        settings[m.group(1)] = m.group(2).strip("\x27\"")
print("[global]")
for key, value in settings.items():
    print(f"{key} = {value}")
' >"$pip_conf"
mounts=(--volume "$pip_conf:/etc/pip.conf:ro")
for path in /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt /opt/wheels /opt/pypi /opt/pypi-more; do
  [[ -e "$path" ]] && mounts+=(--volume "$path:$path:ro")
done
# The CPU wheel on disk, PyPI for its dependencies (download.pytorch.org is out of reach here).
env_args=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)

archive() {  # TAG -> its OCI archive, rewritten only when the image changed
  local tag="$1" file id
  file="$cache/$(echo "$tag" | tr '/:' '__').oci.tar"
  id="$("${B[@]}" inspect --type image --format '{{.FromImageID}}' "$tag")"
  if [[ ! -s "$file" || "$(cat "$file.id" 2>/dev/null)" != "$id" ]]; then
    rm -f "$file.tmp"
    "${B[@]}" push --quiet "$tag" "oci-archive:$file.tmp:$tag" >&2
    mv "$file.tmp" "$file"
    echo "$id" >"$file.id"
  fi
  echo "$file"
}

if ! "${B[@]}" inspect --type image "$PAUSE_TAG" >/dev/null 2>&1; then
  k8s_bin="$(bash "$repo/.ci/build-kube-apiserver.sh")"
  ctr="$("${B[@]}" from scratch)"
  "${B[@]}" copy "$ctr" "$k8s_bin/pause" /pause >/dev/null
  "${B[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$PAUSE_TAG" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
fi

if ! "${B[@]}" inspect --type image "$INIT_TAG" >/dev/null 2>&1; then
  init_tar="$cache/init-bookworm-$(echo "$INIT_PACKAGES" | sha256sum | cut -c1-12).tar"
  if [[ ! -s "$init_tar" ]]; then
    mmdebstrap --quiet --variant=minbase --include="$INIT_PACKAGES" bookworm "$init_tar.tmp" "$MIRROR" >&2
    mv "$init_tar.tmp" "$init_tar"
  fi
  ctr="$("${B[@]}" from scratch)"
  "${B[@]}" add "$ctr" "$init_tar" / >/dev/null
  "${B[@]}" config --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --cmd sh "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$INIT_TAG" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
fi

bud() {  # DOCKERFILE TAG
  log "building $1 as $2"
  local start
  start=$(date +%s)
  # Docker (BuildKit) reads <Dockerfile>.dockerignore by itself; buildah 1.28 only reads the context's own
  # .dockerignore, so name it. Without it COPY took __pycache__ in, and each test run's bytecode missed the cache.
  # The build stage is tagged too (<tag>-build): its layers are then not dangling, so the prune below keeps
  # them as the cache of the next build (untagged, every build re-ran its torch/vLLM installs).
  local args=(--layers --pull-never --format docker --isolation chroot "${mounts[@]}" "${env_args[@]}"
              --ignorefile "$repo/$1.dockerignore" -f "$repo/$1")
  "${B[@]}" bud "${args[@]}" --target build -t "$2-build" "$repo" >&2
  "${B[@]}" bud "${args[@]}" -t "$2" "$repo" >&2
  log "built in $(( $(date +%s) - start )) s"
}
bud images/cpu/Dockerfile "$CPU_TAG"
bud images/rollout-cpu/Dockerfile "$ROLLOUT_TAG"
# Superseded layers of earlier builds (each source change rebuilds the project's layers, ~2 GB) go.
"${B[@]}" rmi --prune >/dev/null 2>&1 || true

printf '{"pause": {"tag": "%s", "archive": "%s"}, "init": {"tag": "%s", "archive": "%s"}, ' \
  "$PAUSE_TAG" "$(archive "$PAUSE_TAG")" "$INIT_TAG" "$(archive "$INIT_TAG")"
printf '"cpu": {"tag": "%s", "archive": "%s"}, "rollout": {"tag": "%s", "archive": "%s"}}\n' \
  "$CPU_TAG" "$(archive "$CPU_TAG")" "$ROLLOUT_TAG" "$(archive "$ROLLOUT_TAG")"
