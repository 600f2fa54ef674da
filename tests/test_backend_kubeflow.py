"""The `kubeflow` backend against a patched CustomObjectsApi / CoreV1Api: only what a real API server
cannot be made to do on demand (5xx, timeouts, a submit race, the operator absent, a stale rollout).
Everything else runs against a real kube-apiserver in tests/k8s (`make test-k8s`)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from unittest.mock import Mock

import kubernetes
import pytest
from controller_fixtures import spec_dict, write_spec
from kubeflow.training import TrainingClient
from kubernetes.client.exceptions import ApiException

from controller.backends import BackendError
from controller.backends.api_errors import ApiCaller
from controller.backends.kubeflow import KubeflowBackend
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
        self.fail: dict[str, list[BaseException]] = {}  # method -> errors raised by its next calls
        self.custom = Mock()
        self.custom.create_namespaced_custom_object.side_effect = self.create
        self.custom.get_namespaced_custom_object.side_effect = self.get
        self.custom.list_namespaced_custom_object.side_effect = self.list
        self.custom.delete_namespaced_custom_object.side_effect = self.delete
        self.core = Mock()
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
        if name not in self.jobs:
            raise api_error(404, f'pytorchjobs.kubeflow.org "{name}" not found')
        return Mock(get=lambda timeout: self.jobs[name])

    def list(self, group, version, namespace, plural, async_req=False):
        self._maybe_fail("list")
        return Mock(get=lambda timeout: {"items": list(self.jobs.values())})

    def delete(self, group, version, namespace, plural, name, body=None):
        self.jobs.pop(name)


def now_iso(minutes_ago: float = 0) -> str:
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


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


def test_conflict_on_create_attaches(backend, cluster, spec):
    cluster.fail["create"] = [api_error(409, "already exists")]
    cluster.core.create_namespaced_config_map.side_effect = api_error(409, "exists")
    status = backend.submit(spec, stage(spec, "merge"))
    assert "attached" in status.reason
    # The existing ConfigMap was replaced with the current config.
    assert cluster.core.replace_namespaced_config_map.call_args.args[0] == "t1-merge-config"


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
