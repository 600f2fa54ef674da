"""The ConfigMap holding a stage's resolved trainer config, mounted at /config in its pods."""

from __future__ import annotations

from kubernetes import client as k8s

from controller.plan import StageRun
from controller.render import meta
from controller.spec import PipelineSpec
from trainer.config import TrainerConfig, dump_config
from trainer.errors import ConfigError


def rollout_address(spec: PipelineSpec) -> tuple[str, int, int]:
    """(host, HTTP port, weight-sync group port) of the run's vLLM rollout server."""
    rollout = spec.stages.rlhf.rollout
    host = f"{meta.rollout_name(spec)}.{spec.cluster.namespace}.svc"
    return host, rollout.port, rollout.group_port


def weight_sync(run: StageRun) -> str:
    """How the rollout server gets the policy's weights (rlhf_training.weight_sync: storage or nccl)."""
    return run.config.rlhf_training.weight_sync


def cluster_config(spec: PipelineSpec, run: StageRun) -> TrainerConfig:
    """The stage config as pods see it: the cluster's collective timeout and, for RLHF, the rollout server
    (and, for the `storage` weight sync, a weights directory both pods mount)."""
    config = run.config.model_copy(deep=True)
    config.training.process_group_timeout_s = spec.cluster.processGroupTimeoutSeconds
    if run.step.stage.needs_rollout_server:
        host, port, group_port = rollout_address(spec)
        rl = config.rlhf_training
        rl.use_vllm = True
        rl.vllm_server_host = host
        rl.vllm_server_port = port
        rl.vllm_group_port = group_port
        if rl.weight_sync == "storage" and not rl.weight_sync_dir:
            # vLLM reloads weights from a local path: the workspace claim, mounted by the trainer and the
            # rollout pods at the same path, is where they meet.
            if not spec.cluster.workspace:
                raise ConfigError("rlhf weight_sync 'storage' on a cluster needs cluster.workspace (a claim the "
                                  "trainer and rollout pods both mount) or rlhf_training.weight_sync_dir on a "
                                  "shared mount; or use weight_sync: nccl")
            rl.weight_sync_dir = f"{spec.cluster.workspace.mountPath}/rollout-weights/{spec.name}"
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
