"""PyTorchJob operator stand-in for the real-node suite: what the Kubeflow training operator v1 does for a
kubeflow.org/v1 PyTorchJob, read from its source at tag v1.9.0 (commit 6f74c7f6b2ed; paths below are in
that tree). The real operator cannot be built offline (its Go dependencies are not packaged); everything
after the objects it creates (scheduling, pods, restarts of containers, logs, DNS) is the real node's.

Mirrored (Master + Worker replicas, no elastic policy, no gang scheduling):
- defaults (pytorch_defaults.go): replicas 1, restartPolicy OnFailure, cleanPodPolicy None,
  nprocPerNode "auto", port `pytorchjob-port`/23456 on the `pytorch` container;
- one pod per replica index, named `<job>-<type>-<index>` (common/util.go GenGeneralName), labels
  operator-name/job-name/replica-type/replica-index (+ job-role=master on the master), owned by the job
  (controller, blockOwnerDeletion); pod restartPolicy from the replica's (ExitCode -> Never, core/pod.go);
- one headless Service per pod, same name, selector = those labels without job-role (common/service.go);
- env appended to every container (pytorch/envvar.go): PYTHONUNBUFFERED, MASTER_PORT, PET_MASTER_PORT,
  MASTER_ADDR (= the master pod/Service name), PET_MASTER_ADDR, WORLD_SIZE (replicas x nprocPerNode when
  an integer), RANK, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_NNODES;
- the worker's `init-pytorch` container waiting for the master's name (pytorch/initcontainer.go); its
  image is the operator's --pytorch-init-container-image flag (default alpine:3.10): `init_image` here;
- a Failed pod (common/pod.go ReconcilePods): ExitedWithCode event; ExitCode policy with code >= 128,
  OnFailure or Always -> the pod is deleted and recreated under the same name (Restarting); ExitCode with
  1-127 -> the job fails (no completionTime, as in v1.9.0); Never -> the job fails (UpdateJobStatus);
- backoffLimit (restarts of Running pods' containers), activeDeadlineSeconds: fail, delete all pods and
  their Services; conditions Created/Running/Restarting/Succeeded/Failed with the operator's reasons and
  messages (pkg/util/status.go setCondition rules); the job succeeds when its master succeeds;
- after the job finishes: cleanPodPolicy (None/Running/All, with each deleted pod's Service), then
  ttlSecondsAfterFinished deletes the job.
"""

from __future__ import annotations

import copy
import datetime as dt
import secrets
import threading
import time
import traceback
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

RELEASE = "v1.9.0"
OPERATOR_NAME = "pytorchjob-controller"
GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
L_OPERATOR = "training.kubeflow.org/operator-name"
L_JOB = "training.kubeflow.org/job-name"
L_TYPE = "training.kubeflow.org/replica-type"
L_INDEX = "training.kubeflow.org/replica-index"
L_ROLE = "training.kubeflow.org/job-role"
CONTAINER = "pytorch"
PORT_NAME, DEFAULT_PORT = "pytorchjob-port", 23456
DEFAULT_INIT_IMAGE = "alpine:3.10"
TICK_S = 0.5


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def init_container(job: str, image: str) -> dict[str, Any]:
    """pytorch/initcontainer.go's default template, rendered."""
    wait = (f"err=1;for i in $(seq 100); do if nslookup {job}-master-0; then err=0 && break; fi;"
            "echo waiting for master; sleep 2; done; exit $err")
    return {"name": "init-pytorch", "image": image, "imagePullPolicy": "IfNotPresent",
            "resources": {"limits": {"cpu": "100m", "memory": "20Mi"}, "requests": {"cpu": "50m", "memory": "10Mi"}},
            "command": ["sh", "-c", wait]}


class Operator:
    def __init__(self, api_client: Any, init_image: str = DEFAULT_INIT_IMAGE):
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.init_image = init_image
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._seen_exits: set[tuple[str, int]] = set()  # (pod uid, restart) already reported
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pytorchjob-operator")

    def start(self) -> Operator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for job in self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]:
                    self.reconcile(job)
            except ApiException as err:
                if err.status not in (404, 409):
                    self.errors.append(f"{err.status} {err.reason}")
            except Exception:  # a stand-in bug must fail the suite, not hang it
                self.errors.append(traceback.format_exc())
            self._stop.wait(TICK_S)

    # ------------------------------------------------------------------ helpers
    def event(self, job: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = job["metadata"]
        self.core.create_namespaced_event(meta["namespace"], {
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": now(), "lastTimestamp": now(), "source": {"component": OPERATOR_NAME}})

    def _owner(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": job["metadata"]["name"],
                 "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]

    @staticmethod
    def specs(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Replica specs with the operator's defaults applied (pytorch_defaults.go)."""
        out = {}
        for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
            spec = copy.deepcopy(spec)
            spec.setdefault("replicas", 1)
            spec.setdefault("restartPolicy", "OnFailure")
            containers = spec["template"]["spec"]["containers"]
            target = next((c for c in containers if c["name"] == CONTAINER), containers[0])
            ports = target.setdefault("ports", [])
            if not any(p.get("name") == PORT_NAME for p in ports):
                ports.append({"name": PORT_NAME, "containerPort": DEFAULT_PORT})
            out[rtype] = spec
        return out

    @staticmethod
    def labels(job_name: str, rtype: str, index: int) -> dict[str, str]:
        return {L_OPERATOR: OPERATOR_NAME, L_JOB: job_name, L_TYPE: rtype.lower(), L_INDEX: str(index)}

    def env(self, job: dict[str, Any], specs: dict[str, dict[str, Any]], rtype: str, index: int) -> list[dict]:
        name = job["metadata"]["name"]
        nproc = str(job["spec"].get("nprocPerNode") or "auto")
        nnodes = sum(s["replicas"] for s in specs.values())
        env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
        if "Master" in specs:
            master = next(c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == CONTAINER)
            port = str(next(p["containerPort"] for p in master["ports"] if p.get("name") == PORT_NAME))
            rank = index if rtype == "Master" else index + 1
            world = nnodes * (int(nproc) if nproc.isdigit() else 1)
            env += [{"name": "MASTER_PORT", "value": port}, {"name": "PET_MASTER_PORT", "value": port},
                    {"name": "MASTER_ADDR", "value": f"{name}-master-0"},
                    {"name": "PET_MASTER_ADDR", "value": f"{name}-master-0"},
                    {"name": "WORLD_SIZE", "value": str(world)}, {"name": "RANK", "value": str(rank)},
                    {"name": "PET_NODE_RANK", "value": str(rank)}]
        env += [{"name": "PET_NPROC_PER_NODE", "value": nproc}, {"name": "PET_NNODES", "value": str(nnodes)}]
        return env

    # ------------------------------------------------------------------ reconcile
    def reconcile(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        ns, name = meta["namespace"], meta["name"]
        status = copy.deepcopy(job.get("status") or {})
        conditions = status.setdefault("conditions", [])
        if not conditions:
            self._set(conditions, "Created", f"{KIND} {name} is created.")
        specs = self.specs(job)
        selector = f"{L_JOB}={name},{L_OPERATOR}={OPERATOR_NAME}"
        pods = {p.metadata.name: p for p in self.core.list_namespaced_pod(ns, label_selector=selector).items}
        services = {s.metadata.name for s in self.core.list_namespaced_service(ns, label_selector=selector).items}
        finished = self._true(conditions, "Succeeded") or self._true(conditions, "Failed")
        if finished:
            self._after_finish(job, specs, pods, status)
            return
        run_policy = job["spec"].get("runPolicy") or {}
        status.setdefault("startTime", now())
        failure = self._past_limits(job, run_policy, pods, status)
        if failure:
            for pod_name in pods:
                self._delete_pod(job, pod_name, service=True)
            status["completionTime"] = now()
            self.event(job, "Normal", f"{KIND}Failed", failure)
            self._set(conditions, "Failed", failure)
            self._write_status(ns, name, status)
            return
        for rtype, spec in specs.items():
            self._reconcile_replicas(job, specs, rtype, spec, pods, services, conditions)
        self._update_status(job, specs, pods, status)
        self._write_status(ns, name, status)

    def _reconcile_replicas(self, job: dict[str, Any], specs: dict[str, Any], rtype: str, spec: dict[str, Any],
                            pods: dict[str, Any], services: set[str], conditions: list[dict]) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        for index in range(spec["replicas"]):
            pod_name = f"{name}-{rtype.lower()}-{index}"
            pod = pods.get(pod_name)
            if pod is None:
                self._create_pod(job, specs, rtype, index, pod_name)
            elif pod.status.phase == "Failed" and not pod.metadata.deletion_timestamp:
                code = self._exit_code(pod)
                key = (pod.metadata.uid, code)
                if key not in self._seen_exits:
                    self._seen_exits.add(key)
                    self.event(job, "Normal", "ExitedWithCode", f"Pod: {ns}.{pod_name} exited with code {code}")
                policy = spec["restartPolicy"]
                if policy in ("OnFailure", "Always") or (policy == "ExitCode" and code >= 128):
                    self._delete_pod(job, pod_name, service=False, event=False)
                    message = f"job {name} is restarting because {rtype} replica(s) failed."
                    if self._set(conditions, "Restarting", message):
                        self.event(job, "Warning", f"{KIND}Restarting", message)
                elif policy == "ExitCode":
                    message = f'job "{name}" is failing because "{rtype}" replica(s) failed.'
                    self.event(job, "Warning", f"{KIND}Failed", message)
                    self._set(conditions, "Failed", message)
            if pod_name not in services:
                self._create_service(job, specs, rtype, index, pod_name)

    def _create_pod(self, job: dict[str, Any], specs: dict[str, Any], rtype: str, index: int, pod_name: str) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        template = copy.deepcopy(specs[rtype]["template"])
        labels = {**(template.get("metadata") or {}).get("labels", {}), **self.labels(name, rtype, index)}
        if rtype == "Master":
            labels[L_ROLE] = "master"
        pod_spec = template["spec"]
        if pod_spec.get("restartPolicy"):
            self.event(job, "Warning", "SetPodTemplateRestartPolicy",
                       "Restart policy in pod template will be overwritten by restart policy in replica spec")
        policy = specs[rtype]["restartPolicy"]
        pod_spec["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        extra = self.env(job, specs, rtype, index)
        for container in pod_spec["containers"]:
            container["env"] = list(container.get("env") or []) + extra
        if rtype == "Worker" and "Master" in specs:
            pod_spec["initContainers"] = [init_container(name, self.init_image), *pod_spec.get("initContainers", [])]
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                             "annotations": (template.get("metadata") or {}).get("annotations") or {},
                             "ownerReferences": self._owner(job)},
                "spec": pod_spec}
        try:
            self.core.create_namespaced_pod(ns, body)
        except ApiException as err:
            if err.status == 409:
                return
            self.event(job, "Warning", "FailedCreatePod", f"Error creating: {err.reason}: {err.body}")
            return
        self.event(job, "Normal", "SuccessfulCreatePod", f"Created pod: {pod_name}")

    def _create_service(self, job: dict[str, Any], specs: dict[str, Any], rtype: str, index: int,
                        svc_name: str) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        container = next(c for c in specs[rtype]["template"]["spec"]["containers"] if c["name"] == CONTAINER)
        labels = self.labels(name, rtype, index)
        body = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": svc_name, "namespace": ns, "labels": labels,
                             "ownerReferences": self._owner(job)},
                "spec": {"clusterIP": "None", "selector": labels,
                         "ports": [{"name": p["name"], "port": p["containerPort"]}
                                   for p in container.get("ports", []) if p.get("name")]}}
        try:
            self.core.create_namespaced_service(ns, body)
        except ApiException as err:
            if err.status != 409:
                self.event(job, "Warning", "FailedCreateService", f"Error creating: {err.reason}")
            return
        self.event(job, "Normal", "SuccessfulCreateService", f"Created service: {svc_name}")

    def _delete_pod(self, job: dict[str, Any], pod_name: str, service: bool, event: bool = True) -> None:
        """Delete a pod and, with `service`, its Service of the same name (each with its event)."""
        kinds = [("Pod", self.core.delete_namespaced_pod)]
        if service:
            kinds.append(("Service", self.core.delete_namespaced_service))
        for kind, delete in kinds:
            try:
                delete(pod_name, job["metadata"]["namespace"])
                if event:
                    self.event(job, "Normal", f"SuccessfulDelete{kind}", f"Deleted {kind.lower()}: {pod_name}")
            except ApiException as err:
                if err.status != 404:
                    self.event(job, "Warning", f"FailedDelete{kind}", f"Error deleting: {err.reason}")

    @staticmethod
    def _exit_code(pod: Any) -> int:
        for cs in pod.status.container_statuses or []:
            if cs.name == CONTAINER and cs.state and cs.state.terminated:
                return cs.state.terminated.exit_code
        return 0xBEEF  # the operator's "no terminated state" value

    def _past_limits(self, job: dict[str, Any], run_policy: dict[str, Any], pods: dict[str, Any],
                     status: dict[str, Any]) -> str:
        name = job["metadata"]["name"]
        limit = run_policy.get("backoffLimit")
        if limit is not None:
            restarts = sum(cs.restart_count for p in pods.values() if p.status.phase == "Running"
                           for cs in (p.status.container_statuses or []) + (p.status.init_container_statuses or []))
            if restarts >= limit and (limit > 0 or restarts > 0):
                return f"Job {name} has failed because it has reached the specified backoff limit"
        deadline = run_policy.get("activeDeadlineSeconds")
        if deadline is not None and time.time() - parse_time(status["startTime"]) >= deadline:
            return f"Job {name} has failed because it was active longer than specified deadline"
        return ""

    def _update_status(self, job: dict[str, Any], specs: dict[str, Any], pods: dict[str, Any],
                       status: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        conditions = status["conditions"]
        replica_statuses = {}
        for rtype, spec in specs.items():
            counts = {"active": 0, "succeeded": 0, "failed": 0}
            for pod in pods.values():
                if pod.metadata.labels.get(L_TYPE) != rtype.lower():
                    continue
                phase, deleting = pod.status.phase, bool(pod.metadata.deletion_timestamp)
                if phase == "Running":
                    counts["failed" if deleting else "active"] += 1
                elif phase == "Succeeded":
                    counts["succeeded"] += 1
                elif phase == "Failed":
                    counts["failed"] += 1
            replica_statuses[rtype] = {
                # Zero counts are omitted (omitempty); null removes a stale one from the merge patch.
                **{k: v or None for k, v in counts.items()},
                "selector": f"{L_JOB}={name},{L_OPERATOR}={OPERATOR_NAME},{L_TYPE}={rtype.lower()}"}
            if self._true(conditions, "Failed"):
                continue
            if rtype == "Master":
                if counts["active"] > 0:
                    self._set(conditions, "Running", f"{KIND} {name} is running.")
                if counts["succeeded"] == spec["replicas"]:
                    message = f"{KIND} {name} is successfully completed."
                    status["completionTime"] = now()
                    self.event(job, "Normal", f"{KIND}Succeeded", message)
                    self._set(conditions, "Succeeded", message)
            if counts["failed"] > 0 and spec["replicas"] > counts["succeeded"] + counts["active"]:
                if spec["restartPolicy"] != "Never":
                    message = f"{KIND} {name} is restarting because {counts['failed']} {rtype} replica(s) failed."
                    if self._set(conditions, "Restarting", message):
                        self.event(job, "Warning", f"{KIND}Restarting", message)
                else:
                    message = f"{KIND} {name} is failed because {counts['failed']} {rtype} replica(s) failed."
                    status["completionTime"] = now()
                    self.event(job, "Normal", f"{KIND}Failed", message)
                    self._set(conditions, "Failed", message)
        status["replicaStatuses"] = replica_statuses

    def _after_finish(self, job: dict[str, Any], specs: dict[str, Any], pods: dict[str, Any],
                      status: dict[str, Any]) -> None:
        policy = (job["spec"].get("runPolicy") or {}).get("cleanPodPolicy") or "None"
        for pod_name, pod in pods.items():
            if pod.metadata.deletion_timestamp:
                continue
            if policy == "All" or (policy == "Running" and pod.status.phase in ("Running", "Pending")):
                self._delete_pod(job, pod_name, service=True)
        ttl = (job["spec"].get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        done = status.get("completionTime")
        if ttl is not None and done and time.time() >= parse_time(done) + ttl:
            meta = job["metadata"]
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
            self.event(job, "Normal", "SuccessfulDeletePod", f"Deleted job: {meta['name']}")

    def _write_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": status})

    # ------------------------------------------------------------------ conditions (pkg/util/status.go)
    @staticmethod
    def _true(conditions: list[dict], ctype: str) -> bool:
        return any(c["type"] == ctype and c["status"] == "True" for c in conditions)

    def _set(self, conditions: list[dict], ctype: str, message: str) -> bool:
        """Set a condition as setCondition does; True when it changed. The operator reconciles on watch
        events and records its Restarting event on each; this loop polls, so it records one per change."""
        if self._true(conditions, "Failed"):
            return False
        reason = f"{KIND}{ctype}"
        current = next((c for c in conditions if c["type"] == ctype), None)
        if current and current["status"] == "True" and current["reason"] == reason:
            return False
        stamp = now()
        kept = []
        for c in conditions:
            if c["type"] == ctype or (ctype, c["type"]) in (("Running", "Restarting"), ("Restarting", "Running")):
                continue
            if ctype in ("Succeeded", "Failed") and c["type"] == "Running" and c["status"] == "True":
                c = {**c, "status": "False", "lastTransitionTime": stamp, "lastUpdateTime": stamp}
            kept.append(c)
        kept.append({"type": ctype, "status": "True", "reason": reason, "message": message,
                     "lastUpdateTime": stamp, "lastTransitionTime": stamp})
        conditions[:] = kept
        return True
