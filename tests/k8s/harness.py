"""A real Kubernetes control plane on 127.0.0.1 for the `k8s` test suite: etcd, kube-apiserver and
kube-controller-manager (garbage collection, service-account tokens, deployments), built by
`.ci/build-kube-apiserver.sh` (Kubernetes 1.20.2 from Debian bookworm's source package).

No scheduler and no kubelet run here: `sim.py` stands in for both (and for the training operator).
Every process listens on a random free port of 127.0.0.1 and is stopped by `Cluster.stop()`.
With `netns`, the same control plane runs inside that network namespace on `address` (the real-node
suite, tests/cluster/node.py); the host then reaches the API server through a loopback forwarder.

    python tests/k8s/harness.py      # start one, print KUBECONFIG, stop on Ctrl-C
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / ".ci" / "build-kube-apiserver.sh"
CRD_DIR = REPO / "tests" / "k8s_schemas"
CRD_FILES = ("kubeflow.org_pytorchjobs.yaml", "monitoring.coreos.com_podmonitors.yaml",
             "monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")
NODE = "sim-node"
STARTUP_TIMEOUT_S = 120.0


def binaries() -> Path:
    """The directory with kube-apiserver and kube-controller-manager ($TTS_K8S_BIN, else the build cache,
    building it when absent)."""
    if os.environ.get("TTS_K8S_BIN"):
        return Path(os.environ["TTS_K8S_BIN"])
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """A CA, a serving cert for 127.0.0.1 and `extra_ips` (apiserver and kubelet), a service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ips = "".join(f",IP:{ip}" for ip in extra_ips)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=tts-test-ca", cwd=pki)
    (pki / "san.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1" + ips +
        ",DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "serving.key", "-out", "serving.csr",
             "-subj", "/CN=127.0.0.1", cwd=pki)
    _openssl("x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "serving.crt", "-days", "2", "-extfile", "san.cnf", "-extensions", "ext", cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig(server: str, ca: Path, token: str, namespace: str = "default", user: str = "user") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user, "namespace": namespace}}],
    }


def for_1_20(crd: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes 1.20 has no CEL (`x-kubernetes-validations`): drop those rules. It also validates a
    `default: ""` as null against `type: string` (the prometheus-operator CRDs fail on it), except that a
    list-map key must keep its default (the PyTorchJob CRD's imagePullSecrets names): drop the others."""
    def clean(node: Any, map_keys: frozenset[str] = frozenset()) -> Any:
        if isinstance(node, list):
            return [clean(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "x-kubernetes-validations":
                continue
            if key == "properties":
                out[key] = {name: _drop_empty_default(clean(schema), keep=name in map_keys)
                            for name, schema in value.items()}
            elif key == "items" and isinstance(value, dict):
                out[key] = clean(value, frozenset(node.get("x-kubernetes-list-map-keys", ())))
            else:
                out[key] = clean(value)
        return out
    return clean(crd)


def _drop_empty_default(schema: Any, keep: bool) -> Any:
    if isinstance(schema, dict) and schema.get("default") == "" and not keep:
        return {k: v for k, v in schema.items() if k != "default"}
    return schema


# Without the stand-in node the lifecycle, IPAM and volume controllers have nothing to do but harm (a node
# that never reports heartbeats would be evicted); a real node (tests/cluster) needs the volume binder.
SIM_CONTROLLERS = "*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-attachdetach,-persistentvolume-binder"


class Cluster:
    def __init__(self, workdir: Path, bin_dir: Path, netns: str | None = None, address: str = "127.0.0.1",
                 controllers: str = SIM_CONTROLLERS):
        self.dir = workdir
        self.bin = bin_dir
        self.netns = netns
        self.address = address
        self.controllers = controllers
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pki = workdir / "pki"
        self.port = free_port() if netns is None else 6443  # a namespace of its own has every port free
        self.inner_server = f"https://{address}:{self.port}"  # as seen by processes next to the API server
        self.server = self.inner_server  # as seen from the host (a loopback forwarder when in a namespace)
        self.admin_token = secrets.token_hex(16)
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.inner_kubeconfig = workdir / "inner.kubeconfig"
        self.audit_log = workdir / "audit.log"

    # ------------------------------------------------------------------ start / stop
    def start(self) -> Cluster:
        try:
            make_certs(self.pki, extra_ips=(self.address,) if self.address != "127.0.0.1" else ())
            self._start_etcd()
            if self.netns:
                self.server = f"https://127.0.0.1:{self._forward(self.address, self.port)}"
            self._start_apiserver()
            self.kubeconfig.write_text(yaml.safe_dump(kubeconfig(self.server, self.pki / "ca.crt",
                                                                 self.admin_token, user="admin")))
            self.inner_kubeconfig.write_text(yaml.safe_dump(kubeconfig(self.inner_server, self.pki / "ca.crt",
                                                                       self.admin_token, user="admin")))
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def in_netns(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the cluster's network namespace (only the network: mounts and cgroups stay the
        host's, which containerd and the kubelet need)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", *cmd] if self.netns else cmd

    def _spawn(self, name: str, cmd: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the process's life)
        proc = subprocess.Popen(self.in_netns(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=pass_fds)
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _wait(self, name: str, ready: Any) -> None:
        proc = dict(self.procs)[name]
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail(name)}")

    def _forward(self, address: str, port: int) -> int:
        """A host loopback port whose connections reach address:port inside the namespace: the listening
        socket is made here, in the host's namespace, and handed to a forwarder started in the cluster's."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._spawn(f"forward-{port}", [sys.executable, str(Path(__file__).with_name("forward.py")),
                                        str(listener.fileno()), address, str(port)], pass_fds=(listener.fileno(),))
        host_port = listener.getsockname()[1]
        listener.close()  # the forwarder holds its own copy
        return host_port

    def _reachable(self, url: str) -> bool:
        if not self.netns:
            return _http_ok(url)
        probe = f"import urllib.request as u; u.urlopen({url!r}, timeout=2)"
        return subprocess.run(self.in_netns([sys.executable, "-c", probe]), capture_output=True).returncode == 0

    def _start_etcd(self) -> None:
        client, peer = (free_port(), free_port()) if self.netns is None else (2379, 2380)
        self.etcd = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            "etcd", "--name", "test", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", self.etcd, "--advertise-client-urls", self.etcd,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port() if self.netns is None else 2381}",
        ])
        self._wait("etcd", lambda: self._reachable(f"{self.etcd}/health"))

    def _start_apiserver(self) -> None:
        tokens = self.dir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        # Every request, by user: the RBAC test compares what ttsctl used with what the Role grants.
        policy = self.dir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                          "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))
        pki = self.pki
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers={self.etcd}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            # Logs go to the node's InternalIP (sim.StandInKubelet on 127.0.0.1, or the real kubelet).
            "--kubelet-preferred-address-types=InternalIP",
            # The real kubelet (tests/cluster) admits the API server by its client certificate.
            f"--kubelet-client-certificate={pki / 'serving.crt'}", f"--kubelet-client-key={pki / 'serving.key'}",
            "--profiling=false",
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
        ])
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", ctx, self.admin_token))

    def _start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.inner_kubeconfig}",
            f"--authentication-kubeconfig={self.inner_kubeconfig}",
            f"--authorization-kubeconfig={self.inner_kubeconfig}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--leader-elect=false",
            "--port=0", "--bind-address=127.0.0.1", f"--secure-port={free_port() if self.netns is None else 10257}",
            f"--cert-dir={self.dir / 'cm-certs'}",
            f"--controllers={self.controllers}",
        ])
        # Ready when the token controller has given the default ServiceAccount its token.
        self._wait("kube-controller-manager", self._default_token_exists)

    def _default_token_exists(self) -> bool:
        out = subprocess.run(self.kubectl_cmd("get", "secrets", "-n", "default", "-o", "name"),
                             capture_output=True, text=True)
        return "secret/default-token-" in out.stdout

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    # ------------------------------------------------------------------ access
    def kubectl_cmd(self, *args: str, kubeconfig_path: Path | None = None) -> list[str]:
        from k8s_schemas.validate import tool

        return [tool("kubectl"), f"--kubeconfig={kubeconfig_path or self.kubeconfig}", *args]

    def api_client(self, kubeconfig_path: Path | None = None) -> Any:
        from kubernetes import config

        return config.new_client_from_config(str(kubeconfig_path or self.kubeconfig))

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name (its token secret)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        deadline = time.time() + 30
        while time.time() < deadline:
            sa = core.read_namespaced_service_account(name, namespace)
            token_secrets = [s.name for s in sa.secrets or [] if "-token-" in s.name]
            if token_secrets:
                secret = core.read_namespaced_secret(token_secrets[0], namespace)
                token = base64.b64decode(secret.data["token"]).decode()
                path = self.dir / f"sa-{namespace}-{name}.kubeconfig"
                path.write_text(yaml.safe_dump(kubeconfig(self.server, self.pki / "ca.crt", token, namespace,
                                                          user=f"{namespace}-{name}")))
                return path
            time.sleep(0.3)
        raise RuntimeError(f"no token for ServiceAccount {namespace}/{name}")

    def audit_requests(self, user: str, namespace: str) -> set[tuple[str, str, str, int]]:
        """(apiGroup, resource[/subresource], verb, HTTP code) of every request `user` made in `namespace`
        (from the audit log)."""
        seen = set()
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            ref = event.get("objectRef")
            if (event.get("user", {}).get("username") != user or not ref or ref.get("namespace") != namespace
                    or event.get("stage") != "ResponseComplete"):
                continue
            resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            code = event.get("responseStatus", {}).get("code", 0)
            seen.add((ref.get("apiGroup", ""), resource, event["verb"], code))
        return seen

    def apply_crds(self) -> None:
        docs = [for_1_20(yaml.safe_load((CRD_DIR / name).read_text())) for name in CRD_FILES]
        path = self.dir / "crds.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        cmd = self.kubectl_cmd("apply", "--server-side", "-f", str(path))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl apply of the CRDs: {result.stderr[-3000:]}")
        established = '{.status.conditions[?(@.type=="Established")].status}'
        for doc in docs:
            name = doc["metadata"]["name"]
            deadline = time.time() + 60
            while subprocess.run(self.kubectl_cmd("get", "crd", name, "-o", f"jsonpath={established}"),
                                 capture_output=True, text=True).stdout != "True":
                if time.time() > deadline:
                    raise RuntimeError(f"CRD {name} not established after 60 s")
                time.sleep(0.3)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    workdir = Path(tempfile.mkdtemp(prefix="tts-k8s-"))
    cluster = Cluster(workdir, binaries()).start()
    try:
        cluster.apply_crds()
        print(f"export KUBECONFIG={cluster.kubeconfig}   (Ctrl-C stops the cluster)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
