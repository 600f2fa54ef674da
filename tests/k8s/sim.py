"""Stand-ins for what the test control plane lacks: the Kubeflow training operator, the scheduler and a
kubelet. Everything goes through the real API server, as the real components would:

- PyTorchJobs: conditions Created -> Running -> Succeeded/Failed (status subresource), one pod per
  replica (owned by the job, labelled as the operator labels them), `ttlSecondsAfterFinished` honoured.
  A pod the API server refuses (missing ServiceAccount, missing PriorityClass, ...) becomes a
  FailedCreate Warning event on the job and is retried, as the operator does.
- Scheduling: pods are bound to the node `sim-node`, or, for a job told to stay Pending, left unbound
  with a FailedScheduling event.
- Kubelet: an HTTPS endpoint on 127.0.0.1 registered as the node's kubelet port, serving
  `/containerLogs/...` (with follow), so `kubectl logs` / `ttsctl logs` go through the API server. It
  finishes the graceful deletion of bound pods, and runs `helm test` pods: their command runs here as
  the pod's ServiceAccount (its token, the API server as "in-cluster"), and their exit code sets the phase.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import os
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import NODE, Cluster, free_port
from kubernetes import client
from kubernetes.client.exceptions import ApiException

JOB_NAME = "training.kubeflow.org/job-name"
ROLE = "training.kubeflow.org/job-role"
REPLICA_TYPE = "training.kubeflow.org/replica-type"
REPLICA_INDEX = "training.kubeflow.org/replica-index"
TICK_S = 0.2


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class JobState:
    phase: str = "new"  # new -> created -> scheduled -> done
    since: float = field(default_factory=time.time)
    pods: list[tuple[str, str]] = field(default_factory=list)  # (replica type, pod name)
    created: set[str] = field(default_factory=set)
    restarted: bool = False
    warned: set[str] = field(default_factory=set)


class Sim:
    """Outcomes are set per job name before the job is created: `outcome[name] = "Failed"`; the default
    is Succeeded. "Pending" never schedules; "Hold" runs until `release(name)`; "Restart" replaces the
    master pod once while running, then succeeds."""

    def __init__(self, cluster: Cluster, run_s: float = 0.6):
        self.cluster = cluster
        self.run_s = run_s
        api = cluster.api_client()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.outcome: dict[str, str] = {}
        self.released: set[str] = set()
        self.log_lines: dict[str, int] = {}  # job name -> extra log lines per pod
        self.jobs: dict[str, JobState] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.finished_pods: set[tuple[str, str]] = set()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tests_started: set[str] = set()
        self.kubelet = _Kubelet(self)
        self._thread = threading.Thread(target=self._loop, name="sim", daemon=True)

    def start(self) -> Sim:
        self.kubelet.start()
        self._register_node()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.kubelet.stop()

    def release(self, job_name: str) -> None:
        self.released.add(job_name)

    def _register_node(self) -> None:
        self.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=NODE)))
        self.core.patch_node_status(NODE, {"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet.port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "sim",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        }})

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.custom.list_cluster_custom_object("kubeflow.org", "v1", "pytorchjobs")["items"]
                steps = [lambda job=job: self._step(job) for job in jobs]
            except Exception as err:
                steps = []
                self._record(err)
            for step in [*steps, self._kubelet_pass]:
                try:
                    step()
                except Exception as err:  # keep simulating; the tests read `errors` when something hangs
                    self._record(err)
            time.sleep(TICK_S)

    def _record(self, err: Exception) -> None:
        detail = f"{err.status} {_message(err)}" if isinstance(err, ApiException) else repr(err)
        self.errors.append(f"{detail} at {traceback.format_exc().splitlines()[-3].strip()}")

    def _step(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        state = self.jobs.setdefault(meta["uid"], JobState())
        name, ns = meta["name"], meta["namespace"]
        outcome = self.outcome.get(name, "Succeeded")
        if state.phase == "new":
            self._set_conditions(job, [("Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created.")])
            state.phase = "created"
        if state.phase == "created" and self._create_pods(job, state):
            state.phase = "pending" if outcome == "Pending" else "scheduling"
        if state.phase == "pending":
            for _rtype, pod in state.pods:
                self._event(ns, "Pod", pod, "FailedScheduling",
                            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.", state)
            return
        if state.phase == "scheduling":
            for _rtype, pod in state.pods:
                self._bind_and_run(ns, pod)
            self._set_conditions(job, [("Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created."),
                                       ("Running", "True", "PyTorchJobRunning", f"PyTorchJob {name} is running.")],
                                 start=True)
            state.phase, state.since = "running", time.time()
        if state.phase == "running":
            if outcome == "Hold" and name not in self.released:
                return
            if time.time() - state.since < self.run_s:
                return
            if outcome == "Restart" and not state.restarted:
                # The master container died and the operator recreated its pod (a new incarnation).
                state.restarted = True
                master = next(pod for rtype, pod in state.pods if rtype == "Master")
                self.core.delete_namespaced_pod(master, ns, grace_period_seconds=0)
                state.created.discard(master)
                state.phase = "created"
                return
            failed = outcome == "Failed"
            for _rtype, pod in state.pods:
                self._finish_pod(ns, pod, failed)
            final = ("Failed", "True", "PyTorchJobFailed", f"PyTorchJob {name} is failed because 1 Master "
                     "replica(s) failed.") if failed else \
                ("Succeeded", "True", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed.")
            self._set_conditions(job, [("Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created."),
                                       ("Running", "False", "PyTorchJobRunning", f"PyTorchJob {name} ended."),
                                       final], complete=True)
            state.phase, state.since = "done", time.time()
        if state.phase == "done":
            ttl = job["spec"].get("runPolicy", {}).get("ttlSecondsAfterFinished")
            if ttl is not None and time.time() - state.since >= ttl:
                with contextlib.suppress(ApiException):
                    self.custom.delete_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", name,
                                                                propagation_policy="Background")

    def _set_conditions(self, job: dict[str, Any], conditions: list[tuple[str, str, str, str]],
                        start: bool = False, complete: bool = False) -> None:
        status: dict[str, Any] = {"conditions": [
            {"type": t, "status": s, "reason": r, "message": m, "lastUpdateTime": now(),
             "lastTransitionTime": now()} for t, s, r, m in conditions],
            "replicaStatuses": {}}
        if start:
            status["startTime"] = now()
        if complete:
            status["completionTime"] = now()
        meta = job["metadata"]
        self.custom.patch_namespaced_custom_object_status("kubeflow.org", "v1", meta["namespace"], "pytorchjobs",
                                                          meta["name"], {"status": status})

    def _create_pods(self, job: dict[str, Any], state: JobState) -> bool:
        meta = job["metadata"]
        name, ns = meta["name"], meta["namespace"]
        wanted = []
        for rtype, replica in sorted(job["spec"]["pytorchReplicaSpecs"].items()):
            for index in range(replica.get("replicas", 1)):
                wanted.append((rtype, index, replica["template"]))
        state.pods = [(rtype, f"{name}-{rtype.lower()}-{index}") for rtype, index, _ in wanted]
        ok = True
        for (rtype, index, template), (_, pod_name) in zip(wanted, state.pods, strict=True):
            if pod_name in state.created:
                continue
            labels = {**template.get("metadata", {}).get("labels", {}), JOB_NAME: name,
                      REPLICA_TYPE: rtype.lower(), REPLICA_INDEX: str(index),
                      "training.kubeflow.org/operator-name": "pytorchjob-controller"}
            if rtype == "Master":
                labels[ROLE] = "master"
            spec = dict(template["spec"])
            spec["restartPolicy"] = "Never"  # the operator itself handles ExitCode
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": pod_name, "namespace": ns, "labels": labels,
                "annotations": template.get("metadata", {}).get("annotations", {}),
                "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": name,
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
                "spec": spec}
            try:
                self.core.create_namespaced_pod(ns, body)
            except ApiException as err:
                ok = False
                if err.status == 409:  # a replaced job's pod, still being garbage collected
                    continue
                self._event(ns, "PyTorchJob", name, "FailedCreatePod", f"Error creating: {_message(err)}", state,
                            api_version="kubeflow.org/v1", uid=meta["uid"])
                continue
            state.created.add(pod_name)
            stage = labels.get("speechlm.io/stage", name)
            extra = [f"{stage}: log line {i}\n" for i in range(self.log_lines.get(name, 0))]
            self.logs[(ns, pod_name)] = [f"{stage}: starting on {pod_name}\n", *extra]
            self.finished_pods.discard((ns, pod_name))
        return ok

    def _event(self, ns: str, kind: str, name: str, reason: str, message: str, state: JobState,
               api_version: str = "v1", uid: str | None = None) -> None:
        key = f"{kind}/{name}/{reason}/{message}"
        if key in state.warned:
            return
        state.warned.add(key)
        self.core.create_namespaced_event(ns, client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}."),
            involved_object=client.V1ObjectReference(kind=kind, name=name, namespace=ns, api_version=api_version,
                                                     uid=uid),
            reason=reason, message=message, type="Warning", count=1,
            first_timestamp=dt.datetime.now(dt.timezone.utc), last_timestamp=dt.datetime.now(dt.timezone.utc),
            source=client.V1EventSource(component="sim")))

    def _bind_and_run(self, ns: str, pod: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.create_namespaced_pod_binding(pod, ns, client.V1Binding(
                metadata=client.V1ObjectMeta(name=pod),
                target=client.V1ObjectReference(api_version="v1", kind="Node", name=NODE)), _preload_content=False)
        container = self.core.read_namespaced_pod(pod, ns).spec.containers[0].name
        self.core.patch_namespaced_pod_status(pod, ns, {"status": {
            "phase": "Running", "startTime": now(), "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": container, "ready": True, "restartCount": 0, "image": "sim",
                                   "imageID": "sim", "state": {"running": {"startedAt": now()}}}]}})
        self._log(ns, pod, "step 1: loss=2.31\n")

    def _finish_pod(self, ns: str, pod: str, failed: bool) -> None:
        code = 1 if failed else 0
        self._log(ns, pod, "RuntimeError: simulated stage failure\n" if failed else "done\n")
        container = self.core.read_namespaced_pod(pod, ns).spec.containers[0].name
        self.core.patch_namespaced_pod_status(pod, ns, {"status": {
            "phase": "Failed" if failed else "Succeeded",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": container, "ready": False, "restartCount": 0, "image": "sim",
                                   "imageID": "sim", "state": {"terminated": {
                                       "exitCode": code, "reason": "Error" if failed else "Completed",
                                       "startedAt": now(), "finishedAt": now()}}}]}})
        self.finished_pods.add((ns, pod))

    def _log(self, ns: str, pod: str, line: str) -> None:
        with self._lock:
            self.logs.setdefault((ns, pod), []).append(line)

    # ------------------------------------------------------------------ kubelet duties
    def _kubelet_pass(self) -> None:
        for pod in self.core.list_pod_for_all_namespaces().items:
            meta = pod.metadata
            if meta.deletion_timestamp and pod.spec.node_name == NODE:
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
                continue
            hook = (meta.annotations or {}).get("helm.sh/hook")
            if hook == "test" and meta.uid not in self._tests_started:
                self._tests_started.add(meta.uid)
                threading.Thread(target=self._run_test_pod, args=(pod,), daemon=True).start()

    def _run_test_pod(self, pod: Any) -> None:
        ns, name = pod.metadata.namespace, pod.metadata.name
        try:
            self._bind_and_run(ns, name)
            container = pod.spec.containers[0]
            workdir = self.cluster.dir / f"pod-{ns}-{name}"
            workdir.mkdir(exist_ok=True)
            token = self._service_account_token(ns, pod.spec.service_account_name or "default")
            (workdir / "token").write_text(token)
            # The script's load_incluster_config() reads these module paths and env vars.
            prelude = ("import kubernetes.config.incluster_config as _ic; "
                       f"_ic.SERVICE_TOKEN_FILENAME = {str(workdir / 'token')!r}; "
                       f"_ic.SERVICE_CERT_FILENAME = {str(self.cluster.pki / 'ca.crt')!r}\n")
            command = list(container.command or []) + list(container.args or [])
            assert command[:2] == ["python", "-c"], f"test pod command not understood: {command}"
            env = {**os.environ, **{e.name: e.value for e in container.env or [] if e.value is not None},
                   "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.cluster.port)}
            result = subprocess.run([sys.executable, "-c", prelude + command[2]], env=env, capture_output=True,
                                    text=True, timeout=120)
            self._log(ns, name, result.stdout + result.stderr)
            self._finish_pod(ns, name, result.returncode != 0)
        except Exception as err:
            self.errors.append(f"test pod {ns}/{name}: {err!r}")
            with contextlib.suppress(Exception):
                self._finish_pod(ns, name, True)

    def _service_account_token(self, ns: str, name: str) -> str:
        deadline = time.time() + 30
        while time.time() < deadline:
            sa = self.core.read_namespaced_service_account(name, ns)
            for ref in sa.secrets or []:
                secret = self.core.read_namespaced_secret(ref.name, ns)
                if secret.type == "kubernetes.io/service-account-token" and secret.data:
                    return base64.b64decode(secret.data["token"]).decode()
            time.sleep(0.3)
        raise RuntimeError(f"no token for ServiceAccount {ns}/{name}")


def _message(err: ApiException) -> str:
    import json

    try:
        return json.loads(err.body).get("message", "")
    except (TypeError, ValueError):
        return str(err.reason)


class _Kubelet:
    """HTTPS `/containerLogs/<ns>/<pod>/<container>[?follow=true]` for the API server's log proxy."""

    def __init__(self, sim: Sim):
        self.sim = sim
        self.port = free_port()
        sim_ref = sim

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                key = (parts[1], parts[2])
                follow = urllib.parse.parse_qs(url.query).get("follow") == ["true"]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                sent = 0
                while True:
                    lines = list(sim_ref.logs.get(key, []))
                    for line in lines[sent:]:
                        self.wfile.write(line.encode())
                    self.wfile.flush()
                    sent = len(lines)
                    if not follow or (key in sim_ref.finished_pods and sent == len(sim_ref.logs.get(key, []))):
                        return
                    time.sleep(0.1)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        pki: Path = sim.cluster.pki
        ctx.load_cert_chain(pki / "serving.crt", pki / "serving.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="kubelet", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
