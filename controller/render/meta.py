"""Names and labels shared by every rendered object of a run."""

from __future__ import annotations

from controller.spec import PipelineSpec

PART_OF = "tts-training"
RUN_LABEL = "speechlm.io/run"
STAGE_LABEL = "speechlm.io/stage"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "ttsctl"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Istio sidecars keep a finished pod alive (the job never completes) and break log calls.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}

# On each PyTorchJob: cluster.pendingTimeoutSeconds, read back by `ttsctl status/wait`.
PENDING_TIMEOUT_ANNOTATION = "speechlm.io/pending-timeout-seconds"

CONFIG_MOUNT = "/config"


def job_name(spec: PipelineSpec, stage: str) -> str:
    return f"{spec.name}-{stage}"


def config_map_name(spec: PipelineSpec, stage: str) -> str:
    return f"{spec.name}-{stage}-config"


def rollout_name(spec: PipelineSpec) -> str:
    # Never plain "vllm": service links would inject VLLM_PORT=tcp://..., which vLLM rejects.
    return f"{spec.name}-rollout"


def selector_labels(spec: PipelineSpec, stage: str, component: str) -> dict[str, str]:
    return {RUN_LABEL: spec.name, STAGE_LABEL: stage, COMPONENT_LABEL: component}


def labels(spec: PipelineSpec, stage: str, component: str) -> dict[str, str]:
    """The user's extra labels, then ours (ours win: selectors and `ttsctl` lookups rely on them)."""
    return {
        **spec.cluster.labels,
        "app.kubernetes.io/name": PART_OF,
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/part-of": PART_OF,
        MANAGED_BY_LABEL: MANAGED_BY,
        **selector_labels(spec, stage, component),
    }


def annotations(spec: PipelineSpec) -> dict[str, str] | None:
    return dict(spec.cluster.annotations) or None


def job_annotations(spec: PipelineSpec) -> dict[str, str]:
    return {**spec.cluster.annotations, PENDING_TIMEOUT_ANNOTATION: str(spec.cluster.pendingTimeoutSeconds)}


def pod_annotations(spec: PipelineSpec) -> dict[str, str]:
    return {**spec.cluster.annotations, **POD_ANNOTATIONS}
