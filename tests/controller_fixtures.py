"""Helpers for the controller tests: a small pipeline spec with inline stage configs. Rendered objects are
validated with `k8s_schemas.validate.object_errors` (vendored CRDs + kubernetes-validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from k8s_schemas.validate import object_errors

__all__ = ["REPO", "object_errors", "spec_dict", "write_spec"]

REPO = Path(__file__).resolve().parents[1]

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
            "workspace": {"claimName": "tts-workspace"},
        },
    }


def write_spec(tmp: Path, data: dict[str, Any], name: str = "pipeline.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
