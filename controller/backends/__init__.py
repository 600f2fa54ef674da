"""Where stage runs execute: `local` processes or Kubeflow `PyTorchJob`s, behind one interface."""

from __future__ import annotations

from controller.backends.base import Backend, BackendError, Phase, RunSummary, StageStatus

BACKENDS = ("local", "kubeflow")


def get_backend(name: str, namespace: str | None = None, echo: bool = True) -> Backend:
    if name == "local":
        from controller.backends.local import LocalBackend

        return LocalBackend(echo=echo)
    if name == "kubeflow":
        from controller.backends.kubeflow import KubeflowBackend

        return KubeflowBackend(namespace=namespace or "default")
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BackendError", "Phase", "RunSummary", "StageStatus", "get_backend"]
