"""The chart installs the same stage objects as `ttsctl render`: one pipeline spec, translated to chart
values, must give identical PyTorchJobs, rollout Deployment/Service/NetworkPolicy and (semantically)
identical stage configs. Only the chart's own bookkeeping labels (helm.sh/chart, version, managed-by)
differ. When the renderer changes shape, this test says where the chart must follow."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from k8s_schemas.validate import REPO, helm_template

from controller.render import render_dicts
from controller.spec import PipelineSpec, StageSpec, load_spec
from trainer.config import apply_overrides, load_config, read_config_file

CHART_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"}

SPEC = {
    "name": "parity",
    "storage": {"data": "runs/parity/data", "checkpoints": "gs://bucket/parity/ckpt", "outputs": "runs/parity"},
    "images": {"trainer": "reg.example/tts-trainer:1.0-cu128", "rollout": "reg.example/tts-rollout:1.0",
               "pull_policy": "Always"},
    "stages": {
        "codec": {"enabled": True, "config": {"codec": {"train": {"max_steps": 10}}}, "gpus_per_node": 1},
        "vectorize": {"config": {"vectorize": {"dataset_path": "example/configs/samples.jsonl"}},
                      "overrides": ["vectorize.batch_size=4"], "gpus_per_node": 1,
                      "resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}},
        "merge": {"resources": {"requests": {"cpu": "2"}}},
        "sft": {"config": {"training": {"strategy": "fsdp"}, "metrics": {"port": 9400}}, "nodes": 3,
                "gpus_per_node": 8, "env": {"NCCL_DEBUG": "WARN"}, "active_deadline_seconds": 3600},
        "rlhf": {"gpus_per_node": 2, "rollout": {"gpus": 2, "extra_args": ["--gpu_memory_utilization", "0.8"],
                                                  "env": {"VLLM_LOGGING_LEVEL": "INFO"}}},
        "eval": {"config": {"eval": {"test_list": "example/configs/eval_list.jsonl"}}, "gpus_per_node": 1},
    },
    "cluster": {
        "namespace": "speech", "serviceAccount": "tts-runner", "queue": "team-q", "priorityClass": "high",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "imagePullSecrets": ["regcred"], "labels": {"team": "speech"}, "annotations": {"owner": "speech"},
        "secrets": {"wandb": {"name": "wandb", "key": "api-key"}, "gcs": {"name": "gcs", "key": "sa.json"}},
        "workspace": {"claimName": "ws", "mountPath": "/ws"},
        "backoffLimit": 5, "ttlSecondsAfterFinished": 600, "shmSize": "8Gi", "processGroupTimeoutSeconds": 900,
    },
}


def _image(ref: str) -> dict[str, str]:
    repository, _, tag = ref.rpartition(":")
    return {"repository": repository, "tag": tag}


def _stage_config(spec: PipelineSpec, settings: StageSpec) -> dict[str, Any]:
    raw = read_config_file(spec.base_dir / settings.config) if isinstance(settings.config, str) else \
        dict(settings.config or {})
    return apply_overrides(raw, settings.overrides)


def _stage_values(spec: PipelineSpec, settings: StageSpec) -> dict[str, Any]:
    return {
        "enabled": settings.enabled, "nodes": settings.nodes, "gpusPerNode": settings.gpus_per_node,
        "resources": settings.resources.model_dump(), "env": settings.env, "image": settings.image or "",
        "activeDeadlineSeconds": settings.active_deadline_seconds, "config": _stage_config(spec, settings),
    }


def values_for(spec: PipelineSpec) -> dict[str, Any]:
    """The chart values that describe the same run as a pipeline spec (the documented mapping)."""
    cluster, stages = spec.cluster, spec.stages
    rollout = stages.rlhf.rollout
    return {
        "runName": spec.name,
        "images": {"trainer": _image(spec.images.trainer), "rollout": _image(spec.images.rollout),
                   "pullPolicy": spec.images.pull_policy},
        "imagePullSecrets": cluster.imagePullSecrets,
        "storage": spec.storage.model_dump(),
        "codecModelPath": spec.codec_model_path or "",
        "workspace": ({"enabled": True, "existingClaim": cluster.workspace.claimName,
                       "mountPath": cluster.workspace.mountPath} if cluster.workspace else {"enabled": False}),
        "serviceAccount": {"create": False, "name": cluster.serviceAccount or "default"},
        "rbac": {"create": False},
        "queue": cluster.queue or "",
        "priorityClassName": cluster.priorityClass or "",
        "nodeSelector": cluster.nodeSelector,
        "tolerations": [t.model_dump(exclude_none=True) for t in cluster.tolerations],
        "labels": cluster.labels,
        "annotations": cluster.annotations,
        "secrets": {k: (v.model_dump() if v else {}) for k, v in cluster.secrets},
        "jobs": {"backoffLimit": cluster.backoffLimit, "ttlSecondsAfterFinished": cluster.ttlSecondsAfterFinished,
                 "activeDeadlineSeconds": cluster.activeDeadlineSeconds, "shmSize": cluster.shmSize,
                 "processGroupTimeoutSeconds": cluster.processGroupTimeoutSeconds,
                 "terminationGracePeriodSeconds": cluster.terminationGracePeriodSeconds,
                 "pendingTimeoutSeconds": cluster.pendingTimeoutSeconds},
        "stages": {
            **{name: _stage_values(spec, getattr(stages, name))
               for name in ("codec", "vectorize", "merge", "sft", "export", "eval")},
            "rlhf": {**_stage_values(spec, stages.rlhf), "rollout": {
                "gpus": rollout.gpus, "resources": rollout.resources.model_dump(), "port": rollout.port,
                "groupPort": rollout.group_port, "startupTimeoutSeconds": rollout.startup_timeout_s,
                "extraArgs": rollout.extra_args, "env": rollout.env}},
        },
        "monitoring": {"podMonitor": {"enabled": False}, "serviceMonitor": {"enabled": False},
                       "dashboards": {"enabled": False}},
        "tests": {"enabled": False},
    }


def _normalize(node: Any) -> Any:
    """Drop the chart's bookkeeping labels and empty containers, parse stage configs into TrainerConfigs."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "labels" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in CHART_ONLY_LABELS}
            value = _normalize(value)
            if value not in ({}, [], None):
                out[key] = value
        return out
    if isinstance(node, list):
        return [_normalize(v) for v in node]
    return node


def _configs(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: load_config(data=json.loads(text)).model_dump() for key, text in obj["data"].items()}


@pytest.fixture(scope="module", params=["inline-spec", "example-pipeline"])
def both(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    if request.param == "example-pipeline":
        spec_path = REPO / "example" / "pipeline.yaml"
    else:
        spec_path = tmp / "pipeline.yaml"
        spec_path.write_text(yaml.safe_dump(SPEC))
    spec = load_spec(spec_path)
    values_path = tmp / "values.yaml"
    values_path.write_text(yaml.safe_dump(values_for(spec)))
    _, chart = helm_template([values_path], release=f"{spec.name}-release", namespace=spec.cluster.namespace)
    return render_dicts(spec), chart


def test_chart_renders_the_same_stage_objects_as_ttsctl(both):
    ours, chart = both
    chart_by_key = {(o["kind"], o["metadata"]["name"]): o for o in chart}
    assert len(ours) >= 12
    for obj in ours:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key in chart_by_key, f"the chart does not render {key}"
        theirs = chart_by_key[key]
        if obj["kind"] == "ConfigMap":
            assert _configs(theirs) == _configs(obj), key
            obj, theirs = {**obj, "data": None}, {**theirs, "data": None}
        assert _normalize(theirs) == _normalize(obj), key


def test_chart_renders_no_other_stage_objects(both):
    ours, chart = both
    stage_kinds = {"PyTorchJob", "Deployment", "Service", "NetworkPolicy", "ConfigMap"}
    chart_keys = {(o["kind"], o["metadata"]["name"]) for o in chart if o["kind"] in stage_kinds}
    assert chart_keys == {(o["kind"], o["metadata"]["name"]) for o in ours}
