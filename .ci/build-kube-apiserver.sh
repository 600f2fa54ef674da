#!/usr/bin/env bash
# Build a real Kubernetes control plane and node for the k8s test suites (tests/k8s/, tests/cluster/),
# offline: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and the pause
# binary (the sandbox image's only program, static, from build/pause/linux/pause.c).
# No package registry ships modern Kubernetes server binaries; Debian bookworm's `kubernetes` source
# package (1.20.2, dependencies vendored) builds them with Debian's Go. Its vendored
# modern-go/reflect2 crashes under Go 1.19 on the first custom-resource write, so reflect2 and
# json-iterator are replaced by Debian's packaged sources (reflect2 1.0.2, json-iterator 1.1.12).
# etcd comes from Debian's etcd-server.
#
# Usage: .ci/build-kube-apiserver.sh          prints the directory holding the binaries
# Cache: ${TTS_K8S_CACHE:-~/.cache/tts-k8s}/<version>/bin, reused when present (build ~8+ min on
#        2 cores, once per machine). Needs root or sudo for apt-get.
set -euo pipefail

K8S_VERSION="1.20.2"
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
cache_root="${TTS_K8S_CACHE:-$HOME/.cache/tts-k8s}"
dest="$cache_root/$K8S_VERSION"
bin="$dest/bin"
log() { echo "build-kube-apiserver: $*" >&2; }

have_binaries() {
  local b
  for b in $BINARIES pause; do [[ -x "$bin/$b" ]] || return 1; done
  command -v etcd >/dev/null
}
if have_binaries; then echo "$bin"; exit 0; fi

mkdir -p "$dest"
# One build at a time per cache (make test-k8s and .ci/run may start together).
exec 9>"$dest/.lock"
flock 9
if have_binaries; then echo "$bin"; exit 0; fi

SUDO=""
[[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
# apt-get source needs a deb-src entry for bookworm main; add one of our own if none is there.
if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding a deb-src entry for bookworm main"
  $SUDO tee /etc/apt/sources.list.d/tts-k8s-deb-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  golang-go rsync make dpkg-dev etcd-server gcc libc6-dev \
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >/dev/null
# Debian starts an etcd service on install on some systems; the tests start their own.
$SUDO systemctl disable --now etcd >/dev/null 2>&1 || true

work="$dest/src"
rm -rf "$work"
mkdir -p "$work"
log "fetching the kubernetes source package"
# bookworm's version string is 1.20.5+really1.20.2-...: the 1.20.2 tree with security fixes.
src_version="$(apt-cache showsrc kubernetes | sed -n 's/^Version: //p' | grep -F "$K8S_VERSION-" | head -n1)"
[[ -n "$src_version" ]] || { log "no kubernetes $K8S_VERSION source package in the apt sources"; exit 1; }
(cd "$work" && apt-get source -qq "kubernetes=$src_version" >/dev/null)
tree="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
[[ -n "$tree" && -d "$tree/vendor" ]] || { log "no vendored kubernetes tree under $work"; exit 1; }

for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  rsync -a --delete --exclude '*_test.go' "/usr/share/gocode/src/$pkg/" "$tree/vendor/$pkg/"
done

log "building $BINARIES (several minutes)"
start=$(date +%s)
(
  cd "$tree"
  export GOPROXY=off CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$dest/gocache" GOPATH="$dest/gopath"
  nice make WHAT="$(printf 'cmd/%s ' $BINARIES)" >"$dest/build.log" 2>&1
) || { log "build failed, see $dest/build.log"; tail -n 30 "$dest/build.log" >&2; exit 1; }
mkdir -p "$bin.tmp"
for b in $BINARIES; do cp "$tree/_output/bin/$b" "$bin.tmp/"; done
# Kubernetes' own pause container program, built as its Makefile does (static, version baked in).
gcc -Os -Wall -Werror -static -DVERSION="v3.4-$K8S_VERSION" -o "$bin.tmp/pause" "$tree/build/pause/linux/pause.c"
rm -rf "$bin" && mv "$bin.tmp" "$bin"
log "built in $(( $(date +%s) - start )) s"
# The sources and the Go caches are several GB; only the binaries are worth keeping.
chmod -R u+w "$dest/gopath" 2>/dev/null || true
rm -rf "$work" "$dest/gocache" "$dest/gopath"
echo "$bin"
