"""The scalar log (metrics.jsonl) on remote storage: bounded, write-once uploads that readers concatenate."""

from __future__ import annotations

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from trainer.metrics import ScalarLog, read_scalars


class CountingMemoryFileSystem(MemoryFileSystem):
    """An in-memory object store of its own that records every write (path, bytes)."""

    protocol = "countingmem"
    store: dict = {}  # noqa: RUF012  (fsspec's MemoryFileSystem keeps its store on the class)
    pseudo_dirs = [""]  # noqa: RUF012
    writes: list[tuple[str, int]] = []  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("countingmem://"))

    def _open(self, path, mode="rb", *args, **kwargs):  # every write (pipe_file too) opens the object
        if "w" in mode or "a" in mode or "x" in mode:
            type(self).writes.append((self._strip_protocol(path), len(kwargs.get("data") or b"")))
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("countingmem", CountingMemoryFileSystem, clobber=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_remote_scalar_log_uploads_bounded_write_once_parts():
    CountingMemoryFileSystem.writes.clear()
    url = "countingmem://bucket/run/metrics.jsonl"
    clock = Clock()
    log = ScalarLog(url, "sft", flush_seconds=30.0, flush_lines=1000, clock=clock)
    for step in range(1, 1001):  # 10 steps a second for 100 s
        clock.now = step / 10
        log.log(step, loss=1.0 / step)
        if step == 400:  # 40 s in: what is visible lags at most one flush interval
            visible = [r["step"] for r in read_scalars(url)]
            assert visible == list(range(1, len(visible) + 1)) and 400 - 300 <= len(visible) < 400
    log.close()
    rows = read_scalars(url)
    assert [r["step"] for r in rows] == list(range(1, 1001))
    assert all(r["stage"] == "sft" for r in rows)

    paths = [path for path, _ in CountingMemoryFileSystem.writes]
    assert len(paths) == len(set(paths)), "an object was written twice (GCS: ~1 write/s per object)"
    assert len(paths) <= 100 / 30 + 2  # one per flush interval, plus the close
    uploaded = sum(size for _, size in CountingMemoryFileSystem.writes)
    assert uploaded == sum(len(CountingMemoryFileSystem.store[p].getvalue()) for p in paths)  # each line once

    # A burst faster than the interval flushes by line count; a restarted run appends after the last part.
    CountingMemoryFileSystem.writes.clear()
    again = ScalarLog(url, "sft", flush_seconds=30.0, flush_lines=50, clock=clock)
    for step in range(1001, 1121):
        again.log(step, loss=0.0)
    assert len(CountingMemoryFileSystem.writes) == 2
    again.close()
    assert [r["step"] for r in read_scalars(url)] == list(range(1, 1121))


def test_local_scalar_log_appends_lines(tmp_path):
    url = str(tmp_path / "run" / "metrics.jsonl")
    log = ScalarLog(url, "rlhf")
    log.log(1, reward=0.5)
    log.log(2, reward=0.75)
    assert [r["reward"] for r in read_scalars(url)] == [0.5, 0.75]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_server_listens_on_loopback_outside_kubernetes(tmp_path):
    """A laptop or CI run exposes nothing: the server binds 127.0.0.1 unless in a pod (or told otherwise)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import socket, sys; from trainer import metrics; metrics.serve(int(sys.argv[1])); "
              "print(open('/proc/net/tcp').read())")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    out = subprocess.run([sys.executable, "-c", script, str(port)], capture_output=True, text=True, env=env,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:] if len(line.split()) > 3]
    listening = [row[1] for row in rows if row[3] == "0A"]  # 0A: LISTEN
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, little-endian hex
    assert f"00000000:{port:04X}" not in listening
