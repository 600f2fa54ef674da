"""Observability shared by the stages: a Prometheus endpoint on rank 0, an optional Pushgateway push,
and a JSONL log of scalars per step (the eval report plots loss and reward curves from it).

Metric names start with `speechlm_`; labels are bounded (stage, split, status, reward_fn), never ids.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, push_to_gateway, start_http_server

from trainer import distributed, io

log = logging.getLogger(__name__)
_server_started = False
PARTS_SUFFIX = ".parts"  # remote scalar logs: <url>.parts/<NNNNNN>.jsonl


def serve(port: int, address: str | None = None) -> None:
    """Expose the default registry on `port` from rank 0 only (0 disables); `address` None: every
    interface in a Kubernetes pod, loopback elsewhere."""
    global _server_started
    if port <= 0 or not distributed.is_main() or _server_started:
        return
    if address is None:
        address = "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"
    try:
        start_http_server(port, addr=address)
        _server_started = True
        log.info("prometheus metrics on %s:%d/metrics", address, port)
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

    Local files are appended line by line. Object stores have no append, and rewriting the whole log on
    every step uploads O(steps^2) bytes and writes one object faster than GCS allows (about once a
    second). So remote lines are buffered and flushed every `flush_seconds`, when `flush_lines` are
    pending, and on `close` (also at exit), each flush a new write-once object
    `<url>.parts/<NNNNNN>.jsonl` holding just the new lines; `read_scalars` concatenates them.
    A restarted run continues after the last part.
    """

    def __init__(self, url: str, stage: str, flush_seconds: float = 30.0, flush_lines: int = 1000,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.stage = stage
        self.flush_seconds = flush_seconds
        self.flush_lines = flush_lines
        self._clock = clock
        self._pending: list[str] = []
        self._enabled = distributed.is_main()
        self._remote = not io.is_local(url)
        self._next_part = 0
        if self._enabled and self._remote:
            self._next_part = max((n + 1 for n, _ in _parts(url)), default=0)
            self._last_flush = clock()
            atexit.register(self.close)

    def log(self, step: int, **scalars: Any) -> None:
        if not self._enabled:
            return
        line = json.dumps({"stage": self.stage, "step": step, "time": time.time(), **scalars})
        if self._remote:
            self._pending.append(line)
            if len(self._pending) >= self.flush_lines or self._clock() - self._last_flush >= self.flush_seconds:
                self.flush()
            return
        path = Path(io.local_path(self.url))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")

    def flush(self) -> None:
        """Upload the pending lines as the next part (no-op when none are pending)."""
        if not self._pending:
            return
        io.write_text_atomic(_part_url(self.url, self._next_part), "\n".join(self._pending) + "\n")
        self._next_part += 1
        self._pending = []
        self._last_flush = self._clock()

    def close(self) -> None:
        self.flush()


def _part_url(url: str, number: int) -> str:
    return io.join(url + PARTS_SUFFIX, f"{number:06d}.jsonl")


def _parts(url: str) -> list[tuple[int, str]]:
    """(number, url) of the log's part objects, in order."""
    folder = url + PARTS_SUFFIX
    return sorted((int(name.split(".")[0]), io.join(folder, name)) for name in io.listdir(folder)
                  if name.split(".")[0].isdigit())


def read_scalars(url: str) -> list[dict[str, Any]]:
    """Every row of a scalar log: the plain file's, then its parts' (remote logs), in order."""
    texts = [io.read_text(url)] if io.exists(url) else []
    texts += [io.read_text(part) for _, part in _parts(url)]
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
