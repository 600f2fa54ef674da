"""Offline Kubernetes checks shared by the chart, manifest and skaffold tests.

- Custom resources (PyTorchJob, PodMonitor, ServiceMonitor) against the vendored CRDs' openAPIV3Schema
  with jsonschema. CRD schemas never close objects (the API server prunes, or with strict field
  validation rejects, unknown fields), so every object that lists `properties` and does not preserve
  unknown fields is closed here: a typo such as `pytorchReplicaSpec` fails.
- Built-in kinds with kubernetes-validate (strict, Kubernetes 1.30 schemas, bundled in the package).
- The external binaries (helm, checkov) from `.tools/bin` or HELM_BIN / CHECKOV_BIN: a missing tool
  fails the test under CI (CI env set) and skips it elsewhere, with the command that installs it.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

SCHEMAS = Path(__file__).resolve().parent
REPO = SCHEMAS.parents[1]
KUBERNETES_VERSION = "1.30.0"

CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_INSTALL_HINT = "install it with `bash .ci/install-k8s-tools.sh` (helm, kubectl, checkov into .tools/)"


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        # Int-or-string fields (ports, quantities) sometimes come without a type.
        if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in node.values():
            _close_objects(child)
    elif isinstance(node, list):
        for child in node:
            _close_objects(child)


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    group, _, version = api_version.rpartition("/")
    with open(SCHEMAS / CRD_FILES[(api_version, kind)]) as f:
        crd = yaml.safe_load(f)
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
    _close_objects(schema)
    # OpenAPI v3.0 is closest to draft 4 (boolean exclusiveMinimum/Maximum).
    return jsonschema.Draft4Validator(schema)


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CRD_FILES


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one object (custom or built-in), each prefixed by kind/name and field path."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if is_custom(obj):
        errors = crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj)
        return sorted(f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path)) or '<root>'}: {err.message}"]
    return []


def metadata_errors(obj: dict[str, Any]) -> list[str]:
    """What CRD schemas leave unchecked: object names are DNS labels, labels are label values."""
    errors = []
    meta = obj.get("metadata", {})
    name = meta.get("name", "")
    if not _DNS_LABEL.fullmatch(name) or len(name) > 63:
        errors.append(f"{obj.get('kind')}/{name}: name is not a DNS label")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            errors.append(f"{obj.get('kind')}/{name}: label {key}={value!r} is not a valid label value")
    return errors


def all_errors(objects: list[dict[str, Any]]) -> list[str]:
    return [err for obj in objects for err in object_errors(obj) + metadata_errors(obj)]


def tool(name: str) -> str:
    """Path of helm / checkov / kubectl: env NAME_BIN, then .tools/bin; fail under CI, else skip."""
    path = os.environ.get(f"{name.upper()}_BIN") or str(REPO / ".tools" / "bin" / name)
    if os.access(path, os.X_OK):
        return path
    message = f"{name} not found at {path}: {_INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    """A console script installed with the dev extra (hadolint, yamllint) next to this Python."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: `pip install -e .[dev]` installs it")
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def helm_template(values_files: list[Path] = (), release: str = "tts", namespace: str = "tts",
                  extra: list[str] = ()) -> tuple[str, list[dict[str, Any]]]:
    """`helm template` the chart; returns the YAML text and its objects (fails on a render error)."""
    cmd = [tool("helm"), "template", release, str(REPO / "charts" / "tts-training"), "--namespace", namespace]
    for path in values_files:
        cmd += ["--values", str(path)]
    result = run([*cmd, *extra])
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return result.stdout, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def yamllint_errors(paths: list[Path]) -> str:
    """yamllint with the repo config; returns its report ('' when clean)."""
    result = run([venv_tool("yamllint"), "-s", "-f", "parsable", "-c", str(REPO / ".yamllint"), *map(str, paths)])
    return result.stdout + (result.stderr if result.returncode else "")
