"""`manifests/` and the Helm chart against a real kube-apiserver 1.20: server-side dry-run then apply,
install with the default and every `ci/*-values.yaml`, upgrade, `helm test`, uninstall, the chart's
kubeVersion claim (#9) and its PriorityClass (#8)."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml
from conftest import CHART
from harness import REPO

pytestmark = pytest.mark.k8s
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = {"default": None, **{p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}}


def ensure_namespace(tools, name: str) -> None:
    tools.kubectl("create", "namespace", name, check=False)


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_crds_are_served(tools):
    resources = tools.kubectl("api-resources", "--api-group=kubeflow.org", "-o", "name")
    assert "pytorchjobs.kubeflow.org" in resources
    monitoring = tools.kubectl("api-resources", "--api-group=monitoring.coreos.com", "-o", "name")
    assert {"podmonitors.monitoring.coreos.com", "servicemonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com"} <= set(monitoring.split())


def test_manifests_server_dry_run_then_apply(tools):
    files = sorted((REPO / "manifests").glob("[0-9][0-9]-*.yaml"))
    objects = [yaml.safe_load(p.read_text()) for p in files]
    ensure_namespace(tools, "tts")
    dry = tools.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(REPO / "manifests"))
    assert dry.count("serverside-applied (server dry run)") == len(objects), dry
    assert tools.kubectl("get", "pytorchjobs", "-n", "tts", "-o", "name") == ""  # nothing created
    try:
        tools.kubectl("apply", "--server-side", "-f", str(REPO / "manifests"))
        for obj in objects:
            kind, name = obj["kind"].lower(), obj["metadata"]["name"]
            live = json.loads(tools.kubectl("get", kind, name, "-n", "tts", "-o", "json"))
            # The server kept every field we rendered (no pruning by the CRD schema, no defaults lost).
            assert _subset(obj["spec"] if "spec" in obj else obj["data"],
                           live["spec"] if "spec" in obj else live["data"]), f"{kind}/{name} changed on apply"
    finally:
        tools.kubectl("delete", "-f", str(REPO / "manifests"), "--wait=true", check=False)


def _subset(want, have) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(_subset, want, have))
    return want == have or str(want) == str(have)


def test_chart_kube_version_claim_is_the_tested_version(tools):
    # Regression #9: the chart claimed >=1.27 and helm refused the (working) 1.20 cluster.
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    lowest = re.fullmatch(r">=\s*(\d+)\.(\d+)\.0-0", claim)
    assert lowest, f"kubeVersion {claim!r}: expected a lower bound only"
    server = json.loads(tools.kubectl("version", "-o", "json"))["serverVersion"]
    assert (lowest[1], lowest[2]) == (server["major"], server["minor"].rstrip("+")), \
        f"the chart claims {claim} but the suite proves {server['gitVersion']}"
    # And helm agrees the server satisfies it (the same check `helm install` makes).
    tools.helm("template", "claim", str(CHART), "--validate", "--namespace", "default")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_install_upgrade_test_uninstall(tools, sim, name):
    ns = f"chart-{name}"
    ensure_namespace(tools, ns)
    release = "tts"
    values = ["--values", str(VALUE_SETS[name])] if VALUE_SETS[name] else []
    tools.helm("install", release, str(CHART), "-n", ns, *values)
    run = (yaml.safe_load(VALUE_SETS[name].read_text()).get("runName") if VALUE_SETS[name] else None) or release
    jobs = tools.kubectl("get", "pytorchjobs", "-n", ns, "-o", "name").split()
    assert jobs and all(j.startswith(f"pytorchjob.kubeflow.org/{run}-") for j in jobs)
    # Each job's pods can be created: ServiceAccount, PriorityClass, ConfigMaps all exist (#7, #8).
    for job in jobs:
        job_name = job.split("/")[1]
        wait_for(lambda job_name=job_name: tools.kubectl(
            "get", "pods", "-n", ns, "-l", f"training.kubeflow.org/job-name={job_name}", "-o", "name"),
            what=f"pods of {job_name}: {_warnings(tools, ns)}")
    tools.helm("upgrade", release, str(CHART), "-n", ns, *values, "--reuse-values", "--set", "labels.upgraded=yes")
    labels = json.loads(tools.kubectl("get", jobs[0], "-n", ns, "-o", "json"))["metadata"]["labels"]
    assert labels["upgraded"] == "yes"
    result = tools.helm("test", release, "-n", ns, timeout=180)
    assert "Phase:          Succeeded" in result.stdout, result.stdout
    # The pod's script really ran, as the release's ServiceAccount (sim.py runs test pods).
    (log,) = [lines for (pod_ns, pod), lines in sim.logs.items() if pod_ns == ns and pod.endswith("-test")]
    assert "ok: PyTorchJob API served, ServiceAccount can submit jobs, stage configs present" in "".join(log)
    tools.helm("uninstall", release, "-n", ns, "--wait")
    assert tools.kubectl("get", "pytorchjobs,configmaps,roles,serviceaccounts", "-n", ns, "-l",
                         "app.kubernetes.io/part-of=tts-training", "-o", "name") == ""


def test_full_pipeline_priority_class_is_created_when_asked(tools, sim):
    # Regression #8: ci/full-pipeline-values.yaml named PriorityClass training-high, which nothing created:
    # the API server refused every pod ("no PriorityClass with name training-high was found").
    ns = "chart-prio"
    ensure_namespace(tools, ns)
    tools.helm("install", "prio", str(CHART), "-n", ns, "--values", str(CHART / "ci" / "full-pipeline-values.yaml"))
    try:
        assert tools.kubectl("get", "priorityclass", "training-high", "-o", "jsonpath={.value}") == "100000"
        # The rollout server's pod comes from the real Deployment/ReplicaSet controllers.
        pod = wait_for(lambda: tools.kubectl("get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=rollout",
                                             "-o", "name"), what=f"the rollout pod: {_warnings(tools, ns)}")
        spec = json.loads(tools.kubectl("get", pod.split()[0], "-n", ns, "-o", "json"))["spec"]
        assert spec["priorityClassName"] == "training-high" and spec["priority"] == 100000
    finally:
        tools.helm("uninstall", "prio", "-n", ns, "--wait", check=False)
    assert tools.kubectl("get", "priorityclass", "training-high", check=False) == ""


def _warnings(tools, ns: str) -> str:
    return tools.kubectl("get", "events", "-n", ns, "--field-selector", "type=Warning", "-o",
                         "custom-columns=OBJ:.involvedObject.name,REASON:.reason,MSG:.message", check=False)
