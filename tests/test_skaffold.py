"""skaffold.yaml: valid against the vendored skaffold/v4beta13 schema (itself and with each profile
applied), artifacts that exist, and built images wired into the chart values that the chart renders."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_schemas.validate import REPO, SCHEMAS, helm_template

CONFIG = yaml.safe_load((REPO / "skaffold.yaml").read_text())
PROFILES = {p["name"]: p for p in CONFIG["profiles"]}


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "skaffold-v4beta13.json").read_text()))


def with_profile(name: str) -> dict[str, Any]:
    """The config as skaffold sees it with `-p name`: JSON-patch replaces, then section overrides."""
    config = copy.deepcopy(CONFIG)
    profile = PROFILES[name]
    for patch in profile.get("patches", []):
        assert patch["op"] == "replace"
        *parents, leaf = patch["path"].strip("/").split("/")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert leaf in node, f"{name}: {patch['path']} does not exist"
        node[leaf] = patch["value"]
    for section in ("build", "deploy", "portForward"):
        if section in profile:
            config[section] = profile[section]
    return config


def test_api_version_is_v4beta13():
    # the schema types apiVersion as a free string: check it here
    assert CONFIG["apiVersion"] == "skaffold/v4beta13" and CONFIG["kind"] == "Config"


@pytest.mark.parametrize("profile", [None, "cuda124", "cuda128", "cpu"])
def test_valid_against_the_schema(profile):
    config = with_profile(profile) if profile else CONFIG
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(config)]
    assert errors == []


def test_schema_catches_a_typo():
    broken = copy.deepcopy(CONFIG)
    broken["build"]["artifacts"][0]["docker"]["dockerFile"] = "x"
    assert list(validator().iter_errors(broken))


def test_profiles_and_artifacts():
    assert set(PROFILES) == {"cuda124", "cuda128", "cpu"}
    images = {a["image"]: a for a in CONFIG["build"]["artifacts"]}
    assert set(images) == {"tts-trainer", "tts-rollout", "tts-rollout-trl", "tts-cpu"}
    for artifact in images.values():
        assert (REPO / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    cpu_build = with_profile("cpu")["build"]["artifacts"]
    assert [a["image"] for a in cpu_build] == ["tts-cpu", "tts-rollout-cpu"]


def _template_key(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", image)


@pytest.mark.parametrize("profile", [None, "cpu"])
def test_built_images_are_wired_into_the_chart(profile, tmp_path):
    config = with_profile(profile) if profile else CONFIG
    built = {a["image"] for a in config["build"]["artifacts"]}
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file()
    templates = release["setValueTemplates"]
    for value in templates.values():
        for name in re.findall(r"\{\{\.IMAGE_(?:REPO|TAG|DIGEST)_(\w+)\}\}", value):
            assert name in {_template_key(b) for b in built}, f"{value} names no built artifact"
    # Fill the templates as skaffold would and check the chart renders those images.
    fake = {}
    for key, value in templates.items():
        filled = re.sub(r"\{\{\.IMAGE_REPO_(\w+)\}\}", r"registry.test/\1", value)
        filled = re.sub(r"\{\{\.IMAGE_TAG_\w+\}\}", "abc123", filled)
        fake[key] = re.sub(r"\{\{\.IMAGE_DIGEST_\w+\}\}", "sha256:" + "0" * 64, filled)
    values = {}
    for key, value in fake.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "skaffold-values.yaml"
    path.write_text(yaml.safe_dump(values))
    files = [REPO / f for f in release.get("valuesFiles", [])] + [path]
    _, objects = helm_template(files, release=release["name"], namespace=release["namespace"])
    images = {c["image"] for o in objects if o["kind"] == "PyTorchJob"
              for r in o["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]}
    trainer = "tts_cpu" if profile == "cpu" else "tts_trainer"
    expected = f"registry.test/{trainer}:abc123" + ("" if profile == "cpu" else "@sha256:" + "0" * 64)
    assert images == {expected}
