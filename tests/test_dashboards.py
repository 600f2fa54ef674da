"""Grafana dashboards query only metrics that exist: names the trainer exports (found by scanning
trainer/**/*.py for prometheus_client metric definitions, with the suffixes the client adds) or the
documented DCGM-exporter / vLLM names. A panel querying a name nobody exports fails here."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "charts" / "tts-training" / "dashboards").glob("*.json"))

# What prometheus_client exposes for a metric defined as NAME (besides `_created` samples).
SUFFIXES = {
    "Counter": ("_total",),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("", "_sum", "_count"),
    "Info": ("_info",),
    "Enum": ("",),
}
# NVIDIA dcgm-exporter default and profiling counters (etc/default-counters.csv, dcp-metrics-included.csv).
DCGM = {
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_RESERVED", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES",
}
# vLLM's Prometheus names (0.8.5, 0.10.x, and 0.32 where tests/monitoring scrapes a real server; gpu_cache_usage_perc
# is the pre-0.9 name of kv_cache_usage_perc).
VLLM_GAUGES = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:gpu_cache_usage_perc"}
VLLM_COUNTERS = {"vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions"}
VLLM_HISTOGRAMS = {"vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"}
VLLM = (VLLM_GAUGES | {f"{n}_total" for n in VLLM_COUNTERS}
        | {f"{n}{s}" for n in VLLM_HISTOGRAMS for s in SUFFIXES["Histogram"]})
PROMETHEUS = {"up"}  # per-target series Prometheus writes itself

# The metric names the stages promised (issue contract); speechlm_codec_* is a family.
CONTRACT = [
    "speechlm_train_loss", "speechlm_train_tokens_total", "speechlm_train_steps_total",
    "speechlm_train_learning_rate", "speechlm_train_step_duration_seconds", "speechlm_train_tokens_per_second",
    "speechlm_train_mfu", "speechlm_eval_loss", "speechlm_checkpoint_last_success_timestamp_seconds",
    "speechlm_rl_reward", "speechlm_rl_rollout_duration_seconds", "speechlm_rl_weight_sync_duration_seconds",
    "speechlm_rl_steps_total", "speechlm_vectorize_items_total", "speechlm_vectorize_audio_seconds_total",
]

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def defined_metrics(root: Path) -> dict[str, str]:
    """{base name: metric type} of every prometheus_client metric constructed in `root`/**/*.py."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if kind not in SUFFIXES:
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            name_node = node.args[0] if node.args else keywords.get("name")
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            parts = [keywords[k].value for k in ("namespace", "subsystem")
                     if isinstance(keywords.get(k), ast.Constant) and keywords[k].value]
            name = "_".join([*parts, name_node.value])
            if kind == "Counter":  # the client strips a trailing _total and adds it back on exposition
                name = name.removesuffix("_total")
            found[name] = kind
    return found


def exported_names(root: Path) -> set[str]:
    return {base + suffix for base, kind in defined_metrics(root).items() for suffix in SUFFIXES[kind]}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {} or by/on/... lists), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\blabel_values\((.*),\s*\w+\)", r"label_values(\1)", expr)  # Grafana: (metric, label)
    # label lists; an aggregation's `by (...)` leaves the aggregator followed by "(", like a function
    expr = re.sub(r"\s*\b(by|without)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b(on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][-+]?\d+)?(ms|[smhdwy])?", "", expr)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        following = expr[match.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def panel_queries(board: dict) -> list[tuple[str, str]]:
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append((f"${variable['name']}", query["query"]))
    return queries


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names(REPO / "trainer")


def test_scanner_applies_client_suffixes(tmp_path):
    (tmp_path / "m.py").write_text(
        "from prometheus_client import Counter, Gauge, Histogram\n"
        "import prometheus_client as pc\n"
        "A = Counter('a_total', 'x')\nB = Histogram(name='b_seconds', documentation='x')\n"
        "C = pc.Gauge('c', 'x', namespace='ns')\nD = Gauge(NAME, 'computed names are not guessed')\n"
    )
    assert exported_names(tmp_path) == {"a_total", "b_seconds_bucket", "b_seconds_sum", "b_seconds_count", "ns_c"}


def test_promql_parser_finds_only_metric_names():
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(x_bucket{run="$run", a=~"b|c"}[$__rate_interval])))'
            ' / on (namespace, pod) group_left () max by (pod) (vllm:kv_cache_usage_perc offset 5m) + time()')
    assert metric_names(expr) == {"x_bucket", "vllm:kv_cache_usage_perc"}


# The Grafana releases the dashboards are written for (README, Monitoring): schemaVersion 39 is what
# Grafana 10.4 and 11.x write (12.x migrates it on load); the panel types are core panels of all of them.
SCHEMA_VERSION = 39
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table"}
GRID_COLUMNS = 24


def grafana_model_errors(board: dict) -> list[str]:
    """What Grafana would reject or show broken: the dashboard JSON model's required fields, a Prometheus
    data source chosen through the `datasource` variable everywhere, panels on the 24-column grid without
    overlap, every non-row panel with at least one query, refIds unique per panel."""
    errors = []
    if board.get("schemaVersion") != SCHEMA_VERSION:
        errors.append(f"schemaVersion {board.get('schemaVersion')} (written for {SCHEMA_VERSION})")
    for key in ("uid", "title", "panels", "templating", "time"):
        if key not in board:
            errors.append(f"no {key}")
    variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if (source.get("type"), source.get("query")) != ("datasource", "prometheus"):
        errors.append("no `datasource` variable of type datasource/prometheus")
    ours = {"type": "prometheus", "uid": "${datasource}"}
    for variable in variables.values():
        if variable["type"] == "query" and variable.get("datasource") != ours:
            errors.append(f"${variable['name']}: not on the ${{datasource}} variable")
    cells: dict[tuple[int, int], str] = {}
    for panel in board.get("panels", []):
        title = panel.get("title", f"panel {panel.get('id')}")
        if panel.get("type") not in PANEL_TYPES:
            errors.append(f"{title}: panel type {panel.get('type')!r}")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > GRID_COLUMNS:
            errors.append(f"{title}: gridPos {grid}")
            continue
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    errors.append(f"{title}: overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = title
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        if not targets or not all(t.get("expr", "").strip() for t in targets):
            errors.append(f"{title}: a panel without a query")
        if panel.get("datasource") != ours or any(t.get("datasource", ours) != ours for t in targets):
            errors.append(f"{title}: not on the ${{datasource}} variable")
        ref_ids = [t.get("refId") for t in targets]
        if None in ref_ids or len(set(ref_ids)) != len(ref_ids):
            errors.append(f"{title}: refIds {ref_ids}")
    return errors


def test_dashboards_are_grafana_json():
    assert {p.stem for p in DASHBOARDS} == {"training", "rlhf", "vectorize"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        assert {"datasource", "namespace", "run"} <= {v["name"] for v in board["templating"]["list"]}
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        assert grafana_model_errors(board) == [], path.name


def test_the_grafana_check_catches_broken_boards():
    board = json.loads((REPO / "charts" / "tts-training" / "dashboards" / "vectorize.json").read_text())
    broken = json.loads(json.dumps(board))
    panel = next(p for p in broken["panels"] if p["type"] != "row")
    panel["targets"] = []
    broken["panels"][-1]["gridPos"] = dict(broken["panels"][0]["gridPos"])  # stacked on the first panel
    broken["schemaVersion"] = 16
    errors = grafana_model_errors(broken)
    assert any("without a query" in e for e in errors)
    assert any("overlaps" in e for e in errors)
    assert any("schemaVersion" in e for e in errors)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_queried_metric_is_exported(path, exported):
    known = exported | DCGM | VLLM | PROMETHEUS
    board = json.loads(path.read_text())
    unknown = {f"{title}: {name}" for title, expr in panel_queries(board) for name in metric_names(expr)
               if name not in known}
    assert unknown == set(), "dashboards query metrics nobody exports"


def test_dashboards_cover_the_metric_contract(exported):
    queried = {name for path in DASHBOARDS for _, expr in panel_queries(json.loads(path.read_text()))
               for name in metric_names(expr)}
    for name in CONTRACT:
        assert any(q == name or q.startswith(f"{name}_") for q in queried), f"no panel shows {name}"
    assert any(q.startswith("speechlm_codec_") for q in queried)


def test_contract_metrics_are_exported_by_the_trainer(exported):
    missing = [n for n in CONTRACT if not any(e == n or e.startswith(f"{n}_") for e in exported)]
    assert missing == []


def test_dcgm_panels_join_on_pod_with_run_targets():
    board = json.loads((REPO / "charts" / "tts-training" / "dashboards" / "training.json").read_text())
    gpu = [expr for _, expr in panel_queries(board) if "DCGM_" in expr]
    assert len(gpu) >= 2
    for expr in gpu:
        assert "on (namespace, pod)" in expr and 'up{namespace="$namespace", run="$run"}' in expr
