"""The ConfigMap holding a stage's resolved trainer config, mounted at /config in its pods."""

from __future__ import annotations

from kubernetes import client as k8s

from controller.plan import StageRun
from controller.render import meta
from controller.spec import PipelineSpec
from trainer.config import TrainerConfig, dump_config


def rollout_address(spec: PipelineSpec) -> tuple[str, int, int]:
    """(host, HTTP port, weight-sync group port) of the run's vLLM rollout server."""
    rollout = spec.stages.rlhf.rollout
    host = f"{meta.rollout_name(spec)}.{spec.cluster.namespace}.svc"
    return host, rollout.port, rollout.group_port


def cluster_config(spec: PipelineSpec, run: StageRun) -> TrainerConfig:
    """The stage config as pods see it: the cluster's collective timeout and, for RLHF, the rollout server."""
    config = run.config.model_copy(deep=True)
    config.training.process_group_timeout_s = spec.cluster.processGroupTimeoutSeconds
    if run.step.stage.needs_rollout_server:
        host, port, group_port = rollout_address(spec)
        config.rlhf_training.use_vllm = True
        # The Deployment runs TRL's `trl vllm-serve` (controller/render/rollout.py), whose weights arrive by
        # NCCL; the stock-vLLM `storage` sync is not rendered for clusters yet.
        config.rlhf_training.weight_sync = "nccl"
        config.rlhf_training.vllm_server_host = host
        config.rlhf_training.vllm_server_port = port
        config.rlhf_training.vllm_group_port = group_port
    return config


def config_map(spec: PipelineSpec, run: StageRun) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=k8s.V1ObjectMeta(
            name=meta.config_map_name(spec, run.name),
            namespace=spec.cluster.namespace,
            labels=meta.labels(spec, run.name, "config"),
            annotations=meta.annotations(spec),
        ),
        data={run.config_file: dump_config(cluster_config(spec, run)) + "\n"},
    )
