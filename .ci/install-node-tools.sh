#!/usr/bin/env bash
# What a local Kubernetes node needs besides the binaries .ci/build-kube-apiserver.sh builds (tests/cluster,
# make demo-cluster): containerd + runc (bookworm's containerd 1.6 speaks CRI v1alpha2, as kubelet 1.20
# does), the CNI plugins, iptables/conntrack for kube-proxy, buildah + mmdebstrap for the images
# (.ci/build-images.sh). ~30 s on a fresh machine; nothing is started (the suite runs its own containerd).
set -euo pipefail
need=(containerd runc buildah mmdebstrap uidmap containernetworking-plugins iptables conntrack)
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Some systems start containerd on install; the suite runs its own, on its own socket.
  $SUDO systemctl disable --now containerd >/dev/null 2>&1 || true
fi
echo "node tools: containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), buildah $(buildah --version | awk '{print $3}')"
