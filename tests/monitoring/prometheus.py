"""Debian's Prometheus and Pushgateway as child processes on 127.0.0.1, and the HTTP API calls the suite
makes (the ones Grafana's Prometheus data source makes: instant and range queries, label values)."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from trainer.serve.vllm_server import free_port

REPO = Path(__file__).resolve().parents[2]


def install() -> Path:
    """The directory of prometheus, promtool and prometheus-pushgateway (unpacked once into ~/.cache)."""
    out = subprocess.run(["bash", str(REPO / ".ci" / "install-prometheus.sh")], capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip().splitlines()[-1])


class QueryError(AssertionError):
    pass


class _Server:
    """A child process serving HTTP on 127.0.0.1:`port`, ready when `ready_path` answers 200."""

    ready_path = "/-/ready"

    def __init__(self, command: list[str], port: int, log: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{command[0]} not ready on {self.url}: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Pushgateway(_Server):
    def __init__(self, bin_dir: Path, workdir: Path):
        port = free_port()
        super().__init__([str(bin_dir / "prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                         port, workdir / "pushgateway.log")


class Prometheus(_Server):
    """Prometheus with `config` (a prometheus.yml dict) and `rule_files`, storage under `workdir`."""

    def __init__(self, bin_dir: Path, workdir: Path, config: dict[str, Any]):
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        super().__init__([str(bin_dir / "prometheus"), f"--config.file={self.config_path}",
                          f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                          "--log.level=warn"], port, workdir / "prometheus.log")

    def _get(self, route: str, params: list[tuple[str, str]]) -> Any:
        url = f"{self.url}/api/v1/{route}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400: the expression does not parse; 422: it cannot run
            body = json.loads(err.read())
        if body.get("status") != "success":
            raise QueryError(f"{route} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self._get("query", [("query", expr), ("time", f"{at:.3f}")])["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self._get("query_range", [("query", expr), ("start", f"{start:.3f}"), ("end", f"{end:.3f}"),
                                         ("step", str(step))])["result"]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        """Grafana's `label_values(match, label)`."""
        return self._get(f"label/{label}/values", [("match[]", match), ("start", f"{start:.3f}"),
                                                   ("end", f"{end:.3f}")])

    def targets(self) -> list[dict[str, Any]]:
        return self._get("targets", [("state", "active")])["activeTargets"]


def finite_points(result: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(time, value) of every non-NaN sample of a range query's series."""
    points = []
    for series in result:
        for at, value in series.get("values", []):
            if not math.isnan(float(value)):
                points.append((float(at), float(value)))
    return points
