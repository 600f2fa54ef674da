"""Fixtures of the `k8s` suite: one real control plane per session (harness.py) with the simulated
operator/scheduler/kubelet (sim.py), the CRDs applied, and helpers to run kubectl, helm and ttsctl.

Every module here sets `pytestmark = pytest.mark.k8s` (deselected by `make test`; `make test-k8s` runs
them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, Cluster, binaries
from sim import Sim

sys.path.insert(0, str(REPO / "tests"))
from k8s_schemas.validate import tool

CHART = REPO / "charts" / "tts-training"


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    try:
        bin_dir = binaries()
    except RuntimeError as err:
        pytest.fail(f"no kube-apiserver: {err}")
    tool("helm")
    workdir = Path(tempfile.mkdtemp(prefix="tts-k8s-"))
    c = Cluster(workdir, bin_dir).start()
    try:
        c.apply_crds()
        yield c
    finally:
        c.stop()
        # ~74 MB of etcd data and logs per run; kept when a test failed (the servers' logs are the evidence).
        if not request.session.testsfailed:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def sim(cluster: Cluster) -> Iterator[Sim]:
    s = Sim(cluster).start()
    yield s
    s.stop()


class Tools:
    """kubectl / helm / ttsctl against the test cluster, as a given kubeconfig (default: admin)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TTSCTL_")}
        env["KUBECONFIG"] = str(kubeconfig or self.cluster.kubeconfig)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["TTSCTL_POLL_SECONDS"] = "0.3"
        return env

    def run(self, cmd: list[str], kubeconfig: Path | None = None, timeout: float = 180,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=self.env(kubeconfig))

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True) -> str:
        result = self.run([tool("kubectl"), *args], kubeconfig)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def helm(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = self.run([tool("helm"), *args], kubeconfig, timeout=timeout)
        if check:
            assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def ttsctl(self, *args: str, kubeconfig: Path | None = None, timeout: float = 180,
               cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "controller.cli", *args], kubeconfig, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def tools(cluster: Cluster) -> Tools:
    return Tools(cluster)
