"""A pipeline spec -> the ordered stage runs, each with its resolved trainer config.

The steps, their order, what each publishes and how each is wired to the outputs of the steps before
it are the stage registry's (trainer/stages.py); here the spec decides which run and with what settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.spec import PipelineSpec, StageSpec
from trainer.config import TrainerConfig, load_config
from trainer.errors import ConfigError
from trainer.stages import STEP_ORDER, STEPS, RunLayout, Step, Wiring


@dataclass(frozen=True)
class StageRun:
    step: Step  # the registry's step: name, `tts-train` stage, outputs
    settings: StageSpec  # nodes, GPUs, resources, env from the spec
    config: TrainerConfig  # resolved: chaining keys set, validated
    # Skip the run when this directory is complete (a previously trained codec).
    skip_if_complete: str | None = None

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def trainer_stage(self) -> str:
        return self.step.stage.name

    @property
    def config_file(self) -> str:
        return f"{self.name}.json"


def layout_of(spec: PipelineSpec) -> RunLayout:
    return RunLayout(spec.storage.data, spec.storage.checkpoints, spec.storage.outputs)


def stage_settings(spec: PipelineSpec, name: str) -> StageSpec:
    return getattr(spec.stages, STEPS[name].spec_key)


def enabled_stages(spec: PipelineSpec) -> list[str]:
    def on(name: str) -> bool:
        step = STEPS[name]
        return stage_settings(spec, name).enabled and (step.source is None or on(step.source))

    return [name for name in STEP_ORDER if on(name)]


def select_stages(spec: PipelineSpec, only: list[str] | None = None, start: str | None = None) -> list[str]:
    """Enabled stages, restricted to `only` and/or those from `start` on (in run order)."""
    names = enabled_stages(spec)
    for name in [*(only or []), *([start] if start else [])]:
        if name not in STEP_ORDER:
            raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STEP_ORDER)}")
        if name not in names:
            raise ConfigError(f"stage {name!r} is disabled in the spec (enabled stages: {', '.join(names)})")
    if start:
        names = names[names.index(start) :]
    if only:
        names = [n for n in names if n in only]
    return names


def build_plan(spec: PipelineSpec, names: list[str] | None = None) -> list[StageRun]:
    """Stage runs for `names` (default: every enabled stage), configs resolved and validated."""
    names = enabled_stages(spec) if names is None else names
    return [_stage_run(spec, name) for name in names]


def codec_path(spec: PipelineSpec, enabled: frozenset[str], configured: str | None) -> str:
    """The codec a stage uses: the trained one, else the spec's, else the stage config's own."""
    if "codec" in enabled:
        return layout_of(spec).output("codec")
    path = spec.codec_model_path or configured
    if not path:
        raise ConfigError(
            "no codec: enable stages.codec, or set codec_model_path in the spec (or in the stage config)"
        )
    return path


def _load_stage_config(spec: PipelineSpec, name: str) -> TrainerConfig:
    settings = stage_settings(spec, name)
    where = f"stages.{STEPS[name].spec_key}.config"
    try:
        if isinstance(settings.config, str):
            path = Path(settings.config)
            path = path if path.is_absolute() or "://" in settings.config else spec.base_dir / path
            return load_config(path, settings.overrides)
        return load_config(None, settings.overrides, data=settings.config or {})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _stage_run(spec: PipelineSpec, name: str) -> StageRun:
    step, settings = STEPS[name], stage_settings(spec, name)
    config = _load_stage_config(spec, name)
    layout = layout_of(spec)
    enabled = frozenset(enabled_stages(spec))
    wiring = Wiring(layout, enabled, lambda configured: codec_path(spec, enabled, configured))
    try:
        step.wire(config, wiring)
    except ConfigError as err:
        raise ConfigError(f"stage {name}: {err}") from None
    skip = layout.output(name) if getattr(settings, "skip_if_exists", False) else None
    return StageRun(step, settings, config, skip)
