"""manifests/ is exactly what `ttsctl render example/pipeline.yaml -o manifests/` writes (regenerate with
that command when this fails), and every object in it is valid for the API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_schemas.validate import REPO, all_errors, yamllint_errors

from controller.cli import main as ttsctl

MANIFESTS = REPO / "manifests"
SPEC = REPO / "example" / "pipeline.yaml"
REGENERATE = "ttsctl render example/pipeline.yaml -o manifests/"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifests")
    assert ttsctl(["render", str(SPEC), "-o", str(out)]) == 0
    return out


def committed() -> list[Path]:
    return sorted(MANIFESTS.glob("*.yaml"))


def test_manifests_match_the_renderer(fresh):
    rendered = {p.name: p.read_text() for p in sorted(fresh.glob("*.yaml"))}
    ours = {p.name: p.read_text() for p in committed()}
    assert rendered, "the renderer wrote nothing"
    assert sorted(ours) == sorted(rendered), f"manifests/ lists other files than the renderer; run: {REGENERATE}"
    stale = [name for name in rendered if ours[name] != rendered[name]]
    assert stale == [], f"manifests/ drifted from the renderer; run: {REGENERATE}"


def test_every_manifest_is_valid():
    objects = [doc for path in committed() for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert objects
    assert all_errors(objects) == []
    kinds = {o["kind"] for o in objects}
    assert {"PyTorchJob", "ConfigMap", "Deployment", "Service", "NetworkPolicy"} <= kinds


def test_one_object_per_file_in_run_order():
    names = []
    for path in committed():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, path.name
        names.append(docs[0]["metadata"]["name"])
    jobs = [n for p, n in zip(committed(), names, strict=True) if p.name.endswith("-pytorchjob.yaml")]
    stages = ["codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"]
    assert jobs == [f"demo-{s}" for s in stages]


def test_manifests_pass_yamllint():
    assert yamllint_errors(committed()) == ""
