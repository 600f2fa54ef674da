"""The chart's alerting rules: promtool accepts them, and the real Prometheus that scraped the runs fires
each one on the run that should fire it and on no run that should not."""

from __future__ import annotations

import subprocess

import pytest
from monitoring.conftest import DIVERGED, RUN, Observed

pytestmark = pytest.mark.monitoring


def firing(observed: Observed, alert: str, start: float, end: float, **labels: str) -> list[dict]:
    """The firing ALERTS series of `alert` with `labels`, between start and end."""
    matchers = "".join(f', {k}="{v}"' for k, v in labels.items())
    return observed.prometheus.query_range(f'ALERTS{{alertname="{alert}", alertstate="firing"{matchers}}}',
                                           start, end)


def test_promtool_accepts_the_rules_and_the_scrape_config(observed):
    rules = subprocess.run([str(observed.promtool), "check", "rules", "--lint-fatal", str(observed.rules_file)],
                           capture_output=True, text=True)
    assert rules.returncode == 0 and not rules.stderr, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout  # 3 alerts x 2 releases
    config = subprocess.run([str(observed.promtool), "check", "config", str(observed.prometheus.config_path)],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_a_nan_loss_fires_for_the_diverged_run_only(observed):
    start, end = observed.window("sft", DIVERGED)
    fired = firing(observed, "TTSLossNotFinite", start, end + 5, run=DIVERGED)
    assert fired and fired[0]["metric"]["stage"] == "sft"
    assert firing(observed, "TTSLossNotFinite", observed.start, observed.end, run=RUN) == []


def test_a_vanished_rollout_server_fires_rollout_down_and_stalled(observed):
    killed, (_, trainer_end) = observed.server_killed_at, observed.window("rlhf")
    down = firing(observed, "TTSRolloutServerDown", killed, trainer_end, run=RUN)
    assert down, "the trainer waited for a dead rollout server and nobody was told"
    stalled = firing(observed, "TTSStageStalled", killed, trainer_end, run=RUN)
    assert [s["metric"]["stage"] for s in stalled] == ["rlhf"]


def test_healthy_stages_fire_nothing(observed):
    """Up to the kill every stage of the run made progress with a finite loss and a live server."""
    for alert in ("TTSStageStalled", "TTSRolloutServerDown", "TTSLossNotFinite"):
        fired = firing(observed, alert, observed.start, observed.server_killed_at, run=RUN)
        assert fired == [], f"{alert}: {[(f['metric'], f['values'][0][0] - observed.start) for f in fired]}"
