"""The RLHF stage's vLLM rollout server: a Deployment, a headless Service and a NetworkPolicy.

By the stage's `rlhf_training.weight_sync`:
- `storage` (default): vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`,
  the server tests/real_vllm runs), HTTP on `port` only. The trainer writes the policy's weights under the
  workspace claim both pods mount and asks the server to reload them (`/collective_rpc`, which needs
  VLLM_SERVER_DEV_MODE=1).
- `nccl`: TRL 0.x's `trl vllm-serve`: HTTP on `port` for generation, and a weight-sync group whose
  TCPStore listens on `group_port` in the server pod; NCCL then runs pod to pod on ephemeral ports.
Either way only the trainer pods of the same run may connect: both weight syncs let a client replace
the served weights.
"""

from __future__ import annotations

from kubernetes import client as k8s

from controller.plan import StageRun, layout_of
from controller.render import meta, pod
from controller.render.config_map import weight_sync
from controller.spec import PipelineSpec
from trainer import io
from trainer.errors import ConfigError
from trainer.stages import STEPS

# The step the server serves: the one whose stage needs it (rlhf).
STAGE = next(s.name for s in STEPS.values() if s.stage.needs_rollout_server)
CONTAINER = "rollout"
MODEL_MOUNT = "/model"


def _model(spec: PipelineSpec) -> tuple[str, list[k8s.V1Container], list[k8s.V1Volume]]:
    """The served model (the exported SFT model) and, for object-store URLs, an init container that
    copies it to a local volume (vLLM loads local directories only)."""
    url = layout_of(spec).output("export-sft")
    if io.is_local(url):
        return io.local_path(url), [], []
    fetch = k8s.V1Container(
        name="fetch-model",
        image=spec.images.trainer,
        image_pull_policy=spec.images.pull_policy,
        command=["python", "-c", "import sys; from trainer import io; io.download_dir(sys.argv[1], sys.argv[2])",
                 url, MODEL_MOUNT],
        env=pod.credential_env(spec),
        volume_mounts=[k8s.V1VolumeMount(name="model", mount_path=MODEL_MOUNT), *pod.common_mounts(spec)],
        security_context=pod.container_security_context(),
    )
    return MODEL_MOUNT, [fetch], [k8s.V1Volume(name="model", empty_dir=k8s.V1EmptyDirVolumeSource())]


def _probe(path: str, period: int, failures: int) -> k8s.V1Probe:
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port="http"),
                       period_seconds=period, failure_threshold=failures, timeout_seconds=5)


def server_command(spec: PipelineSpec, run: StageRun, model_path: str) -> list[str]:
    rollout = spec.stages.rlhf.rollout
    serve = (["python", "-m", "vllm.entrypoints.openai.api_server"] if weight_sync(run) == "storage"
             else ["trl", "vllm-serve"])
    args = [*serve, "--model", model_path, "--host", "0.0.0.0", "--port", str(rollout.port)]
    if rollout.gpus > 1:
        args += ["--tensor-parallel-size", str(rollout.gpus)]
    return [*args, *rollout.extra_args]


def deployment(spec: PipelineSpec, run: StageRun) -> k8s.V1Deployment:
    rollout = spec.stages.rlhf.rollout
    storage = weight_sync(run) == "storage"
    if not rollout.gpus and not storage:
        raise ConfigError("stages.rlhf.rollout.gpus is 0 (vLLM's CPU build) but the rlhf config's "
                          "rlhf_training.weight_sync is 'nccl', which moves weights GPU to GPU: use 'storage'")
    model_path, init_containers, model_volumes = _model(spec)
    # vLLM's route is `/health`; TRL's is `/health/` (a bare `/health` answers with a redirect).
    health = "/health" if storage else "/health/"
    ports = [k8s.V1ContainerPort(name="http", container_port=rollout.port)]
    if not storage:
        ports.append(k8s.V1ContainerPort(name="weight-sync", container_port=rollout.group_port))
    # storage: /collective_rpc (the weight reload) only exists in vLLM's dev mode.
    env = {"TTS_RUN": spec.name, **({"VLLM_SERVER_DEV_MODE": "1"} if storage else {}), **rollout.env}
    container = k8s.V1Container(
        name=CONTAINER,
        image=spec.images.rollout,
        image_pull_policy=spec.images.pull_policy,
        command=server_command(spec, run, model_path),
        working_dir=pod.working_dir(spec),
        env=pod.credential_env(spec) + pod.plain_env(env),
        ports=ports,
        resources=pod.resources(rollout.resources, rollout.gpus),
        volume_mounts=[*pod.common_mounts(spec),
                       *([k8s.V1VolumeMount(name="model", mount_path=MODEL_MOUNT, read_only=True)]
                         if model_volumes else [])],
        # Model load and CUDA graph capture take minutes: liveness only applies after startup succeeds.
        startup_probe=_probe(health, 10, max(1, rollout.startup_timeout_s // 10)),
        readiness_probe=_probe(health, 5, 3),
        liveness_probe=_probe(health, 10, 3),
        security_context=pod.container_security_context(),
    )
    return k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(spec, queue=True),
        spec=k8s.V1DeploymentSpec(
            # Exactly one engine: the trainer syncs one server (storage: it reloads the trainer's weights;
            # nccl: the weight-sync group binds one trainer to one server).
            replicas=1,
            # Recreate: a second pod would need a second GPU and would never be synced.
            strategy=k8s.V1DeploymentStrategy(type="Recreate"),
            selector=k8s.V1LabelSelector(match_labels=meta.selector_labels(spec, STAGE, CONTAINER)),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=meta.labels(spec, STAGE, CONTAINER),
                                          annotations=meta.pod_annotations(spec)),
                spec=pod.pod_spec(spec, [container], [*pod.common_volumes(spec), *model_volumes],
                                  init_containers=init_containers or None),
            ),
        ),
    )


def service(spec: PipelineSpec, run: StageRun) -> k8s.V1Service:
    rollout = spec.stages.rlhf.rollout
    ports = [k8s.V1ServicePort(name="http", port=rollout.port, target_port="http", protocol="TCP")]
    if weight_sync(run) == "nccl":
        ports.append(k8s.V1ServicePort(name="weight-sync", port=rollout.group_port, target_port="weight-sync",
                                       protocol="TCP"))
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(spec),
        spec=k8s.V1ServiceSpec(
            # Headless: the name resolves to the pod IP (nccl: where the TCPStore listens).
            cluster_ip="None",
            selector=meta.selector_labels(spec, STAGE, CONTAINER),
            ports=ports,
        ),
    )


def network_policy(spec: PipelineSpec, run: StageRun) -> k8s.V1NetworkPolicy:
    trainers = k8s.V1NetworkPolicyPeer(
        pod_selector=k8s.V1LabelSelector(match_labels=meta.selector_labels(spec, STAGE, "trainer")))
    # By source pods; storage: on the HTTP port only; nccl: on every port (NCCL picks ephemeral ports in
    # both directions).
    ports = ([k8s.V1NetworkPolicyPort(port="http", protocol="TCP")] if weight_sync(run) == "storage" else None)
    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=_metadata(spec),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels=meta.selector_labels(spec, STAGE, CONTAINER)),
            policy_types=["Ingress"],
            ingress=[k8s.V1NetworkPolicyIngressRule(_from=[trainers], ports=ports)],
        ),
    )


def _metadata(spec: PipelineSpec, queue: bool = False) -> k8s.V1ObjectMeta:
    labels = meta.labels(spec, STAGE, CONTAINER)
    if queue and spec.cluster.queue:
        labels[meta.QUEUE_LABEL] = spec.cluster.queue
    return k8s.V1ObjectMeta(name=meta.rollout_name(spec), namespace=spec.cluster.namespace, labels=labels,
                            annotations=meta.annotations(spec))
