"""A real one-node Kubernetes cluster inside a network namespace of its own, for the `cluster` suite and
`make demo-cluster`.

Kubernetes 1.20.2 built from Debian's source (.ci/build-kube-apiserver.sh): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet and kube-proxy; Debian's containerd 1.6 + runc run the
pods, the bridge CNI plugin wires them, `cluster_dns.py` answers Service names. Only the PyTorchJob operator is a
stand-in (`operator_standin.py`). Images come from `.ci/build-images.sh` (no registry is reachable).

Network: everything runs in the namespace `tts-<random>` (`ip netns add`; a veth inside it holds the
node IP, the CNI bridge the pod subnet); pod, node and Service addresses exist only there. The host
reaches the API server over loopback (harness.Cluster's forwarder) and nothing else: no route, no
iptables rule and no sysctl of the host's namespace is touched. `stop()` deletes the pods, stops every
process and removes the namespace.

    python tests/cluster/node.py          # start one, print KUBECONFIG, stop on Ctrl-C
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "k8s"), str(HERE.parent)]
from harness import REPO, Cluster, binaries  # noqa: E402

NODE_NAME = "tts-node"
NODE_IP = "10.250.0.1"
POD_SUBNET = "10.244.0.0/24"
SERVICE_RANGE = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
# Kubernetes 1.20's default sandbox image name; ours is built from the same source's pause.c.
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
IMAGES_SCRIPT = REPO / ".ci" / "build-images.sh"
# A real node: node lifecycle (heartbeats), PV binding; no cloud, no IPAM (the CNI config holds the subnet).
NODE_CONTROLLERS = "*,-nodeipam,-cloud-node-lifecycle,-attachdetach"
READY_TIMEOUT_S = 180.0


def images() -> dict[str, dict[str, str]]:
    """Build (or reuse) the node's images: {"pause"|"init"|"cpu": {"tag": ..., "archive": ...}}."""
    result = subprocess.run(["bash", str(IMAGES_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{IMAGES_SCRIPT} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def example_workspace(path: Path, uid: int = 1000) -> Path:
    """A workspace claim's directory for pods running as `uid` (hostPath volumes are not chowned for
    fsGroup): example/ hard-linked in (the pods only read it) and a writable runs/ for the outputs."""
    if not (path / "example").exists():
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(REPO / "example"), str(path / "example")], check=True)
        # Files written here by another account may be private to it (safetensors writes 0600).
        subprocess.run(["chmod", "-R", "a+rX", str(path / "example")], check=True)
    outputs = path / "runs"
    outputs.mkdir(exist_ok=True)
    for p in (path, outputs, *outputs.rglob("*")):
        os.chown(p, uid, uid)
    return path


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return result


class Node:
    def __init__(self, workdir: Path, bin_dir: Path):
        self.dir = workdir
        self.bin = bin_dir
        self.netns = f"tts-{secrets.token_hex(3)}"
        self.cluster = Cluster(workdir, bin_dir, netns=self.netns, address=NODE_IP, controllers=NODE_CONTROLLERS)
        self.containerd_sock = workdir / "containerd" / "containerd.sock"
        self.kubelet_root = workdir / "kubelet"

    # ------------------------------------------------------------------ start
    def start(self, built: dict[str, dict[str, str]] | None = None) -> Node:
        try:
            self._make_netns()
            self.cluster.start()
            self.cluster.apply_crds()
            self._start_scheduler()
            self._start_containerd()
            for image in (built or {}).values():
                self.import_image(Path(image["archive"]))
            self._start_kubelet()
            self._start_proxy()
            self._start_dns()
            self._wait_node_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_netns(self) -> None:
        _run(["ip", "netns", "add", self.netns])
        # The node IP sits on one end of a veth pair whose both ends stay in the namespace (this kernel has
        # no dummy device); anything addressed outside the namespace is dropped by a blackhole route.
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "node0", "type", "veth", "peer", "name", "node0-peer"],
                    ["addr", "add", f"{NODE_IP}/24", "dev", "node0"],
                    ["link", "set", "node0", "up"],
                    ["link", "set", "node0-peer", "up"],
                    ["route", "add", "blackhole", "default"]):
            _run(["ip", "-n", self.netns, *cmd])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.cluster._spawn(name, cmd)

    def _wait(self, name: str, ready: Any) -> None:
        self.cluster._wait(name, ready)

    def _start_scheduler(self) -> None:
        kc = self.cluster.inner_kubeconfig
        self._spawn("kube-scheduler", [
            str(self.bin / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--leader-elect=false", "--port=0",
            "--bind-address=127.0.0.1", "--secure-port=10259"])

    def _start_containerd(self) -> None:
        root = self.dir / "containerd"
        cni_conf = self.dir / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-tts.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "tts-pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.dir / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        config = self.dir / "containerd.toml"
        config.write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{root / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This sandbox lacks CAP_SYS_RESOURCE: no container may get a lower OOM score than containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
""")
        self._spawn("containerd", ["containerd", "--config", str(config)])
        self._wait("containerd", lambda: self.ctr("version", check=False).returncode == 0)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["ctr", "--address", str(self.containerd_sock), "--namespace", "k8s.io", *args], check=check)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def _start_kubelet(self) -> None:
        pki = self.cluster.pki
        resolv = self.dir / "resolv.conf"
        resolv.write_text("")  # pods get the cluster DNS and its search path, nothing of the host's
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self._spawn("kubelet", [
            str(self.bin / "kubelet"),
            f"--kubeconfig={self.cluster.inner_kubeconfig}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.containerd_sock}",
            "--runtime-request-timeout=15m",  # importing nothing, but a first container start is slow on 2 cores
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--address={NODE_IP}",
            "--read-only-port=0", "--healthz-bind-address=127.0.0.1",
            f"--root-dir={self.kubelet_root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            # Logs, exec and probes' callers: only the API server, by its client certificate.
            f"--client-ca-file={pki / 'ca.crt'}", "--anonymous-auth=false", "--authorization-mode=AlwaysAllow",
            "--cgroup-driver=cgroupfs", "--cgroups-per-qos=false", "--enforce-node-allocatable=",
            "--fail-swap-on=false", "--oom-score-adj=0",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            f"--cluster-dns={NODE_IP}", f"--cluster-domain={CLUSTER_DOMAIN}", f"--resolv-conf={resolv}",
            # The imported images are the only copies: never garbage-collect them. The disk is the
            # machine's, shared: evict (and taint the node) only when it is nearly full, not at the
            # defaults' 10-15 % free.
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            "--eviction-hard=memory.available<256Mi,nodefs.available<2Gi,imagefs.available<2Gi",
            "--enable-controller-attach-detach=false",
            f"--volume-plugin-dir={self.dir / 'kubelet-plugins'}",
            "--v=1",
        ])

    def _start_proxy(self) -> None:
        self._spawn("kube-proxy", [
            str(self.bin / "kube-proxy"), f"--kubeconfig={self.cluster.inner_kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--bind-address={NODE_IP}", f"--cluster-cidr={POD_SUBNET}",
            "--proxy-mode=iptables",
            # Service traffic is source-NATed to the node: replies between two pods of the one bridge
            # then return through the namespace's conntrack (no br_netfilter module needed).
            "--masquerade-all",
            # Leave the (host-wide) conntrack sysctls alone.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s",
            "--oom-score-adj=0", "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256"])

    def _start_dns(self) -> None:
        self._spawn("dns", [sys.executable, str(HERE / "cluster_dns.py"), str(self.cluster.inner_kubeconfig), NODE_IP,
                            CLUSTER_DOMAIN])

    def _wait_node_ready(self) -> None:
        deadline = time.time() + READY_TIMEOUT_S
        ready = '{.status.conditions[?(@.type=="Ready")].status}'
        while time.time() < deadline:
            for name, proc in self.cluster.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.cluster.log_tail(name)}")
            out = subprocess.run(self.cluster.kubectl_cmd("get", "node", NODE_NAME, "-o", f"jsonpath={ready}"),
                                 capture_output=True, text=True)
            if out.stdout == "True":
                return
            time.sleep(1)
        raise RuntimeError(f"node {NODE_NAME} not Ready after {READY_TIMEOUT_S:.0f}s:\n"
                           f"{self.cluster.log_tail('kubelet')}")

    # ------------------------------------------------------------------ a run's namespace
    def prepare_namespace(self, namespace: str, claim: str, host_dir: Path,
                          service_account: str | None = "tts-trainer") -> None:
        """What a run needs before `ttsctl run`: its namespace, the ServiceAccount its pods run as (None:
        a chart creates it), and a workspace claim bound to a hostPath volume of `host_dir` (the node is
        this machine). The pods run as uid 1000 and hostPath volumes are not chowned for fsGroup:
        `host_dir` must be writable by it."""
        pv = f"{namespace}-{claim}"
        objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
        if service_account:
            objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": service_account, "namespace": namespace}})
        objects += [
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
             "spec": {"capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteMany"],
                      "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "local-workspace",
                      "hostPath": {"path": str(host_dir), "type": "Directory"},
                      "claimRef": {"namespace": namespace, "name": claim}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "local-workspace", "volumeName": pv,
                      "resources": {"requests": {"storage": "50Gi"}}}},
        ]
        path = self.dir / f"namespace-{namespace}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        _run(self.cluster.kubectl_cmd("apply", "-f", str(path)))
        bound = "{.status.phase}"
        deadline = time.time() + 60
        while _run(self.cluster.kubectl_cmd("-n", namespace, "get", "pvc", claim, "-o", f"jsonpath={bound}"),
                   check=False).stdout != "Bound":
            if time.time() > deadline:
                raise RuntimeError(f"claim {namespace}/{claim} not Bound after 60 s")
            time.sleep(0.5)
        if service_account:
            # The token controller gives the ServiceAccount its token secret; pods wait for it otherwise.
            self.cluster.service_account_kubeconfig(namespace, service_account)

    def pod_report(self, namespace: str) -> list[dict[str, Any]]:
        """For every pod of `namespace` (PyTorchJob pods, the rollout server's): what ran where, how it ended."""
        out = json.loads(_run(self.cluster.kubectl_cmd("-n", namespace, "get", "pods", "-o", "json")).stdout)
        rows = []
        for pod in out["items"]:
            labels = pod["metadata"].get("labels", {})
            statuses = {c["name"]: c for c in pod.get("status", {}).get("containerStatuses", [])}
            main = statuses.get("pytorch") or next(iter(statuses.values()), {})
            state = main.get("state", {})
            ended = state.get("terminated") or main.get("lastState", {}).get("terminated") or {}
            rows.append({
                "name": pod["metadata"]["name"],
                "stage": labels.get("speechlm.io/stage"),
                # A PyTorchJob's pod names its job; a Deployment's, its ReplicaSet.
                "job": labels.get("training.kubeflow.org/job-name") or next(
                    (f"{o['kind']}/{o['name']}" for o in pod["metadata"].get("ownerReferences", [])), None),
                "replica_type": labels.get("training.kubeflow.org/replica-type") or labels.get(
                    "app.kubernetes.io/component"),
                "node": pod["spec"].get("nodeName"),
                "image": main.get("image"),
                "image_id": main.get("imageID"),
                "container_id": main.get("containerID"),
                "phase": pod.get("status", {}).get("phase"),
                "exit_code": ended.get("exitCode"),
                "restarts": main.get("restartCount", 0),
            })
        return sorted(rows, key=lambda r: r["name"])

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Pods first (the kubelet stops their sandboxes, which removes their network namespaces), then
        what the kubelet left in containerd, every process, mounts, and the namespaces."""
        pod_netns: set[str] = set()
        with contextlib.suppress(Exception):
            self._delete_all_pods()
        with contextlib.suppress(Exception):
            pod_netns = self._kill_containers()
        self.cluster.stop()
        self._kill_shims()
        self._unmount_kubelet_volumes()
        for path in pod_netns:
            if os.path.exists(path):
                subprocess.run(["umount", path], capture_output=True)
                with contextlib.suppress(OSError):
                    os.unlink(path)
        _run(["ip", "netns", "delete", self.netns], check=False)

    def _delete_all_pods(self) -> None:
        if not self.cluster.kubeconfig.exists():
            return
        subprocess.run(self.cluster.kubectl_cmd("delete", "pods", "--all", "--all-namespaces", "--grace-period=0",
                                                "--force", "--wait=false"), capture_output=True, timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline and self.ctr("tasks", "list", "--quiet", check=False).stdout.split():
            time.sleep(1)

    def _kill_containers(self) -> set[str]:
        """Kill what still runs; answer the network namespaces of every sandbox (pods' netns files)."""
        paths = set()
        for cid in self.ctr("containers", "list", "--quiet", check=False).stdout.split():
            info = json.loads(self.ctr("containers", "info", cid, check=False).stdout or "{}")
            for ns in info.get("Spec", {}).get("linux", {}).get("namespaces", []):
                if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                    paths.add(ns["path"])
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
        return paths

    def _kill_shims(self) -> None:
        """containerd is down: end the shims it started for this node (found by its socket address)."""
        out = subprocess.run(["pgrep", "-f", f"containerd-shim-runc-v2 .*-address {self.containerd_sock}"],
                             capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def _unmount_kubelet_volumes(self) -> None:
        roots = (str(self.kubelet_root), str(self.dir / "containerd"))
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for target in sorted((m for m in mounts if m.startswith(roots)), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tts-node-"))
    node = Node(workdir, binaries()).start(images())
    try:
        print(f"export KUBECONFIG={node.cluster.kubeconfig}   (Ctrl-C stops the cluster)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
