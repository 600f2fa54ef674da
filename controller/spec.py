"""The pipeline spec: one YAML file naming a run, its storage, images, stages and cluster settings.

Keys are snake_case except in `cluster`, whose keys mirror the Kubernetes fields they fill
(`serviceAccount`, `nodeSelector`, `priorityClass`, ...). Every model forbids unknown keys, so a typo
fails `ttsctl validate` with its key path before anything is submitted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from trainer.config import format_validation_error
from trainer.errors import ConfigError

# Derived object names are `<run>-<stage>-<suffix>` and PyTorchJob pods add `-worker-<i>`: keeping the
# run name short keeps every name under the 63-character DNS label limit.
MAX_RUN_NAME = 30
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Storage(Model):
    """Where stage data lives: local paths (relative to the working directory) or fsspec URLs."""

    data: str
    checkpoints: str
    outputs: str


class Images(Model):
    trainer: str = "ghcr.io/speechlm/tts-trainer:0.1.0-cu128"
    rollout: str = "ghcr.io/speechlm/tts-rollout:0.1.0"
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Resources(Model):
    """Kubernetes requests/limits; the GPU count comes from `gpus_per_node`, never from here."""

    requests: dict[str, str] = {}
    limits: dict[str, str] = {}

    @model_validator(mode="after")
    def _no_gpu(self) -> Resources:
        for section in (self.requests, self.limits):
            if "nvidia.com/gpu" in section:
                raise ValueError("set GPUs with gpus_per_node (or rollout.gpus), not in resources")
        return self


class StageSpec(Model):
    enabled: bool = True
    # Trainer config: a file path (relative to the spec file) or an inline mapping.
    config: str | dict[str, Any] | None = None
    # `key.path=value` overrides applied after the config is loaded (as `tts-train --set`).
    overrides: list[str] = []
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    resources: Resources = Resources()
    env: dict[str, str] = {}
    image: str | None = None
    # Kubernetes only: the job fails after running this long (None: cluster default).
    active_deadline_seconds: int | None = Field(None, gt=0)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return env


class CodecStageSpec(StageSpec):
    enabled: bool = False
    # Skip the stage when a complete codec already sits at <checkpoints>/codec/final.
    skip_if_exists: bool = True


class RolloutSpec(Model):
    """The vLLM rollout server of the RLHF stage (Kubernetes only): vLLM's own server for the `storage`
    weight sync, TRL 0.x's `trl vllm-serve` for `nccl` (group_port: its NCCL group). `gpus: 0` runs vLLM's
    CPU build (images/rollout-cpu; `storage` weight sync only), e.g. on a laptop's kind cluster."""

    gpus: int = Field(1, ge=0)
    resources: Resources = Resources()
    port: int = Field(8000, gt=0, le=65535)
    group_port: int = Field(51216, gt=0, le=65535)
    # Model download + load + CUDA graph capture must fit in this budget before liveness applies.
    startup_timeout_s: int = Field(1800, ge=60)
    extra_args: list[str] = []
    env: dict[str, str] = {}

    @model_validator(mode="after")
    def _ports(self) -> RolloutSpec:
        if self.port == self.group_port:
            raise ValueError("port and group_port must differ")
        return self


class RlhfStageSpec(StageSpec):
    rollout: RolloutSpec = RolloutSpec()


class Stages(Model):
    codec: CodecStageSpec = CodecStageSpec()
    vectorize: StageSpec
    merge: StageSpec
    sft: StageSpec
    # Settings shared by the export runs (export-sft, export-rlhf); they run when their source runs.
    export: StageSpec = StageSpec()
    rlhf: RlhfStageSpec
    eval: StageSpec


class SecretRef(Model):
    name: str
    key: str


class Secrets(Model):
    """Credentials by reference only: the controller never reads or copies secret values."""

    wandb: SecretRef | None = None  # -> env WANDB_API_KEY
    gcs: SecretRef | None = None  # service-account JSON -> GOOGLE_APPLICATION_CREDENTIALS


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Workspace(Model):
    """A PVC mounted as every pod's working directory, so relative storage paths resolve on it."""

    claimName: str
    mountPath: str = "/workspace"


class Cluster(Model):
    namespace: str = "default"
    # The chart's ServiceAccount (charts/tts-training serviceAccount.name) has the same default.
    serviceAccount: str | None = "tts-trainer"
    # Kueue LocalQueue: adds the `kueue.x-k8s.io/queue-name` label.
    queue: str | None = None
    priorityClass: str | None = None
    nodeSelector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    imagePullSecrets: list[str] = []
    secrets: Secrets = Secrets()
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    workspace: Workspace | None = None
    backoffLimit: int = Field(3, ge=0)
    ttlSecondsAfterFinished: int = Field(86400, ge=0)
    activeDeadlineSeconds: int | None = Field(None, gt=0)
    shmSize: str = "16Gi"
    # torch.distributed / NCCL collective timeout; a dead rank fails the job after this long.
    processGroupTimeoutSeconds: int = Field(1800, gt=0)
    # A job Pending longer than this gets its pod events reported (FailedScheduling, ...).
    pendingTimeoutSeconds: int = Field(600, gt=0)
    # Trainer pods: SIGTERM (preemption, cancel, drain) -> finish the current step, save a checkpoint,
    # exit; SIGKILL after this long. Budget for a 1B model: a step (up to ~1 min at long sequence
    # lengths) + a full checkpoint (~15 GB of weights and Adam state: ~30 s on a local SSD/PVC, ~2-3 min
    # to an object store at ~100 MB/s) + margin. Kubernetes' own default, 30 s, loses the save.
    terminationGracePeriodSeconds: int = Field(300, ge=0)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if len(value) > 63 or not _DNS_1123.match(value):
            raise ValueError(f"{value!r} is not a valid namespace (lowercase DNS label)")
        return value


class PipelineSpec(Model):
    name: str
    storage: Storage
    images: Images = Images()
    # Codec used when the codec stage is disabled (overrides the stage configs' own setting).
    codec_model_path: str | None = None
    stages: Stages
    cluster: Cluster = Cluster()
    # Directory of the spec file: stage config paths are relative to it (set by `load_spec`).
    _base_dir: Path = PrivateAttr(default=Path("."))

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > MAX_RUN_NAME or not _DNS_1035.match(value):
            raise ValueError(
                f"{value!r} is not a valid run name: lowercase letters, digits and '-', starting with a "
                f"letter, at most {MAX_RUN_NAME} characters"
            )
        return value


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec; errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}:\n{format_validation_error(err)}") from None
    spec._base_dir = path.resolve().parent
    return spec
