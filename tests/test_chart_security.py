"""checkov over everything we ship to a cluster or a registry: the chart rendered with each values set
and images/*/Dockerfile. Run once per session (checkov takes seconds per invocation); every check it
reports is either passing or skipped with a reason in .checkov.yaml or inline (#checkov:skip=ID:reason)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from k8s_schemas.validate import REPO, helm_template, run, tool

CHART = REPO / "charts" / "tts-training"


@pytest.fixture(scope="session")
def checkov_report(tmp_path_factory) -> list[dict]:
    checkov = tool("checkov")
    scan = tmp_path_factory.mktemp("checkov")
    for values in [None, *sorted((CHART / "ci").glob("*-values.yaml"))]:
        text, _ = helm_template([values] if values else [])
        (scan / f"chart-{values.stem if values else 'default'}.yaml").write_text(text)
    shutil.copytree(REPO / "images", scan / "images")
    result = run([checkov, "--config-file", str(REPO / ".checkov.yaml"), "-d", str(scan), "-o", "json"],
                 cwd=scan)
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_scanned_the_chart_and_the_dockerfiles(checkov_report):
    scanned = {r["check_type"]: r["summary"] for r in checkov_report}
    assert {"kubernetes", "dockerfile"} <= set(scanned)
    assert all(s["passed"] > 0 for s in scanned.values())


def test_no_failed_checkov_check(checkov_report):
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for r in checkov_report for c in r["results"]["failed_checks"]]
    assert failed == []


def test_every_skip_has_a_reason(checkov_report):
    config = (REPO / ".checkov.yaml").read_text()
    listed = re.findall(r"^\s*- (CKV2?_\w+)\s*$", config, flags=re.M)
    assert listed, "no skip-check entries found"
    lines = config.splitlines()
    for check in listed:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        above = [line for line in lines[:index] if line.strip().startswith("#")]
        assert any(check in line for line in above), f"{check} is skipped without a reason comment"
    inline = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    assert inline, "the Dockerfiles' inline skips were not seen"
    for check in inline:
        reason = check["check_result"].get("suppress_comment", "")
        assert reason.strip(), f"{check['check_id']} skipped inline without a reason"
