"""Where stage runs execute: `local` processes or Kubeflow `PyTorchJob`s, behind one interface."""

from __future__ import annotations

import os

from kubernetes import config

from controller.backends.base import Backend, BackendError, Phase, RunSummary, StageStatus
from controller.backends.local import LocalBackend

BACKENDS = ("local", "kubeflow")
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace() -> str:
    """The namespace kubectl would use: the kubeconfig's current context, in a pod its own, else default."""
    try:
        _, current = config.list_kube_config_contexts()
        if current and current.get("context", {}).get("namespace"):
            return current["context"]["namespace"]
    except (config.ConfigException, OSError):
        pass
    if os.path.isfile(IN_CLUSTER_NAMESPACE):
        with open(IN_CLUSTER_NAMESPACE) as fh:
            return fh.read().strip() or "default"
    return "default"


def get_backend(name: str, namespace: str | None = None, echo: bool = True) -> Backend:
    if name == "local":
        return LocalBackend(echo=echo)
    if name == "kubeflow":
        from controller.backends import kubeflow  # lazy: the Kubeflow SDK adds ~0.3 s to every ttsctl command

        return kubeflow.KubeflowBackend(namespace=namespace or context_namespace(), poll_s=kubeflow.poll_seconds())
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BackendError", "Phase", "RunSummary", "StageStatus", "get_backend"]
