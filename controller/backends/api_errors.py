"""Kubernetes API calls with errors a person can act on, and bounded retries for transient ones.

The kubeflow-training SDK wraps `ApiException` in RuntimeError (keeping it as the cause) and turns
request timeouts into TimeoutError; both paths are unwrapped here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from controller.backends.base import BackendError

INSTALL_OPERATOR = (
    "install the Kubeflow training operator v1 (it provides the PyTorchJob CRD): kubectl apply --server-side "
    '-k "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4"'
)
# Transient: throttling, server errors, gateway timeouts.
RETRY_STATUS = {429, 500, 502, 503, 504}


class NotFound(BackendError):
    """The named object does not exist (callers that expect this catch it)."""


class Conflict(BackendError):
    """The object already exists (409): callers attach to it or replace it."""


def _chain(err: BaseException) -> list[BaseException]:
    """The error and what it was raised from or during (the SDK re-raises without `from` at times)."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _api_exception(err: BaseException) -> ApiException | None:
    return next((e for e in _chain(err) if isinstance(e, ApiException)), None)


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body or "").get("message", "") or str(err.reason or "")
    except (ValueError, AttributeError):
        return str(err.body or err.reason or "").strip()


def _transient(err: BaseException) -> bool:
    if any(isinstance(e, (TimeoutError, urllib3.exceptions.HTTPError, ConnectionError)) for e in _chain(err)):
        return True
    api = _api_exception(err)
    if api is None:
        return False
    return api.status in RETRY_STATUS or api.status == 0  # 0: no HTTP response (connection dropped)


class ApiCaller:
    """`call(verb, resource, fn, *args)`: run one API call, classify its failure."""

    def __init__(self, namespace: str, attempts: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 16.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.namespace = namespace
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep

    def __call__(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if _transient(err) and attempt < self.attempts:
                    self.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
                    continue
                raise self._explain(verb, resource, err, attempt) from err
        raise AssertionError("unreachable")

    def _explain(self, verb: str, resource: str, err: Exception, attempts: int) -> BackendError:
        where = f"in namespace {self.namespace!r}"
        api = _api_exception(err)
        if api is None:
            if _transient(err):
                return BackendError(f"{verb} {resource} {where}: the API server did not answer after {attempts} "
                                    f"tries ({err}); check the cluster connection and retry")
            return BackendError(f"{verb} {resource} {where} failed: {err}")
        message = _api_message(api)
        if api.status == 404:
            if "namespaces" in message and "not found" in message:
                return BackendError(f"namespace {self.namespace!r} does not exist: create it "
                                    f"(kubectl create namespace {self.namespace}) or set cluster.namespace")
            if resource.startswith("pytorchjobs") and (verb in ("create", "list")
                                                       or "could not find the requested resource" in message
                                                       or "404 page not found" in message):
                return BackendError(f"the cluster has no PyTorchJob API (kubeflow.org/v1): {INSTALL_OPERATOR}")
            return NotFound(f"{resource} not found {where}: {message}")
        if api.status == 403:
            return BackendError(f"forbidden: you may not {verb} {resource} {where} ({message}). Ask a cluster "
                                f"admin for a Role that grants '{verb}' on '{resource}' (the Helm chart's RBAC "
                                f"has one), or check: kubectl auth can-i {verb} {resource} -n {self.namespace}")
        if api.status == 409:
            return Conflict(f"{resource} already exists {where}: {message}")
        if api.status == 401:
            return BackendError(f"unauthorized: the cluster rejected your credentials ({message}); refresh "
                                f"your kubeconfig login")
        if api.status == 422:
            return BackendError(f"the API server rejected the {resource} object: {message}")
        if api.status in RETRY_STATUS:
            return BackendError(f"{verb} {resource} {where}: the API server kept failing ({api.status} "
                                f"{message}) after {attempts} tries; retry later")
        return BackendError(f"{verb} {resource} {where} failed: {api.status} {message}")
