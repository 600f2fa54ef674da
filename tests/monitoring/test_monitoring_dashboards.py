"""Every query of every panel of every dashboard, evaluated by a real Prometheus over real scrapes of the
stages, with the template variables resolved as Grafana resolves them: each parses, and each returns
data in the window of the stage it watches (GPU panels: they parse; their DCGM series need a GPU node)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monitoring.conftest import NAMESPACE, RUN, Observed
from monitoring.prometheus import QueryError, finite_points
from test_dashboards import DCGM, PROMETHEUS, metric_names, panel_queries

pytestmark = pytest.mark.monitoring
REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "charts" / "tts-training" / "dashboards").glob("*.json"))
PUSHED = ""  # the stage of series pushed to the Pushgateway (they carry no stage label)
# The stages each dashboard watches (a panel's data must come from one of them).
WATCHES = {"training": {"sft", "codec"}, "rlhf": {"rlhf"}, "vectorize": {"vectorize", PUSHED}}
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def fill(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable interpolation: $name and ${name}."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


def resolve_variables(board: dict, observed: Observed) -> dict[str, str]:
    """The dashboard's query variables in order, each from Prometheus' label values API (what Grafana's
    `label_values(metric{...}, label)` calls); our run must be among the choices."""
    rate = int(4 * observed.scrape_s)  # Grafana: $__rate_interval = max(4 x scrape interval, interval + scrape)
    variables = {"__rate_interval": f"{rate}s", "datasource": "prometheus"}
    expected = {"namespace": NAMESPACE, "run": RUN}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["query"]["query"])
        assert match, f"${variable['name']}: not a label_values() query"
        selector, label = fill(match.group(1), variables), match.group(2)
        choices = observed.prometheus.label_values(label, selector, observed.start, observed.end)
        assert expected[variable["name"]] in choices, f"${variable['name']} offers {choices}"
        variables[variable["name"]] = expected[variable["name"]]
    return variables


def exporting_stages(observed: Observed, names: set[str]) -> set[str]:
    """Stages whose scrapes held any of `names` for our run (PUSHED: from the Pushgateway)."""
    span = int(observed.end - observed.start) + 60
    stages = set()
    for name in names:
        result = observed.prometheus.query(
            f'count by (stage) (last_over_time({{__name__="{name}", run=~"{RUN}|"}}[{span}s]))', observed.end)
        stages |= {series["metric"].get("stage", PUSHED) for series in result}
    return stages


def window(observed: Observed, stage: str) -> tuple[float, float]:
    return (observed.pushed_at, observed.end) if stage == PUSHED else observed.window(stage)


def grouping_labels(expr: str) -> set[str]:
    """Labels an aggregation groups by (each must be on the series it returns; `le` is consumed by
    histogram_quantile)."""
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",")
            if label.strip()} - {"le"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_returns_data_for_the_stage_it_watches(path, observed):
    board = json.loads(path.read_text())
    variables = resolve_variables(board, observed)
    prometheus = observed.prometheus
    problems, checked = [], 0
    for title, expr in panel_queries(board):
        if title.startswith("$"):
            continue  # the variables, resolved above
        query = fill(expr, variables)
        names = metric_names(expr) - PROMETHEUS
        try:  # Prometheus parses and runs it (HTTP 400/422 otherwise)
            prometheus.query_range(query, observed.start, observed.end)
        except QueryError as err:
            problems.append(f"{title}: does not run: {err}")
            continue
        if names <= DCGM:
            continue  # GPU panels: DCGM exporter series exist only on GPU nodes; the query parsed
        stages = exporting_stages(observed, names) & WATCHES[path.stem]
        if not stages:
            problems.append(f"{title}: no {sorted(WATCHES[path.stem])} stage exports {sorted(names)}")
            continue
        for stage in sorted(stages):
            start, end = window(observed, stage)
            result = prometheus.query_range(query, start, end)
            if not finite_points(result):
                problems.append(f"{title}: no data during {stage or 'the Pushgateway push'}: {query}")
            missing = {label for series in result for label in grouping_labels(expr) - series["metric"].keys()}
            if missing:
                problems.append(f"{title}: series lack the labels it groups by: {sorted(missing)}")
            checked += 1
    assert problems == [], "\n".join(problems)
    assert checked >= 5


def test_the_monitors_give_every_target_the_labels_the_dashboards_select_on(observed):
    """Each scraped target of our run (the PodMonitor's trainer pods, the ServiceMonitor's rollout server)
    carries every label a dashboard query matches on, with the run's values."""
    selected = set()
    for path in DASHBOARDS:
        for _, expr in panel_queries(json.loads(path.read_text())):
            selected |= set(re.findall(r'(\w+)\s*=~?\s*"\$', expr))
    assert {"namespace", "run"} <= selected
    targets = [t["labels"] for t in observed.prometheus.targets() if t["labels"].get("job") != "pushgateway"]
    ours = [labels for labels in targets if labels.get("run") == RUN]
    assert len(ours) == 5  # codec, vectorize, sft and rlhf pods, the rollout server
    for labels in ours:
        assert {"namespace", "run", "stage", "pod"} <= labels.keys(), labels
        assert labels["namespace"] == NAMESPACE
    assert {labels["stage"] for labels in ours} == {"codec", "vectorize", "sft", "rlhf"}
    (rollout,) = [labels for labels in ours if labels.get("service")]
    assert rollout["stage"] == "rlhf" and rollout["endpoint"] == "http"
