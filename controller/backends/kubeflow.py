"""The `kubeflow` backend: each stage run is a PyTorchJob (kubeflow.org/v1) created with the
kubeflow-training SDK; the kubernetes client handles ConfigMaps, the RLHF rollout server, pods, logs
and events.

Completion is any condition Succeeded/Failed with status True (not the last condition). Submitting a
stage that already has a job attaches to it. The rollout server is owned by the RLHF job (garbage
collected with it), deleted by the controller when the job ends, and restarted whenever the trainer's
master pod restarts: a rollout server keeps a stale weight-sync group and would hang the new trainer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubeflow.training import TrainingClient
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from controller.backends.api_errors import ApiCaller, Conflict, NotFound
from controller.backends.base import Backend, BackendError, Phase, RunSummary, StageStatus
from controller.plan import StageRun
from controller.render import meta, stage_objects, to_dict
from controller.spec import PipelineSpec
from trainer.stages import STEP_ORDER, STEPS

POLL_S = 10.0
# Deleting a finished job before replacing it: its pods and ConfigMap go first (foreground deletion).
REPLACE_TIMEOUT_S = 120.0
RESTART_ANNOTATION = "speechlm.io/trainer-restart"
PYTORCHJOBS = "pytorchjobs.kubeflow.org"


def _error_line(log_tail: str) -> str:
    """The line that says what went wrong in a failed container's last log lines: the stage's own
    `error: ...` (trainer.cli), else the last line (torchrun's own report comes after the stage's)."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")


class KubeflowBackend(Backend):
    name = "kubeflow"

    def __init__(self, namespace: str, training_client: TrainingClient | None = None,
                 apps_api: k8s.AppsV1Api | None = None, networking_api: k8s.NetworkingV1Api | None = None,
                 caller: ApiCaller | None = None, poll_s: float = POLL_S, pending_timeout_s: float = 600.0,
                 notify: Callable[[str], None] = print):
        self.namespace = namespace
        if training_client is None:
            try:
                training_client = TrainingClient(namespace=namespace)
            except k8s_config.ConfigException as err:
                raise BackendError(f"no Kubernetes access: {err}. Set KUBECONFIG (or ~/.kube/config) or run "
                                   "in a pod with a service account") from None
        self.tc = training_client
        api_client = self.tc.custom_api.api_client
        self.core = self.tc.core_api
        self.apps = apps_api or k8s.AppsV1Api(api_client)
        self.net = networking_api or k8s.NetworkingV1Api(api_client)
        self.call = caller or ApiCaller(namespace)
        self.custom = self.tc.custom_api
        self.poll_s = poll_s
        self.pending_timeout_s = pending_timeout_s
        self.notify = notify
        self._accounts_checked: set[str] = set()

    # ------------------------------------------------------------------ submit
    def submit(self, spec: PipelineSpec, run: StageRun) -> StageStatus:
        self.pending_timeout_s = spec.cluster.pendingTimeoutSeconds
        name = meta.job_name(spec, run.name)
        replaced = ""
        try:
            job = self._get_job(name)
            previous = self._job_status(run.name, job)
            if not previous.phase.done:
                return self._attached(spec.name, run.name)
            # A finished job of the same run and stage is an earlier attempt: running the stage again
            # (`run --from`, `submit`) means a new job, not the old result.
            self._replace(job, previous)
            replaced = f"replaced the earlier {previous.phase.value} job"
        except NotFound:
            pass
        self._check_service_account(spec)
        objects = stage_objects(spec, run)
        config_map = to_dict(objects.config_map)
        self._apply_config_map(config_map)
        try:
            self.call("create", PYTORCHJOBS, self.tc.create_job, job=objects.job, namespace=self.namespace)
        except Conflict:
            return self._attached(spec.name, run.name)  # created concurrently by another submit
        owner = self._owner_reference(name)
        # Owned by the job: garbage collected with it (cancel, ttlSecondsAfterFinished).
        config_map["metadata"]["ownerReferences"] = [owner]
        self.call("update", "configmaps", self.core.replace_namespaced_config_map,
                  config_map["metadata"]["name"], self.namespace, config_map)
        for obj in objects.rollout:
            body = to_dict(obj)
            body["metadata"]["ownerReferences"] = [owner]
            self._replace_or_create(body)
        return StageStatus(run.name, Phase.PENDING, replaced or "Created", f"PyTorchJob {self.namespace}/{name}")

    def _replace(self, job: Any, previous: StageStatus) -> None:
        """Delete a finished job and wait until it and what it owns (pods, ConfigMap) are gone."""
        name = job.metadata.name
        self.notify(f"{previous.stage}: replacing the {previous.phase.value} PyTorchJob {self.namespace}/{name}")
        with contextlib.suppress(NotFound):
            self.call("delete", PYTORCHJOBS, self.custom.delete_namespaced_custom_object, "kubeflow.org", "v1",
                      self.namespace, "pytorchjobs", name, propagation_policy="Foreground")
        deadline = time.time() + REPLACE_TIMEOUT_S
        while time.time() < deadline:
            try:
                self._get_job(name)
            except NotFound:
                return
            time.sleep(min(self.poll_s, 1.0))
        raise BackendError(f"the finished PyTorchJob {self.namespace}/{name} was not deleted within "
                           f"{REPLACE_TIMEOUT_S:.0f}s (is the garbage collector running?); delete it with "
                           f"kubectl -n {self.namespace} delete pytorchjob {name}, then retry")

    def _check_service_account(self, spec: PipelineSpec) -> None:
        """Pods of a missing ServiceAccount are never created: the job would wait forever. Say so first."""
        account = spec.cluster.serviceAccount
        if not account or account in self._accounts_checked:
            return
        try:
            self.call("get", "serviceaccounts", self.core.read_namespaced_service_account, account, self.namespace)
        except NotFound:
            raise BackendError(
                f"serviceaccount {account!r} not found in namespace {self.namespace!r}: install the chart "
                f"(helm install ... charts/tts-training -n {self.namespace}; its ServiceAccount is "
                f"{account!r} by default) or set cluster.serviceAccount to an existing one") from None
        self._accounts_checked.add(account)

    def _attached(self, run_name: str, stage: str) -> StageStatus:
        status = self.status(run_name, stage)
        status.reason = f"attached to existing job ({status.reason or status.phase.value})"
        return status

    def _apply_config_map(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        try:
            self.call("create", "configmaps", self.core.create_namespaced_config_map, self.namespace, body)
        except Conflict:
            self.call("update", "configmaps", self.core.replace_namespaced_config_map, name, self.namespace, body)

    def _owner_reference(self, job_name: str) -> dict[str, Any]:
        job = self._get_job(job_name)
        return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": job_name,
                "uid": job.metadata.uid, "controller": False, "blockOwnerDeletion": False}

    def _replace_or_create(self, body: dict[str, Any]) -> None:
        """A rollout object left from an earlier attempt is stale (its owner is gone): replace it."""
        kind, name = body["kind"], body["metadata"]["name"]
        create, delete, resource = {
            "Deployment": (self.apps.create_namespaced_deployment, self.apps.delete_namespaced_deployment,
                           "deployments.apps"),
            "Service": (self.core.create_namespaced_service, self.core.delete_namespaced_service, "services"),
            "NetworkPolicy": (self.net.create_namespaced_network_policy,
                              self.net.delete_namespaced_network_policy, "networkpolicies.networking.k8s.io"),
        }[kind]
        try:
            self.call("create", resource, create, self.namespace, body)
        except Conflict:
            self.call("delete", resource, delete, name, self.namespace)
            self.call("create", resource, create, self.namespace, body)

    # ------------------------------------------------------------------ status
    def _get_job(self, name: str) -> Any:
        return self.call("get", PYTORCHJOBS, self.tc.get_job, name, namespace=self.namespace)

    def status(self, run_name: str, stage: str) -> StageStatus:
        name = f"{run_name}-{stage}"
        try:
            job = self._get_job(name)
        except NotFound:
            return StageStatus(stage, Phase.PENDING, "NotSubmitted", f"no PyTorchJob {self.namespace}/{name}")
        return self._job_status(stage, job)

    def _job_status(self, stage: str, job: Any) -> StageStatus:
        st = job.status
        conditions = {c.type: c for c in (st.conditions or []) if c.status == "True"} if st else {}
        started = st.start_time.timestamp() if st and st.start_time else None
        finished = st.completion_time.timestamp() if st and st.completion_time else None
        created = job.metadata.creation_timestamp
        for kind, phase in (("Failed", Phase.FAILED), ("Succeeded", Phase.SUCCEEDED)):
            if kind in conditions:
                c = conditions[kind]
                message = c.message or ""
                if phase is Phase.FAILED:
                    message = "; ".join(filter(None, [message, self._exited_pods(job.metadata.name)]))
                return StageStatus(stage, phase, c.reason or kind, message, started, finished)
        for kind in ("Restarting", "Running"):
            if kind in conditions:
                c = conditions[kind]
                return StageStatus(stage, Phase.RUNNING, c.reason or kind, c.message or "", started)
        reason = "Suspended" if "Suspended" in conditions else "Created" if "Created" in conditions else "Submitted"
        message = "waiting for Kueue admission" if reason == "Suspended" else ""
        waiting_s = time.time() - created.timestamp() if created else 0.0
        # The spec's cluster.pendingTimeoutSeconds travels on the job, so `status`/`wait` honour it too.
        annotated = (job.metadata.annotations or {}).get(meta.PENDING_TIMEOUT_ANNOTATION)
        timeout = float(annotated) if annotated and annotated.isdigit() else self.pending_timeout_s
        if waiting_s > timeout:
            events = self.pod_events(job.metadata.name)
            message = f"pending for {waiting_s / 60:.0f} min" + (f"; {events}" if events else "")
        return StageStatus(stage, Phase.PENDING, reason, message, created.timestamp() if created else None)

    def _exited_pods(self, job_name: str) -> str:
        """Why the job's pods failed: each non-zero exit with the container's termination message (its
        last log lines, FallbackToLogsOnError), so `ttsctl status` says what went wrong, not only that."""
        try:
            pods = self.call("list", "pods", self.tc.get_job_pods, job_name, namespace=self.namespace,
                             is_master=False)
        except (NotFound, BackendError):
            return ""
        notes = []
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            for cs in pod.status.container_statuses or [] if pod.status else []:
                ended = cs.state.terminated if cs.state else None
                if ended and ended.exit_code:
                    notes.append(f"pod {pod.metadata.name} exited with {ended.exit_code}: "
                                 f"{_error_line(ended.message or '') or ended.reason or ''}".rstrip(": "))
        return "; ".join(notes)

    def pod_events(self, job_name: str) -> str:
        """Warning events of the job and its pods, e.g. `FailedScheduling: ... Insufficient nvidia.com/gpu`."""
        pods = self.call("list", "pods", self.tc.get_job_pods, job_name, namespace=self.namespace)
        names = {job_name, *(p.metadata.name for p in pods)}
        events = self.call("list", "events", self.core.list_namespaced_event, self.namespace)
        seen = []
        for event in events.items:
            if event.involved_object.name in names and event.type == "Warning":
                line = f"{event.involved_object.name}: {event.reason}: {event.message}"
                if line not in seen:
                    seen.append(line)
        return "; ".join(seen)

    def run_status(self, run_name: str) -> RunSummary:
        jobs = [j for j in self._managed_jobs() if (j.metadata.labels or {}).get(meta.RUN_LABEL) == run_name]
        if not jobs:
            raise BackendError(f"no PyTorchJobs of run {run_name!r} in namespace {self.namespace}")
        by_stage = {j.metadata.labels[meta.STAGE_LABEL]: j for j in jobs}
        stages = [self._job_status(s, by_stage[s]) for s in STEP_ORDER if s in by_stage]
        return RunSummary(run_name, self.name, stages)

    def _managed_jobs(self) -> list[Any]:
        jobs = self.call("list", PYTORCHJOBS, self.tc.list_jobs, namespace=self.namespace)
        return [j for j in jobs if (j.metadata.labels or {}).get(meta.MANAGED_BY_LABEL) == meta.MANAGED_BY]

    def list_runs(self) -> list[RunSummary]:
        runs = sorted({j.metadata.labels[meta.RUN_LABEL] for j in self._managed_jobs()
                       if meta.RUN_LABEL in j.metadata.labels})
        return [self.run_status(run) for run in runs]

    # ------------------------------------------------------------------ wait
    def wait(self, run_name: str, stage: str, notify: Callable[[str], None] = print) -> StageStatus:
        job_name = f"{run_name}-{stage}"
        with_server = STEPS[stage].stage.needs_rollout_server
        reported_pending = False
        master = None
        restarts = 0
        while True:
            try:
                status = self._job_status(stage, self._get_job(job_name))
            except NotFound:
                if with_server:
                    self._delete_rollout(run_name)
                return StageStatus(stage, Phase.FAILED, "Deleted",
                                   f"PyTorchJob {self.namespace}/{job_name} no longer exists (cancelled, or removed "
                                   f"by ttlSecondsAfterFinished before its end was seen)")
            if status.phase is Phase.PENDING and status.message and not reported_pending:
                notify(status.message)
                reported_pending = True
            if with_server:
                current = self._master_incarnation(job_name)
                if master is not None and current is not None and current != master and not status.phase.done:
                    restarts += 1
                    self._restart_rollout(run_name, restarts)
                    notify(f"trainer restarted: restarting the rollout server (#{restarts})")
                master = current if current is not None else master
            if status.phase.done:
                if with_server:
                    self._delete_rollout(run_name)
                return status
            time.sleep(self.poll_s)

    def _master_incarnation(self, job_name: str) -> tuple[str, int] | None:
        pods = self.call("list", "pods", self.tc.get_job_pods, job_name, namespace=self.namespace,
                         is_master=True)
        for pod in pods:
            restarts = sum(cs.restart_count for cs in (pod.status.container_statuses or []))
            return pod.metadata.uid, restarts
        return None

    def _restart_rollout(self, run_name: str, generation: int) -> None:
        # Same effect as `kubectl rollout restart`: a new pod, a fresh weight-sync group.
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: str(generation)}}}}}
        self.call("patch", "deployments.apps", self.apps.patch_namespaced_deployment,
                  f"{run_name}-rollout", self.namespace, patch)

    def _delete_rollout(self, run_name: str) -> None:
        name = f"{run_name}-rollout"
        for verb_fn, resource in ((self.apps.delete_namespaced_deployment, "deployments.apps"),
                                  (self.core.delete_namespaced_service, "services"),
                                  (self.net.delete_namespaced_network_policy, "networkpolicies.networking.k8s.io")):
            with contextlib.suppress(NotFound):
                self.call("delete", resource, verb_fn, name, self.namespace)

    # ------------------------------------------------------------------ logs / cancel
    def logs(self, run_name: str, stage: str, follow: bool = False, workers: bool = False) -> Iterator[str]:
        job_name = f"{run_name}-{stage}"
        pods = self.call("list", "pods", self.tc.get_job_pods, job_name, namespace=self.namespace,
                         is_master=not workers)
        if not pods:
            status = self.status(run_name, stage)
            raise BackendError(f"no pods for {job_name} yet ({status.describe()})")
        unscheduled = [p.metadata.name for p in pods if not p.spec.node_name]
        if unscheduled:
            events = self.pod_events(job_name)
            raise BackendError(f"{', '.join(unscheduled)}: Pending, not scheduled on a node yet, so no log: "
                               f"{events or 'no scheduler events yet'}")
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            prefix = f"[{pod.metadata.name}] " if workers else ""
            if follow:
                stream = self.call("get", "pods/log", self.core.read_namespaced_pod_log, pod.metadata.name,
                                   self.namespace, container="pytorch", follow=True, _preload_content=False)
                for raw in stream.stream():
                    for line in raw.decode(errors="replace").splitlines(keepends=True):
                        yield prefix + line
            else:
                text = self.call("get", "pods/log", self.core.read_namespaced_pod_log, pod.metadata.name,
                                 self.namespace, container="pytorch")
                for line in text.splitlines(keepends=True):
                    yield prefix + line

    def failure_hint(self, run_name: str, stage: str, lines: int = 20) -> str:
        job_name = f"{run_name}-{stage}"
        hint = [f"logs: ttsctl logs {run_name} --stage {stage} --backend kubeflow --namespace {self.namespace} "
                f"(kubectl -n {self.namespace} logs -l training.kubeflow.org/job-name={job_name})"]
        try:
            tail = list(self.logs(run_name, stage))[-lines:]
            hint += [f"  | {line.rstrip()}" for line in tail]
        except (BackendError, NotFound):
            events = self.pod_events(job_name)
            if events:
                hint.append(f"events: {events}")
        return "\n".join(hint)

    def cancel(self, run_name: str) -> list[str]:
        """Delete every job of the run (their pods, ConfigMaps and rollout server go with them)."""
        done = []
        for job in self._managed_jobs():
            labels = job.metadata.labels or {}
            if labels.get(meta.RUN_LABEL) != run_name:
                continue
            stage = labels.get(meta.STAGE_LABEL, job.metadata.name)
            phase = self._job_status(stage, job).phase
            with contextlib.suppress(NotFound):
                self.call("delete", PYTORCHJOBS, self.tc.delete_job, job.metadata.name, namespace=self.namespace)
            done.append(f"deleted {stage} ({phase.value})" if phase.done else f"stopped {stage} ({phase.value})")
        self._delete_rollout(run_name)
        return done


def poll_seconds() -> float:
    """$TTSCTL_POLL_SECONDS: how often the kubeflow backend polls job status (default 10 s)."""
    value = os.environ.get("TTSCTL_POLL_SECONDS")
    try:
        return float(value) if value else POLL_S
    except ValueError:
        raise BackendError(f"TTSCTL_POLL_SECONDS={value!r} is not a number of seconds") from None
