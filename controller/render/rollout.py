"""The RLHF stage's vLLM rollout server: a Deployment, a headless Service and a NetworkPolicy.

TRL server mode (`trl vllm-serve`, TRL 0.21): HTTP on `port` for generation, and a weight-sync group
whose TCPStore listens on `group_port` in the server pod; NCCL then runs pod to pod on ephemeral ports.
Only the trainer pods of the same run may connect: the weight-sync group lets a client overwrite the
served weights.
"""

from __future__ import annotations

from kubernetes import client as k8s

from controller.plan import layout_of
from controller.render import meta, pod
from controller.spec import PipelineSpec
from trainer import io
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


def _probe(period: int, failures: int) -> k8s.V1Probe:
    # TRL's route is `/health/` (a bare `/health` answers with a redirect).
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/health/", port="http"),
                       period_seconds=period, failure_threshold=failures, timeout_seconds=5)


def deployment(spec: PipelineSpec) -> k8s.V1Deployment:
    rollout = spec.stages.rlhf.rollout
    model_path, init_containers, model_volumes = _model(spec)
    args = ["trl", "vllm-serve", "--model", model_path, "--host", "0.0.0.0", "--port", str(rollout.port)]
    if rollout.gpus > 1:
        args += ["--tensor-parallel-size", str(rollout.gpus)]
    container = k8s.V1Container(
        name=CONTAINER,
        image=spec.images.rollout,
        image_pull_policy=spec.images.pull_policy,
        command=[*args, *rollout.extra_args],
        working_dir=pod.working_dir(spec),
        env=pod.credential_env(spec) + pod.plain_env({"TTS_RUN": spec.name, **rollout.env}),
        ports=[k8s.V1ContainerPort(name="http", container_port=rollout.port),
               k8s.V1ContainerPort(name="weight-sync", container_port=rollout.group_port)],
        resources=pod.resources(rollout.resources, rollout.gpus),
        volume_mounts=[*pod.common_mounts(spec),
                       *([k8s.V1VolumeMount(name="model", mount_path=MODEL_MOUNT, read_only=True)]
                         if model_volumes else [])],
        # Model load and CUDA graph capture take minutes: liveness only applies after startup succeeds.
        startup_probe=_probe(10, max(1, rollout.startup_timeout_s // 10)),
        readiness_probe=_probe(5, 3),
        liveness_probe=_probe(10, 3),
        security_context=pod.container_security_context(),
    )
    return k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(spec, queue=True),
        spec=k8s.V1DeploymentSpec(
            # Exactly one engine: the weight-sync group binds one trainer to one server.
            replicas=1,
            # Recreate: a second pod would need a second GPU and would never join the group.
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


def service(spec: PipelineSpec) -> k8s.V1Service:
    rollout = spec.stages.rlhf.rollout
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(spec),
        spec=k8s.V1ServiceSpec(
            # Headless: the name resolves to the pod IP, where the NCCL TCPStore listens.
            cluster_ip="None",
            selector=meta.selector_labels(spec, STAGE, CONTAINER),
            ports=[
                k8s.V1ServicePort(name="http", port=rollout.port, target_port="http", protocol="TCP"),
                k8s.V1ServicePort(name="weight-sync", port=rollout.group_port, target_port="weight-sync",
                                  protocol="TCP"),
            ],
        ),
    )


def network_policy(spec: PipelineSpec) -> k8s.V1NetworkPolicy:
    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=_metadata(spec),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels=meta.selector_labels(spec, STAGE, CONTAINER)),
            policy_types=["Ingress"],
            # By source pods, on every port: NCCL picks ephemeral ports in both directions.
            ingress=[k8s.V1NetworkPolicyIngressRule(_from=[k8s.V1NetworkPolicyPeer(
                pod_selector=k8s.V1LabelSelector(match_labels=meta.selector_labels(spec, STAGE, "trainer")),
            )])],
        ),
    )


def _metadata(spec: PipelineSpec, queue: bool = False) -> k8s.V1ObjectMeta:
    labels = meta.labels(spec, STAGE, CONTAINER)
    if queue and spec.cluster.queue:
        labels[meta.QUEUE_LABEL] = spec.cluster.queue
    return k8s.V1ObjectMeta(name=meta.rollout_name(spec), namespace=spec.cluster.namespace, labels=labels,
                            annotations=meta.annotations(spec))
