"""Helpers for the controller tests: a small pipeline spec with inline stage configs, and offline
validation of rendered objects (CRD openAPIV3Schema for PyTorchJobs, kubernetes-validate for the
built-in kinds)."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTORCHJOB_CRD = REPO / "tests" / "k8s" / "crds" / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.30.0"

TINY_CODEC = {"fsq_levels": [4, 4, 4, 4], "encoder_channels": 4, "encoder_dim": 64, "quantizer_dim": 64,
              "decoder_dim": 64, "decoder_layers": 2, "decoder_heads": 4}


def spec_dict(tmp: Path) -> dict[str, Any]:
    """All stages enabled, configs inline, storage under `tmp`, a 2-node SFT."""
    return {
        "name": "t1",
        "storage": {"data": str(tmp / "data"), "checkpoints": str(tmp / "ckpt"), "outputs": str(tmp / "out")},
        "stages": {
            "codec": {"enabled": True, "config": {"codec": {"model": TINY_CODEC}}, "gpus_per_node": 1},
            "vectorize": {"config": {"vectorize": {"dataset_path": "example/configs/samples.jsonl"}},
                          "gpus_per_node": 1},
            "merge": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}},
            "sft": {"config": {"training": {"max_steps": 2}}, "nodes": 2, "gpus_per_node": 8,
                    "env": {"EXTRA": "1"}},
            "rlhf": {"config": {}, "gpus_per_node": 2, "rollout": {"gpus": 1}},
            "eval": {"config": {"eval": {"test_list": "example/configs/eval_list.jsonl"}}, "gpus_per_node": 1},
        },
        "cluster": {
            "namespace": "tts",
            "serviceAccount": "trainer",
            "queue": "team-a",
            "priorityClass": "high",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": ["regcred"],
            "secrets": {"wandb": {"name": "wandb", "key": "api-key"}, "gcs": {"name": "gcs", "key": "sa.json"}},
            "labels": {"team": "speech"},
            "annotations": {"owner": "speech-team"},
            "activeDeadlineSeconds": 86400,
        },
    }


def write_spec(tmp: Path, data: dict[str, Any], name: str = "pipeline.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _close(node: Any) -> None:
    """Strict mode: unknown fields are errors (the API server prunes them or, strict, rejects them)."""
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in node and "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


@cache
def pytorchjob_schema() -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all(PYTORCHJOB_CRD.read_text()) if d)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close(schema)
    return schema


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one rendered object; [] when it validates."""
    if obj["kind"] == "PyTorchJob":
        validator = jsonschema.Draft4Validator(pytorchjob_schema())
        return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj))
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []
