"""Every Kubernetes object a pipeline needs, as typed client models or plain dicts / YAML.

Per stage, in run order: its ConfigMap, for RLHF the rollout Deployment, Service and NetworkPolicy,
then its PyTorchJob. Output is deterministic (no timestamps, fixed order) so `manifests/` can be
regenerated and diffed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient

from controller.plan import StageRun, build_plan
from controller.render import rollout
from controller.render.config_map import config_map
from controller.render.pytorchjob import pytorch_job
from controller.spec import PipelineSpec


@dataclass(frozen=True)
class StageObjects:
    """What one stage run submits; `rollout` holds the RLHF server objects (created before the job)."""

    run: StageRun
    config_map: Any
    job: Any
    rollout: tuple[Any, ...] = ()

    def all(self) -> list[Any]:
        return [self.config_map, *self.rollout, self.job]


def stage_objects(spec: PipelineSpec, run: StageRun) -> StageObjects:
    server = ()
    if run.step.stage.needs_rollout_server:
        server = (rollout.deployment(spec, run), rollout.service(spec, run), rollout.network_policy(spec, run))
    return StageObjects(run, config_map(spec, run), pytorch_job(spec, run), server)


def render(spec: PipelineSpec, names: list[str] | None = None) -> list[StageObjects]:
    return [stage_objects(spec, run) for run in build_plan(spec, names)]


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model -> the camelCase dict the API server takes (unset fields dropped)."""
    return ApiClient().sanitize_for_serialization(obj)


def render_dicts(spec: PipelineSpec, names: list[str] | None = None) -> list[dict[str, Any]]:
    return [to_dict(obj) for stage in render(spec, names) for obj in stage.all()]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the JSON configs in ConfigMaps stay readable)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def file_name(index: int, obj: dict[str, Any]) -> str:
    return f"{index:02d}-{obj['metadata']['name']}-{obj['kind'].lower()}.yaml"


def write_dir(objects: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One file per object, `NN-<name>-<kind>.yaml`; stale files from an earlier render are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / file_name(i, obj) for i, obj in enumerate(objects, start=1)]
    for old in out.glob("[0-9][0-9]-*.yaml"):
        if old not in paths:
            old.unlink()
    for path, obj in zip(paths, objects, strict=True):
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(to_yaml([obj]))
        tmp.replace(path)
    return paths
