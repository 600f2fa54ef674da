"""Pod pieces every trainer and rollout pod shares: placement, security, volumes, credentials."""

from __future__ import annotations

from kubernetes import client as k8s

from controller.spec import PipelineSpec, Resources

GPU = "nvidia.com/gpu"
GCS_MOUNT = "/var/secrets/gcs"
# The images run as this uid/gid (non-root); fsGroup makes mounted volumes writable for it.
RUN_AS = 1000


def pod_security_context() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS,
        run_as_group=RUN_AS,
        fs_group=RUN_AS,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def container_security_context() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        privileged=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
    )


def resources(spec_resources: Resources, gpus: int) -> k8s.V1ResourceRequirements:
    gpu = {GPU: str(gpus)} if gpus else {}
    requests = {**dict(sorted(spec_resources.requests.items())), **gpu}
    limits = {**dict(sorted(spec_resources.limits.items())), **gpu}
    return k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None)


def shm_volume(spec: PipelineSpec) -> k8s.V1Volume:
    # The container default /dev/shm is 64 MB: DataLoader workers and NCCL's SHM transport need more.
    return k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                          size_limit=spec.cluster.shmSize))


def common_volumes(spec: PipelineSpec) -> list[k8s.V1Volume]:
    volumes = [shm_volume(spec)]
    if spec.cluster.secrets.gcs:
        volumes.append(k8s.V1Volume(
            name="gcs-credentials",
            secret=k8s.V1SecretVolumeSource(secret_name=spec.cluster.secrets.gcs.name),
        ))
    if spec.cluster.workspace:
        volumes.append(k8s.V1Volume(
            name="workspace",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=spec.cluster.workspace.claimName),
        ))
    return volumes


def common_mounts(spec: PipelineSpec) -> list[k8s.V1VolumeMount]:
    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    if spec.cluster.secrets.gcs:
        mounts.append(k8s.V1VolumeMount(name="gcs-credentials", mount_path=GCS_MOUNT, read_only=True))
    if spec.cluster.workspace:
        mounts.append(k8s.V1VolumeMount(name="workspace", mount_path=spec.cluster.workspace.mountPath))
    return mounts


def working_dir(spec: PipelineSpec) -> str | None:
    return spec.cluster.workspace.mountPath if spec.cluster.workspace else None


def credential_env(spec: PipelineSpec) -> list[k8s.V1EnvVar]:
    """Secrets by reference only: their values never pass through the controller."""
    env = []
    secrets = spec.cluster.secrets
    if secrets.wandb:
        env.append(k8s.V1EnvVar(name="WANDB_API_KEY", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=secrets.wandb.name, key=secrets.wandb.key))))
    if secrets.gcs:
        env.append(k8s.V1EnvVar(name="GOOGLE_APPLICATION_CREDENTIALS", value=f"{GCS_MOUNT}/{secrets.gcs.key}"))
    return env


def plain_env(values: dict[str, str]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=name, value=str(value)) for name, value in sorted(values.items())]


def pod_spec(spec: PipelineSpec, containers: list[k8s.V1Container], volumes: list[k8s.V1Volume],
             init_containers: list[k8s.V1Container] | None = None) -> k8s.V1PodSpec:
    cluster = spec.cluster
    return k8s.V1PodSpec(
        containers=containers,
        init_containers=init_containers,
        volumes=volumes,
        service_account_name=cluster.serviceAccount,
        priority_class_name=cluster.priorityClass,
        node_selector=dict(sorted(cluster.nodeSelector.items())) or None,
        tolerations=[k8s.V1Toleration(
            key=t.key, operator=t.operator, value=t.value, effect=t.effect,
            toleration_seconds=t.tolerationSeconds) for t in cluster.tolerations] or None,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in cluster.imagePullSecrets] or None,
        security_context=pod_security_context(),
        # Service links put every Service of the namespace into env (VLLM_PORT clash); nothing uses them.
        enable_service_links=False,
    )
