"""A stage run -> a kubeflow.org/v1 PyTorchJob (built from the kubeflow-training SDK models)."""

from __future__ import annotations

from kubeflow.training import models as kf
from kubernetes import client as k8s

from controller.plan import StageRun
from controller.render import meta, pod
from controller.render.config_map import rollout_address, weight_sync
from controller.spec import PipelineSpec

CONTAINER = "pytorch"  # the operator finds the training container by this name
SHUTDOWN_MARGIN_S = 10


def nproc_per_node(run: StageRun) -> str:
    # The operator multiplies WORLD_SIZE by this only when it is an integer string; CPU stages run 1.
    return str(run.settings.gpus_per_node or 1) if run.step.stage.launch == "torchrun" else "1"


def command(run: StageRun) -> list[str]:
    # torchrun reads PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_* that the operator
    # injects, so the same command serves 1 or N nodes; trainer.torchrun is torchrun whose exit code tells
    # a stopped stage (128+, retried) from a failed one (1-127, final), for the ExitCode policy below.
    return ["python", "-m", "trainer.torchrun", "-m", "trainer", run.trainer_stage,
            "--config", f"{meta.CONFIG_MOUNT}/{run.config_file}"]


def trainer_env(spec: PipelineSpec, run: StageRun) -> list[k8s.V1EnvVar]:
    timeout = str(spec.cluster.processGroupTimeoutSeconds)
    env = {
        "TTS_RUN": spec.name,
        "TTS_STAGE": run.name,
        # A hung collective becomes a crash (and a restart from the last checkpoint), not a stuck job.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": timeout,
    }
    if run.step.stage.needs_rollout_server:
        host, port, group_port = rollout_address(spec)
        env |= {"TTS_VLLM_HOST": host, "TTS_VLLM_PORT": str(port)}
        if weight_sync(run) == "nccl":
            env["TTS_VLLM_GROUP_PORT"] = str(group_port)
    # torchrun SIGKILLs its workers this long after forwarding SIGTERM (default 30 s): give them the pod's
    # grace period, less a little for torchrun's own exit.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout(spec))
    env |= run.settings.env
    return pod.credential_env(spec) + pod.plain_env(env)


def shutdown_timeout(spec: PipelineSpec) -> int:
    grace = spec.cluster.terminationGracePeriodSeconds
    return max(0, grace - min(SHUTDOWN_MARGIN_S, grace // 10))


def _template(spec: PipelineSpec, run: StageRun) -> k8s.V1PodTemplateSpec:
    metrics_port = run.config.metrics.port
    container = k8s.V1Container(
        name=CONTAINER,
        image=run.settings.image or spec.images.trainer,
        image_pull_policy=spec.images.pull_policy,
        command=command(run),
        working_dir=pod.working_dir(spec),
        env=trainer_env(spec, run),
        ports=[k8s.V1ContainerPort(name="metrics", container_port=metrics_port)] if metrics_port else None,
        resources=pod.resources(run.settings.resources, run.settings.gpus_per_node),
        volume_mounts=[
            k8s.V1VolumeMount(name="config", mount_path=meta.CONFIG_MOUNT, read_only=True),
            *pod.common_mounts(spec),
        ],
        security_context=pod.container_security_context(),
        # A failed container's last log lines become its termination message: `ttsctl status` shows them.
        termination_message_policy="FallbackToLogsOnError",
    )
    volumes = [
        k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(
            name=meta.config_map_name(spec, run.name))),
        *pod.common_volumes(spec),
    ]
    pod_spec = pod.pod_spec(spec, [container], volumes)
    pod_spec.termination_grace_period_seconds = spec.cluster.terminationGracePeriodSeconds
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=meta.labels(spec, run.name, "trainer"),
                                  annotations=meta.pod_annotations(spec)),
        spec=pod_spec,
    )


def pytorch_job(spec: PipelineSpec, run: StageRun) -> kf.KubeflowOrgV1PyTorchJob:
    cluster = spec.cluster
    job_labels = meta.labels(spec, run.name, "trainer")
    if cluster.queue:
        job_labels[meta.QUEUE_LABEL] = cluster.queue

    def replica(count: int) -> kf.KubeflowOrgV1ReplicaSpec:
        # ExitCode: codes 1-127 (a bug, bad data) fail at once; 128+ (SIGKILL/OOM, SIGTERM on preemption, a
        # peer pod deleted: trainer.torchrun) are retried, and the stage resumes from its latest checkpoint.
        return kf.KubeflowOrgV1ReplicaSpec(replicas=count, restart_policy="ExitCode",
                                           template=_template(spec, run))

    replicas = {"Master": replica(1)}
    if run.settings.nodes > 1:
        replicas["Worker"] = replica(run.settings.nodes - 1)
    return kf.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(
            name=meta.job_name(spec, run.name),
            namespace=cluster.namespace,
            labels=job_labels,
            annotations=meta.job_annotations(spec),
        ),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=nproc_per_node(run),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                # Running: reap workers still up once the master is done, keep finished pods for logs.
                clean_pod_policy="Running",
                backoff_limit=cluster.backoffLimit,
                ttl_seconds_after_finished=cluster.ttlSecondsAfterFinished,
                active_deadline_seconds=run.settings.active_deadline_seconds or cluster.activeDeadlineSeconds,
                scheduling_policy=(kf.KubeflowOrgV1SchedulingPolicy(priority_class=cluster.priorityClass)
                                   if cluster.priorityClass else None),
            ),
        ),
    )
