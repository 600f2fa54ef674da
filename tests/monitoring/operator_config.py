"""The scrape configuration prometheus-operator v0.93.0 generates for our PodMonitor and ServiceMonitor
(pkg/prometheus/promcfg.go: generatePodMonitorConfig, generateServiceMonitorConfig, read at tag v0.93.0),
with Kubernetes service discovery replaced by static targets that carry the `__meta_kubernetes_*` labels
discovery would give the rendered pods and Service. Prometheus itself then applies the operator's
relabelling and the monitors' own `relabelings`, so the series carry exactly the labels they would in a
cluster: a monitor that forgets a label the dashboards select on leaves their panels empty here too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def sanitize(name: str) -> str:
    """Kubernetes label name -> Prometheus label name (strutil.SanitizeLabelName)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


@dataclass
class PodTarget:
    """One container port of a pod, as role `pod` discovery sees it."""

    address: str  # host:port Prometheus scrapes (the pod IP:containerPort in a cluster)
    namespace: str
    pod: str
    container: str
    port_name: str
    port_number: int
    labels: dict[str, str]
    phase: str = "Running"

    def meta(self) -> dict[str, str]:
        meta = {
            "__meta_kubernetes_namespace": self.namespace,
            "__meta_kubernetes_pod_name": self.pod,
            "__meta_kubernetes_pod_phase": self.phase,
            "__meta_kubernetes_pod_container_name": self.container,
            "__meta_kubernetes_pod_container_port_name": self.port_name,
            "__meta_kubernetes_pod_container_port_number": str(self.port_number),
        }
        for key, value in self.labels.items():
            meta[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
            meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
        return meta


@dataclass
class EndpointTarget:
    """One endpoint address of a Service backed by a pod, as role `endpoints` discovery sees it."""

    pod: PodTarget
    service: str
    service_labels: dict[str, str]
    port_name: str  # the Service port's name

    @property
    def address(self) -> str:
        return self.pod.address

    def meta(self) -> dict[str, str]:
        meta = {**self.pod.meta(), "__meta_kubernetes_service_name": self.service,
                "__meta_kubernetes_endpoints_name": self.service,
                "__meta_kubernetes_endpoint_port_name": self.port_name,
                "__meta_kubernetes_endpoint_ready": "true",
                "__meta_kubernetes_endpoint_address_target_kind": "Pod",
                "__meta_kubernetes_endpoint_address_target_name": self.pod.pod}
        for key, value in self.service_labels.items():
            meta[f"__meta_kubernetes_service_label_{sanitize(key)}"] = value
            meta[f"__meta_kubernetes_service_labelpresent_{sanitize(key)}"] = "true"
        return meta


def _relabeling(rule: dict[str, Any]) -> dict[str, Any]:
    """A monitor's camelCase RelabelConfig -> Prometheus' snake_case relabel_config."""
    out = {_CAMEL.sub("_", key).lower(): value for key, value in rule.items()}
    if "action" in out:
        out["action"] = out["action"].lower()
    return out


def _selector_rules(match_labels: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [{"source_labels": [f"__meta_kubernetes_{kind}_label_{sanitize(k)}",
                               f"__meta_kubernetes_{kind}_labelpresent_{sanitize(k)}"],
             "regex": f"({v});true", "action": "keep"} for k, v in sorted(match_labels.items())]


_SHARDING = [  # one shard: every target kept, as the operator writes it for shards=1
    {"source_labels": ["__address__", "__tmp_hash"], "target_label": "__tmp_hash", "regex": "(.+);",
     "replacement": "$1", "action": "replace"},
    {"source_labels": ["__tmp_hash"], "target_label": "__tmp_hash", "modulus": 1, "action": "hashmod"},
    {"source_labels": ["__tmp_hash", "__tmp_disable_sharding"], "regex": "0;|.+;.+", "action": "keep"},
]
_RUNNING = {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"}
_JOB_NAME = {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}


def _job(kind: str, monitor: dict[str, Any], index: int, endpoint: dict[str, Any], rules: list[dict[str, Any]],
         targets: list[PodTarget] | list[EndpointTarget]) -> dict[str, Any]:
    """One scrape config as the operator names and fills it, with the monitor's own relabelings and the
    sharding rules after `rules` (the operator's defaults for its kind)."""
    namespace, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    return {"job_name": f"{kind}/{namespace}/{name}/{index}", "honor_labels": False,
            "scrape_interval": endpoint.get("interval", "30s"), "metrics_path": endpoint.get("path", "/metrics"),
            "relabel_configs": [*rules, *(_relabeling(r) for r in endpoint.get("relabelings", [])), *_SHARDING],
            "static_configs": [{"targets": [t.address], "labels": t.meta()} for t in targets]}


def pod_monitor_jobs(monitor: dict[str, Any], targets: list[PodTarget]) -> list[dict[str, Any]]:
    """The scrape configs of a rendered PodMonitor (one per podMetricsEndpoints entry)."""
    namespace, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    spec = monitor["spec"]
    jobs = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        rules = [_JOB_NAME, _RUNNING, *_selector_rules(spec["selector"].get("matchLabels", {}), "pod"),
                 {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"],
                  "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                 {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                 {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                 {"target_label": "job", "replacement": f"{namespace}/{name}"},
                 {"target_label": "endpoint", "replacement": endpoint["port"]}]
        jobs.append(_job("podMonitor", monitor, i, endpoint, rules, targets))
    return jobs


def service_monitor_jobs(monitor: dict[str, Any], targets: list[EndpointTarget]) -> list[dict[str, Any]]:
    """The scrape configs of a rendered ServiceMonitor (role endpoints, the operator's default)."""
    spec = monitor["spec"]
    kind_name = ["__meta_kubernetes_endpoint_address_target_kind", "__meta_kubernetes_endpoint_address_target_name"]
    jobs = []
    for i, endpoint in enumerate(spec["endpoints"]):
        rules = [_JOB_NAME, *_selector_rules(spec["selector"].get("matchLabels", {}), "service"),
                 {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"],
                  "action": "keep"},
                 {"source_labels": kind_name, "separator": ";", "regex": "Node;(.*)", "replacement": "${1}",
                  "target_label": "node"},
                 {"source_labels": kind_name, "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}",
                  "target_label": "pod"},
                 {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                 {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                 {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                 {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                 _RUNNING,
                 {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
                 {"target_label": "endpoint", "replacement": endpoint["port"]}]
        jobs.append(_job("serviceMonitor", monitor, i, endpoint, rules, targets))
    return jobs
