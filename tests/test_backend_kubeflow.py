"""The `kubeflow` backend against a patched CustomObjectsApi / CoreV1Api (no cluster): submit, attach,
status transitions, completion, the RLHF rollout server's life cycle, and each API failure mode."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from unittest.mock import Mock

import kubernetes
import pytest
from controller_fixtures import object_errors, spec_dict, write_spec
from kubeflow.training import TrainingClient
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controller import cli
from controller.backends import BackendError, Phase
from controller.backends.api_errors import ApiCaller
from controller.backends.kubeflow import RESTART_ANNOTATION, KubeflowBackend
from controller.plan import build_plan
from controller.render import to_dict
from controller.spec import load_spec

NS = "tts"


def api_error(status: int, message: str = "") -> ApiException:
    err = ApiException(status=status, reason="x")
    err.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return err


class FakeCluster:
    """PyTorchJobs kept as dicts, as the API server would; failures injected per call."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.pods: list[k8s.V1Pod] = []
        self.events: list[k8s.CoreV1Event] = []
        self.fail: dict[str, list[BaseException]] = {}  # method -> errors raised by its next calls
        self.on_get = None  # hook run on every job get (drives status transitions)
        self.custom = Mock()
        self.custom.create_namespaced_custom_object.side_effect = self.create
        self.custom.get_namespaced_custom_object.side_effect = self.get
        self.custom.list_namespaced_custom_object.side_effect = self.list
        self.custom.delete_namespaced_custom_object.side_effect = self.delete
        self.core = Mock()
        self.core.list_namespaced_pod.side_effect = lambda ns, label_selector, async_req: Mock(
            get=lambda timeout: k8s.V1PodList(items=[
                p for p in self.pods if p.metadata.labels["training.kubeflow.org/job-name"] in label_selector]))
        self.core.list_namespaced_event.side_effect = lambda ns: k8s.CoreV1EventList(items=self.events)
        self.apps = Mock()
        self.net = Mock()

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def create(self, group, version, namespace, plural, body):
        self._maybe_fail("create")
        assert (group, version, namespace, plural) == ("kubeflow.org", "v1", NS, "pytorchjobs")
        job = to_dict(body)
        name = job["metadata"]["name"]
        if name in self.jobs:
            raise api_error(409, f'pytorchjobs.kubeflow.org "{name}" already exists')
        job["metadata"] |= {"uid": f"uid-{name}", "creationTimestamp": now_iso()}
        self.jobs[name] = job
        return job

    def get(self, group, version, namespace, plural, name, async_req=False):
        self._maybe_fail("get")
        if self.on_get:
            self.on_get(self)
        if name not in self.jobs:
            raise api_error(404, f'pytorchjobs.kubeflow.org "{name}" not found')
        return Mock(get=lambda timeout: self.jobs[name])

    def list(self, group, version, namespace, plural, async_req=False):
        self._maybe_fail("list")
        return Mock(get=lambda timeout: {"items": list(self.jobs.values())})

    def delete(self, group, version, namespace, plural, name, body=None):
        self.jobs.pop(name)

    def set_conditions(self, name: str, *conditions: tuple[str, str]) -> None:
        self.jobs[name]["status"] = {
            "conditions": [{"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": f"job is {t.lower()}"}
                           for t, s in conditions],
            "startTime": now_iso(),
        }


def now_iso(minutes_ago: float = 0) -> str:
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def master_pod(job: str, uid: str = "pod-1", restarts: int = 0) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=f"{job}-master-0", uid=uid,
                                  labels={"training.kubeflow.org/job-name": job}),
        status=k8s.V1PodStatus(container_statuses=[k8s.V1ContainerStatus(
            name="pytorch", restart_count=restarts, image="x", image_id="x", ready=True)]),
    )


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def backend(cluster, sleeps) -> KubeflowBackend:
    tc = TrainingClient(client_configuration=kubernetes.client.Configuration(), namespace=NS)
    tc.custom_api = cluster.custom
    tc.core_api = cluster.core
    return KubeflowBackend(NS, training_client=tc, apps_api=cluster.apps, networking_api=cluster.net,
                           caller=ApiCaller(NS, sleep=sleeps.append), poll_s=0)


@pytest.fixture
def spec(tmp_path: Path):
    return load_spec(write_spec(tmp_path, spec_dict(tmp_path)))


def stage(spec, name: str):
    (run,) = build_plan(spec, [name])
    return run


def test_submit_creates_config_and_job_then_attaches(backend, cluster, spec):
    status = backend.submit(spec, stage(spec, "sft"))
    assert status.phase is Phase.PENDING
    job = cluster.jobs["t1-sft"]
    assert object_errors(job) == []
    ((ns, body), _) = cluster.core.create_namespaced_config_map.call_args
    assert ns == NS and body["metadata"]["name"] == "t1-sft-config" and "sft.json" in body["data"]
    # Same run + stage again: attach, no second job.
    again = backend.submit(spec, stage(spec, "sft"))
    assert "attached" in again.reason
    assert cluster.custom.create_namespaced_custom_object.call_count == 1


def test_conflict_on_create_attaches(backend, cluster, spec):
    cluster.fail["create"] = [api_error(409, "already exists")]
    cluster.core.create_namespaced_config_map.side_effect = api_error(409, "exists")
    status = backend.submit(spec, stage(spec, "merge"))
    assert "attached" in status.reason
    # The existing ConfigMap was replaced with the current config.
    assert cluster.core.replace_namespaced_config_map.call_args.args[0] == "t1-merge-config"


def test_status_transitions_and_completion(backend, cluster, spec):
    backend.submit(spec, stage(spec, "sft"))
    assert backend.status("t1", "sft").reason == "Submitted"
    cluster.set_conditions("t1-sft", ("Created", "True"))
    assert backend.status("t1", "sft").phase is Phase.PENDING
    cluster.set_conditions("t1-sft", ("Created", "True"), ("Running", "True"))
    assert backend.status("t1", "sft").phase is Phase.RUNNING
    cluster.set_conditions("t1-sft", ("Created", "True"), ("Restarting", "True"))
    assert backend.status("t1", "sft").reason == "PyTorchJobRestarting"
    # Completion is any Succeeded/Failed condition with status True, wherever it sits in the list.
    cluster.set_conditions("t1-sft", ("Succeeded", "True"), ("Running", "False"))
    assert backend.status("t1", "sft").phase is Phase.SUCCEEDED
    cluster.set_conditions("t1-sft", ("Created", "True"), ("Failed", "True"), ("Running", "False"))
    failed = backend.status("t1", "sft")
    assert failed.phase is Phase.FAILED and failed.reason == "PyTorchJobFailed"
    assert backend.status("t1", "eval").reason == "NotSubmitted"
    summary = backend.run_status("t1")
    assert [s.stage for s in summary.stages] == ["sft"] and summary.phase is Phase.FAILED


def test_wait_polls_until_done(backend, cluster, spec):
    backend.submit(spec, stage(spec, "merge"))
    gets = []

    def advance(c: FakeCluster) -> None:
        gets.append(1)
        if len(gets) == 2:
            c.set_conditions("t1-merge", ("Running", "True"))
        if len(gets) == 4:
            c.set_conditions("t1-merge", ("Running", "False"), ("Succeeded", "True"))

    cluster.on_get = advance
    assert backend.wait("t1", "merge").phase is Phase.SUCCEEDED
    assert len(gets) == 4


def test_rlhf_rollout_owned_restarted_and_cleaned_up(backend, cluster, spec):
    backend.submit(spec, stage(spec, "rlhf"))
    created = {call.args[1]["kind"]: call.args[1] for call in [
        cluster.apps.create_namespaced_deployment.call_args, cluster.core.create_namespaced_service.call_args,
        cluster.net.create_namespaced_network_policy.call_args]}
    for obj in created.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "PyTorchJob" and owner["uid"] == "uid-t1-rlhf"
        assert object_errors(obj) == []
    cluster.pods = [master_pod("t1-rlhf")]
    cluster.set_conditions("t1-rlhf", ("Running", "True"))
    gets = []

    def trainer_restarts(c: FakeCluster) -> None:
        gets.append(1)
        if len(gets) == 3:  # the master pod was replaced: a new incarnation
            c.pods = [master_pod("t1-rlhf", uid="pod-2")]
        if len(gets) == 5:
            c.set_conditions("t1-rlhf", ("Succeeded", "True"))

    cluster.on_get = trainer_restarts
    notices = []
    assert backend.wait("t1", "rlhf", notify=notices.append).phase is Phase.SUCCEEDED
    (patch,) = cluster.apps.patch_namespaced_deployment.call_args_list
    assert patch.args[0] == "t1-rollout"
    assert patch.args[2]["spec"]["template"]["metadata"]["annotations"][RESTART_ANNOTATION] == "1"
    assert any("restarting the rollout server" in n for n in notices)
    cluster.apps.delete_namespaced_deployment.assert_called_once_with("t1-rollout", NS)
    cluster.core.delete_namespaced_service.assert_called_once_with("t1-rollout", NS)
    cluster.net.delete_namespaced_network_policy.assert_called_once_with("t1-rollout", NS)


def test_stale_rollout_is_replaced(backend, cluster, spec):
    cluster.apps.create_namespaced_deployment.side_effect = [api_error(409, "exists"), None]
    backend.submit(spec, stage(spec, "rlhf"))
    cluster.apps.delete_namespaced_deployment.assert_called_once_with("t1-rollout", NS)
    assert cluster.apps.create_namespaced_deployment.call_count == 2


def test_operator_not_installed(backend, cluster, spec):
    cluster.fail["get"] = [api_error(404, "the server could not find the requested resource")]
    with pytest.raises(BackendError, match=r"no PyTorchJob API .*kubectl apply --server-side"):
        backend.submit(spec, stage(spec, "sft"))
    cluster.fail["create"] = [api_error(404, "the server could not find the requested resource")]
    with pytest.raises(BackendError, match="training operator"):
        backend.submit(spec, stage(spec, "sft"))


def test_missing_namespace(backend, cluster, spec):
    cluster.core.create_namespaced_config_map.side_effect = api_error(404, 'namespaces "tts" not found')
    with pytest.raises(BackendError, match="namespace 'tts' does not exist: create it"):
        backend.submit(spec, stage(spec, "sft"))


def test_forbidden_names_verb_and_resource(backend, cluster, spec):
    cluster.fail["create"] = [api_error(403, 'pytorchjobs.kubeflow.org is forbidden: User "bob" cannot create')]
    with pytest.raises(BackendError) as err:
        backend.submit(spec, stage(spec, "sft"))
    text = str(err.value)
    assert "you may not create pytorchjobs.kubeflow.org in namespace 'tts'" in text
    assert "kubectl auth can-i create pytorchjobs.kubeflow.org -n tts" in text


def test_transient_errors_retry_with_backoff(backend, cluster, spec, sleeps):
    cluster.fail["create"] = [api_error(503, "unavailable"), TimeoutError("slow"), api_error(500, "oops")]
    backend.submit(spec, stage(spec, "sft"))
    assert "t1-sft" in cluster.jobs
    assert sleeps == [1.0, 2.0, 4.0]


def test_retries_are_bounded(backend, cluster, spec, sleeps):
    cluster.fail["get"] = [api_error(503, "unavailable")] * 10
    with pytest.raises(BackendError, match=r"kept failing \(503 unavailable\) after 5 tries"):
        backend.status("t1", "sft")
    assert sleeps == [1.0, 2.0, 4.0, 8.0]


def test_long_pending_job_surfaces_pod_events(backend, cluster, spec):
    backend.submit(spec, stage(spec, "sft"))
    cluster.jobs["t1-sft"]["metadata"]["creationTimestamp"] = now_iso(minutes_ago=30)
    cluster.pods = [master_pod("t1-sft")]
    cluster.events = [
        k8s.CoreV1Event(metadata=k8s.V1ObjectMeta(name="e1"), type="Warning", reason="FailedScheduling",
                        message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                        involved_object=k8s.V1ObjectReference(kind="Pod", name="t1-sft-master-0")),
        k8s.CoreV1Event(metadata=k8s.V1ObjectMeta(name="e2"), type="Warning", reason="FailedScheduling",
                        message="unrelated", involved_object=k8s.V1ObjectReference(kind="Pod", name="other-0")),
    ]
    status = backend.status("t1", "sft")
    assert status.phase is Phase.PENDING
    assert "pending for 30 min" in status.message
    assert "t1-sft-master-0: FailedScheduling: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." \
        in status.message
    assert "unrelated" not in status.message


def test_logs_from_the_master_pod(backend, cluster, spec):
    backend.submit(spec, stage(spec, "sft"))
    cluster.pods = [master_pod("t1-sft")]
    cluster.core.read_namespaced_pod_log.return_value = "step 1 loss 3.2\nstep 2 loss 3.1\n"
    assert list(backend.logs("t1", "sft")) == ["step 1 loss 3.2\n", "step 2 loss 3.1\n"]
    cluster.core.read_namespaced_pod_log.assert_called_with("t1-sft-master-0", NS, container="pytorch")
    assert "step 2 loss 3.1" in backend.failure_hint("t1", "sft")


def test_cancel_deletes_the_run(backend, cluster, spec):
    backend.submit(spec, stage(spec, "sft"))
    backend.submit(spec, stage(spec, "merge"))
    cluster.set_conditions("t1-merge", ("Succeeded", "True"))
    assert backend.cancel("t1") == ["sft"]
    assert cluster.jobs == {}
    cluster.apps.delete_namespaced_deployment.assert_called_once_with("t1-rollout", NS)


def test_cli_reports_api_errors_with_exit_1(backend, cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "get_backend", lambda *args, **kwargs: backend)
    path = write_spec(tmp_path, spec_dict(tmp_path))
    cluster.fail["create"] = [api_error(403, "forbidden")]
    assert cli.main(["submit", str(path), "sft", "--backend", "kubeflow"]) == 1
    assert "forbidden: you may not create pytorchjobs.kubeflow.org" in capsys.readouterr().err
    assert cli.main(["submit", str(path), "sft", "--backend", "kubeflow"]) == 0
    assert cli.main(["status", "t1", "--backend", "kubeflow"]) == 0
    assert "sft: Pending" in capsys.readouterr().out
    assert cli.main(["list", "--backend", "kubeflow"]) == 0
    assert capsys.readouterr().out.startswith("t1\tPending")
