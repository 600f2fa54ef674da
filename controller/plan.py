"""A pipeline spec -> the ordered stage runs, each with its resolved trainer config.

Run order (each waits for the previous and reads its outputs):

    codec -> vectorize -> merge -> sft -> export-sft -> rlhf -> export-rlhf -> eval

`export-<src>` runs whenever `<src>` runs (RLHF starts from the exported SFT model, eval reads the
exported RLHF model, or the SFT one when RLHF is disabled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.layout import RunLayout
from controller.spec import PipelineSpec, StageSpec
from trainer.config import TrainerConfig, load_config
from trainer.errors import ConfigError

STAGE_ORDER = ("codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval")

# Stage run -> `tts-train` stage.
TRAINER_STAGES = {
    "codec": "codec-train",
    "vectorize": "vectorize",
    "merge": "merge",
    "sft": "sft",
    "export-sft": "export",
    "rlhf": "rlhf",
    "export-rlhf": "export",
    "eval": "eval",
}


@dataclass(frozen=True)
class StageRun:
    name: str  # stage run name, one of STAGE_ORDER
    trainer_stage: str  # `tts-train` subcommand
    settings: StageSpec  # nodes, GPUs, resources, env from the spec
    config: TrainerConfig  # resolved: chaining keys set, validated
    # Skip the run when this directory is complete (a previously trained codec).
    skip_if_complete: str | None = None

    @property
    def config_file(self) -> str:
        return f"{self.name}.json"


def layout_of(spec: PipelineSpec) -> RunLayout:
    return RunLayout(spec.storage.data, spec.storage.checkpoints, spec.storage.outputs)


def stage_settings(spec: PipelineSpec, name: str) -> StageSpec:
    key = "export" if name.startswith("export-") else name
    return getattr(spec.stages, key)


def enabled_stages(spec: PipelineSpec) -> list[str]:
    names = []
    for name in STAGE_ORDER:
        if name.startswith("export-"):
            source = name.removeprefix("export-")
            if stage_settings(spec, source).enabled and spec.stages.export.enabled:
                names.append(name)
        elif stage_settings(spec, name).enabled:
            names.append(name)
    return names


def select_stages(spec: PipelineSpec, only: list[str] | None = None, start: str | None = None) -> list[str]:
    """Enabled stages, restricted to `only` and/or those from `start` on (in run order)."""
    names = enabled_stages(spec)
    for name in [*(only or []), *([start] if start else [])]:
        if name not in STAGE_ORDER:
            raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
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


def codec_path(spec: PipelineSpec, config: TrainerConfig, configured: str | None) -> str:
    """The codec a stage uses: the trained one, else the spec's, else the stage config's own."""
    if spec.stages.codec.enabled:
        return layout_of(spec).codec_final
    path = spec.codec_model_path or configured
    if not path:
        raise ConfigError(
            "no codec: enable stages.codec, or set codec_model_path in the spec (or in the stage config)"
        )
    return path


def _load_stage_config(spec: PipelineSpec, name: str) -> TrainerConfig:
    settings = stage_settings(spec, name)
    where = f"stages.{name.split('-')[0]}.config"
    try:
        if isinstance(settings.config, str):
            path = Path(settings.config)
            path = path if path.is_absolute() or "://" in settings.config else spec.base_dir / path
            return load_config(path, settings.overrides)
        return load_config(None, settings.overrides, data=settings.config or {})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _stage_run(spec: PipelineSpec, name: str) -> StageRun:
    config = _load_stage_config(spec, name)
    layout = layout_of(spec)
    rlhf_on = spec.stages.rlhf.enabled
    skip = None
    try:
        if name == "codec":
            config.codec.train.output_dir = layout.codec_dir
            skip = layout.codec_final if spec.stages.codec.skip_if_exists else None
        elif name == "vectorize":
            config.vectorize.output_dir = layout.vectorized
            config.vectorize.codec_model_path = codec_path(spec, config, config.vectorize.codec_model_path)
        elif name == "merge":
            config.merge.dataset_path = layout.vectorized
        elif name in ("sft", "rlhf"):
            config.train_weighted_datasets = {layout.vectorized: 1.0}
            config.val_weighted_datasets = {layout.vectorized: 1.0}
            config.training.output_dir = layout.checkpoints
            config.training.run_name = name
            if name == "rlhf":
                config.rlhf_training.base_model_dir = layout.export_dir("sft")
        elif name.startswith("export-"):
            source = name.removeprefix("export-")
            config.export.checkpoint_path = layout.final_model(source)
            config.export.output_path = layout.export_dir(source)
            config.export.codec_model_path = codec_path(spec, config, config.export.codec_model_path)
        elif name == "eval":
            config.eval.model_path = layout.export_dir("rlhf" if rlhf_on else "sft")
            config.eval.codec_model_path = codec_path(spec, config, config.eval.codec_model_path)
            config.eval.output_dir = layout.eval_dir
            sources = ("sft", "rlhf") if rlhf_on else ("sft",)
            config.eval.metrics_dirs = [layout.model_run_dir(src) for src in sources]
            if not config.eval.test_list:
                raise ConfigError("eval.test_list is not set (the JSONL test list)")
    except ConfigError as err:
        raise ConfigError(f"stage {name}: {err}") from None
    return StageRun(name, TRAINER_STAGES[name], stage_settings(spec, name), config, skip)
