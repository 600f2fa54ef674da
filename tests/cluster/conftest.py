"""Fixtures of the `cluster` suite: one real node per session (node.py: Kubernetes 1.20 control plane,
kubelet, kube-proxy, containerd + runc, in a network namespace of the suite's own), the images built with
buildah and imported into it, and the PyTorchJob operator stand-in (operator_standin.py).

Every module here sets `pytestmark = pytest.mark.cluster` (deselected by `make test`; `make test-cluster`
runs them). Needs root (network namespaces, containerd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node import REPO, Node, binaries, images
from operator_standin import Operator

UID = 1000  # the images' user


def host_network() -> dict[str, str]:
    """What the suite must leave as it found it in the host's namespace."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    return {"links": run("ip", "-o", "link", "show"), "addresses": run("ip", "-o", "addr", "show"),
            "routes": run("ip", "route", "show", "table", "all"), "iptables": run("iptables-save"),
            "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text()}


@pytest.fixture(scope="session")
def built() -> dict[str, dict[str, str]]:
    if os.geteuid() != 0:
        pytest.fail("the cluster suite needs root (network namespaces, containerd, kubelet)")
    try:
        return images()
    except RuntimeError as err:
        pytest.fail(f"building the images failed: {err}")


@pytest.fixture(scope="session")
def host_before() -> dict[str, str]:
    return host_network()


@pytest.fixture(scope="session")
def node(built: dict[str, dict[str, str]], host_before: dict[str, str]) -> Iterator[Node]:
    workdir = Path(tempfile.mkdtemp(prefix="tts-cluster-"))
    n = Node(workdir, binaries())
    try:
        n.start(built)
        yield n
    finally:
        n.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def operator(node: Node, built: dict[str, dict[str, str]]) -> Iterator[Operator]:
    op = Operator(node.cluster.api_client(), init_image=built["init"]["tag"]).start()
    yield op
    op.stop()
    assert not op.errors, op.errors[-3:]


def writable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


class Kube:
    """kubectl / ttsctl against the node's API server (over the host's loopback forwarder)."""

    def __init__(self, node: Node):
        self.node = node

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TTSCTL_")}
        return {**env, "KUBECONFIG": str(self.node.cluster.kubeconfig), "TTSCTL_POLL_SECONDS": "1",
                "PYTHONPATH": str(REPO)}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(self.node.cluster.kubectl_cmd(*args), capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def ttsctl(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=self.env())

    def ttsctl_bg(self, *args: str, log: Path) -> subprocess.Popen[Any]:
        return subprocess.Popen([sys.executable, "-m", "controller.cli", *args], cwd=REPO, env=self.env(),
                                stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def kube(node: Node) -> Kube:
    return Kube(node)
