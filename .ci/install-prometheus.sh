#!/usr/bin/env bash
# Prometheus, promtool and the Pushgateway for the monitoring suite (tests/monitoring): Debian bookworm's
# packages, unpacked (not installed) into ~/.cache, so no service is started, no system user is made and
# nothing listens until a test starts it on 127.0.0.1. Cached: a second run returns at once. Prints the
# directory holding the three binaries.
set -euo pipefail

ROOT="${TTS_PROMETHEUS_HOME:-$HOME/.cache/tts-prometheus}"
PACKAGES=(prometheus prometheus-pushgateway)
BIN="$ROOT/bin"
STAMP="$ROOT/.installed"

if [[ -f "$STAMP" ]]; then
    echo "$BIN"
    exit 0
fi
rm -rf "$ROOT"
mkdir -p "$ROOT/debs" "$BIN"
# A fresh machine may have no package lists yet.
if ! apt-cache policy "${PACKAGES[0]}" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq >&2
fi
# `apt-get download` writes into the working directory; as root it warns that _apt cannot write there.
(cd "$ROOT/debs" && apt-get download -qq "${PACKAGES[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
for deb in "$ROOT"/debs/*.deb; do
    dpkg-deb -x "$deb" "$ROOT/root"
done
for name in prometheus promtool prometheus-pushgateway; do
    install -m 0755 "$ROOT/root/usr/bin/$name" "$BIN/$name"
done
"$BIN/prometheus" --version 2>&1 | head -1 >&2
"$BIN/prometheus-pushgateway" --version 2>&1 | head -1 >&2
touch "$STAMP"
echo "$BIN"
