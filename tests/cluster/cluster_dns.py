"""Cluster DNS stand-in for the real-node suite: `cluster_dns.py KUBECONFIG ADDRESS [DOMAIN]`.

No cluster DNS server is packaged for this machine (CoreDNS is neither in Debian nor on PyPI), so this
answers the names the pods of a run look up, from the API server, as CoreDNS's `kubernetes` plugin does:

- `<service>.<namespace>.svc.<domain>`: the ClusterIP, or for a headless Service the addresses of its
  endpoints (ready ones, plus not-ready ones when the Service publishes them);
- `<hostname>.<service>.<namespace>.svc.<domain>`: an endpoint's address by its pod hostname;
- `<a-b-c-d>.<namespace>.pod.<domain>`: the pod-IP form.

Anything else is NXDOMAIN: nothing outside the test's network namespace is ever asked. Short names
reach it already qualified by the search path the kubelet writes into each pod's resolv.conf.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from kubernetes import client, config

TTL = 5
CACHE_S = 0.5


class KubeResolver(BaseResolver):
    def __init__(self, api: client.CoreV1Api, domain: str):
        self.api = api
        self.domain = domain.strip(".")
        self._cached: tuple[float, dict[str, list[str]]] = (0.0, {})
        self._lock = threading.Lock()

    def records(self) -> dict[str, list[str]]:
        """Every name this cluster answers, read at most every CACHE_S (pods resolve in bursts)."""
        with self._lock:
            at, table = self._cached
            if time.time() - at < CACHE_S:
                return table
            table = {}
            endpoints = {(e.metadata.namespace, e.metadata.name): e
                         for e in self.api.list_endpoints_for_all_namespaces().items}
            for svc in self.api.list_service_for_all_namespaces().items:
                ns, name = svc.metadata.namespace, svc.metadata.name
                fqdn = f"{name}.{ns}.svc.{self.domain}"
                if svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
                    table[fqdn] = [svc.spec.cluster_ip]
                    continue
                ips = table.setdefault(fqdn, [])
                for subset in getattr(endpoints.get((ns, name)), "subsets", None) or []:
                    addresses = list(subset.addresses or [])
                    if svc.spec.publish_not_ready_addresses:
                        addresses += subset.not_ready_addresses or []
                    for addr in addresses:
                        ips.append(addr.ip)
                        if addr.hostname:
                            table.setdefault(f"{addr.hostname}.{fqdn}", []).append(addr.ip)
            self._cached = (time.time(), table)
            return table

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        ips = self._lookup(qname)
        if ips is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for ip in ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=TTL))
        return reply  # a known name with no address of the asked type: NOERROR, no answer (as CoreDNS)

    def _lookup(self, qname: str) -> list[str] | None:
        pod_suffix = f".pod.{self.domain}"
        if qname.endswith(pod_suffix):
            dashed = qname[: -len(pod_suffix)].split(".")[0]
            parts = dashed.split("-")
            return [".".join(parts)] if len(parts) == 4 and all(p.isdigit() for p in parts) else None
        try:
            return self.records().get(qname)
        except Exception as err:  # the API server restarting: SERVFAIL-like, let the client retry
            print(f"dns: API error: {err}", file=sys.stderr, flush=True)
            return None


def main() -> None:
    kubeconfig, address = sys.argv[1], sys.argv[2]
    domain = sys.argv[3] if len(sys.argv) > 3 else "cluster.local"
    api = client.CoreV1Api(config.new_client_from_config(kubeconfig))
    resolver = KubeResolver(api, domain)
    quiet = DNSLogger(log="error", prefix=False)
    servers = [DNSServer(resolver, address=address, port=53, tcp=tcp, logger=quiet) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print(f"dns: serving {domain} on {address}:53", flush=True)
    while all(s.isAlive() for s in servers):
        time.sleep(1)


if __name__ == "__main__":
    main()
