"""Observability shared by the stages: a Prometheus endpoint on rank 0, an optional Pushgateway push,
and a JSONL log of scalars per step (the eval report plots loss and reward curves from it).

Metric names start with `speechlm_`; labels are bounded (stage, split, status, reward_fn), never ids.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, push_to_gateway, start_http_server

from trainer import distributed, io

log = logging.getLogger(__name__)
_server_started = False


def serve(port: int) -> None:
    """Expose the default registry on `port` from rank 0 only (0 disables)."""
    global _server_started
    if port <= 0 or not distributed.is_main() or _server_started:
        return
    try:
        start_http_server(port)
        _server_started = True
        log.info("prometheus metrics on :%d/metrics", port)
    except OSError as err:  # a busy port must not kill a training run
        log.warning("metrics server not started on port %d: %s", port, err)


def push(gateway_url: str | None, job: str, registry: CollectorRegistry = REGISTRY) -> None:
    if not gateway_url:
        return
    try:
        push_to_gateway(gateway_url, job=job, registry=registry)
    except OSError as err:
        log.warning("pushgateway %s unreachable: %s", gateway_url, err)


class ScalarLog:
    """Append-only JSONL of {"stage", "step", "time", **scalars}, written by rank 0.

    Local files are appended line by line; remote URLs are rewritten whole on each flush (object
    stores have no append), which is fine at logging cadence.
    """

    def __init__(self, url: str, stage: str):
        self.url = url
        self.stage = stage
        self._lines: list[str] = []
        self._enabled = distributed.is_main()
        if self._enabled and not io.is_local(url) and io.exists(url):
            self._lines = io.read_text(url).splitlines()

    def log(self, step: int, **scalars: Any) -> None:
        if not self._enabled:
            return
        line = json.dumps({"stage": self.stage, "step": step, "time": time.time(), **scalars})
        if io.is_local(self.url):
            path = Path(io.local_path(self.url))
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(line + "\n")
        else:
            self._lines.append(line)
            io.write_text_atomic(self.url, "\n".join(self._lines) + "\n")


def read_scalars(url: str) -> list[dict[str, Any]]:
    if not io.exists(url):
        return []
    return [json.loads(line) for line in io.read_text(url).splitlines() if line.strip()]
