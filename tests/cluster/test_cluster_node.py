"""The node itself: the image built with buildah runs under the pods' securityContext on the real kubelet,
logs go through the API server, a Service name reaches a pod through the cluster DNS stand-in and
kube-proxy, and the host's network is left exactly as it was."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from conftest import Kube, host_network
from node import NODE_NAME, POD_SUBNET, Node

pytestmark = pytest.mark.cluster


def pod(name: str, image: str, command: list[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod under the security context every trainer pod gets (controller/render/pod.py)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": "Never",
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                         "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": command,
                                     "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}


def apply(kube: Kube, node: Node, *objects: dict[str, Any]) -> None:
    path = node.dir / f"objects-{time.time_ns()}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    kube.kubectl("apply", "-f", str(path))


def wait_phase(kube: Kube, name: str, phases: tuple[str, ...], timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        phase = kube.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}", check=False)
        if phase in phases:
            return phase
        time.sleep(0.5)
    described = kube.kubectl("describe", "pod", name, check=False)
    raise AssertionError(f"pod {name} not {phases} after {timeout:.0f} s:\n{described[-3000:]}")


def test_the_cpu_image_runs_as_its_user_and_logs_come_through_the_api_server(node: Node, kube: Kube,
                                                                             built: dict) -> None:
    image = built["cpu"]["tag"]
    probe = ("import os, torch, trainer, controller; "
             "print('uid', os.getuid(), 'torch', torch.__version__, 'trainer from', trainer.__file__)")
    apply(kube, node, pod("cpu-image", image, ["python", "-c", probe]))
    assert wait_phase(kube, "cpu-image", ("Succeeded", "Failed")) == "Succeeded", kube.kubectl("logs", "cpu-image")
    log = kube.kubectl("logs", "cpu-image")  # API server -> the kubelet's /containerLogs
    assert "uid 1000 torch 2.13.0+cpu trainer from /opt/venv/" in log, log
    status = json.loads(kube.kubectl("get", "pod", "cpu-image", "-o", "json"))
    assert status["spec"]["nodeName"] == NODE_NAME
    (container,) = status["status"]["containerStatuses"]
    assert container["containerID"].startswith("containerd://")
    assert container["state"]["terminated"]["exitCode"] == 0
    # The container really is in containerd, under the image imported from the buildah build.
    listed = node.ctr("containers", "list").stdout
    assert container["containerID"].removeprefix("containerd://") in listed and image in listed


def test_a_service_name_reaches_a_pod_through_cluster_dns_and_kube_proxy(node: Node, kube: Kube,
                                                                        built: dict) -> None:
    web = pod("web", built["cpu"]["tag"], ["sh", "-c", "echo hello-from-web > /www/index.html && "
                                                         "exec python -m http.server 8080 --directory /www"],
              labels={"app": "web"})
    web["spec"]["volumes"] = [{"name": "www", "emptyDir": {}}]
    web["spec"]["containers"][0]["volumeMounts"] = [{"name": "www", "mountPath": "/www"}]
    apply(kube, node, web, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    wait_phase(kube, "web", ("Running",))
    # The short name resolves through the search path the kubelet wrote into resolv.conf (the cluster DNS
    # stand-in answers); port 80 is kube-proxy's DNAT to the pod's 8080. glibc's resolver, as a trainer's.
    fetch = ("import time, urllib.request as u\n"
             "for _ in range(30):\n"
             "    try:\n"
             "        print(u.urlopen('http://web/', timeout=2).read().decode()); break\n"
             "    except OSError as err:\n"
             "        print('retry', err); time.sleep(1)\n")
    apply(kube, node, pod("client", built["cpu"]["tag"], ["python", "-c", fetch]))
    assert wait_phase(kube, "client", ("Succeeded", "Failed")) == "Succeeded", kube.kubectl("logs", "client")
    assert "hello-from-web" in kube.kubectl("logs", "client")
    cluster_ip = kube.kubectl("get", "service", "web", "-o", "jsonpath={.spec.clusterIP}")
    assert cluster_ip.startswith("10.96.")


def test_the_cluster_stays_inside_its_network_namespace(node: Node, kube: Kube, host_before: dict) -> None:
    kube.kubectl("get", "node", NODE_NAME)  # the node is up, pods have run
    assert host_network() == host_before
    inside = subprocess.run(["ip", "-n", node.netns, "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert POD_SUBNET.rsplit(".", 1)[0] + ".1/" in inside  # the CNI bridge's gateway lives in the namespace
    host = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert "10.244." not in host and "10.250." not in host
