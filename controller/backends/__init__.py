"""Where stage runs execute: `local` processes or Kubeflow `PyTorchJob`s, behind one interface."""

from __future__ import annotations

import os

from controller.backends.base import Backend, BackendError, Phase, RunSummary, StageStatus

BACKENDS = ("local", "kubeflow")
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace() -> str:
    """The namespace kubectl would use: the kubeconfig's current context, in a pod its own, else default."""
    from kubernetes import config

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


def poll_seconds() -> float:
    """$TTSCTL_POLL_SECONDS: how often the kubeflow backend polls job status (default 10 s)."""
    from controller.backends.kubeflow import POLL_S

    value = os.environ.get("TTSCTL_POLL_SECONDS")
    try:
        return float(value) if value else POLL_S
    except ValueError:
        raise BackendError(f"TTSCTL_POLL_SECONDS={value!r} is not a number of seconds") from None


def get_backend(name: str, namespace: str | None = None, echo: bool = True) -> Backend:
    if name == "local":
        from controller.backends.local import LocalBackend

        return LocalBackend(echo=echo)
    if name == "kubeflow":
        from controller.backends.kubeflow import KubeflowBackend

        return KubeflowBackend(namespace=namespace or context_namespace(), poll_s=poll_seconds())
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BackendError", "Phase", "RunSummary", "StageStatus", "get_backend"]
