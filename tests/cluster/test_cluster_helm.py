"""`helm test` on the real node: the chart's test pod runs on the kubelet as the release's ServiceAccount
and reaches the API server in-cluster (the `kubernetes` Service's ClusterIP, through kube-proxy)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Kube, writable_dir
from k8s_schemas.validate import tool  # tests/ is on the path (node.py)
from node import REPO, Node
from operator_standin import Operator

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "tts-training"


def test_helm_test_pod_runs_on_the_kubelet_and_reaches_the_api_server(node: Node, kube: Kube, operator: Operator,
                                                                     built: dict, tmp_path: Path) -> None:
    ns, release = "chart-smoke", "tts"
    node.prepare_namespace(ns, "smoke-workspace", writable_dir(tmp_path / "workspace"), service_account=None)
    repository, tag = built["cpu"]["tag"].rsplit(":", 1)

    def helm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=timeout,
                                env=kube.env())
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    helm("install", release, str(CHART), "-n", ns, "--values", str(CHART / "ci" / "cpu-smoke-values.yaml"),
         "--set", f"images.trainer.repository={repository},images.trainer.tag={tag},images.pullPolicy=Never")
    try:
        result = helm("test", release, "-n", ns, timeout=300)
        assert "Phase:          Succeeded" in result.stdout, result.stdout
        # The script really ran in the pod (helm deletes a test pod that succeeded, log and all): the API
        # server saw its requests, as the release's ServiceAccount, arriving through the Service's ClusterIP.
        made = node.cluster.audit_requests(f"system:serviceaccount:{ns}:tts-trainer", ns)
        assert ("kubeflow.org", "pytorchjobs", "list", 200) in made, sorted(made)
        assert any(resource == "configmaps" and code == 200 for _, resource, _, code in made), sorted(made)
    finally:
        helm("uninstall", release, "-n", ns, "--wait")
