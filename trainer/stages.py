"""The stage registry: every `tts-train` stage and every step of a pipeline run, in one place.

A `Stage` is a `tts-train` subcommand: its module (`FLAGS`, `run`), the config section it reads, its
process shape (torchrun, one process per GPU, or a single process) and whether it needs the vLLM
rollout server. A `Step` is one run of a stage in a pipeline (`ttsctl run`): the spec section that
enables and sizes it, what it publishes (a path under the run's storage roots, `RunLayout`) and how its
config is wired to the outputs of the steps before it. The trainer CLI, the controller's plan, spec,
render and backends, and the run layout all ask here; adding a stage touches this file and its module.

    codec -> vectorize -> merge -> sft -> export-sft -> rlhf -> export-rlhf -> eval

`export-<src>` runs whenever `<src>` runs (RLHF starts from the exported SFT model, eval reads the
exported RLHF model, or the SFT one when RLHF is disabled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from trainer import io
from trainer.config import TrainerConfig
from trainer.errors import ConfigError


# ----------------------------------------------------------------------------- tts-train stages
# Each loader imports its stage module when the stage runs: stage modules pull torch/transformers,
# which `tts-train --help` and the controller must not pay for.
def _codec_train() -> ModuleType:
    from trainer.train import codec  # lazy: torch

    return codec


def _vectorize() -> ModuleType:
    from trainer.data import vectorize  # lazy: torch + the codec

    return vectorize


def _merge() -> ModuleType:
    from trainer.data import merge  # lazy: numpy-heavy shard IO

    return merge


def _sft() -> ModuleType:
    from trainer.train import sft  # lazy: torch + transformers

    return sft


def _rlhf() -> ModuleType:
    from trainer.rl import grpo  # lazy: torch + transformers + TRL

    return grpo


def _export() -> ModuleType:
    from trainer.serve import export  # lazy: torch + transformers

    return export


def _import() -> ModuleType:
    from trainer.serve import reference_import  # lazy: torch + transformers

    return reference_import


def _infer() -> ModuleType:
    from trainer.serve import infer  # lazy: torch + the codec

    return infer


def _eval() -> ModuleType:
    from trainer.eval import harness  # lazy: torch + the scorers

    return harness


@dataclass(frozen=True)
class Stage:
    name: str  # the `tts-train` subcommand
    summary: str
    # The module defining `run(config) -> int` and `FLAGS` (seed flag -> config key), optionally
    # `NOTED_FLAGS` (accepted with a warning) and `REFUSED_FLAGS` (exit 2 with the reason).
    load: Callable[[], ModuleType]
    section: str  # the config section the stage reads
    # "torchrun": one process per GPU (DDP/FSDP/DeepSpeed or sharded work); "single": one process.
    launch: Literal["torchrun", "single"]
    needs_rollout_server: bool = False


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("codec-train", "train the audio codec (GAN; DDP under torchrun)", _codec_train, "codec", "torchrun"),
    Stage("vectorize", "encode a speech manifest into code shards (resumable)", _vectorize, "vectorize",
          "torchrun"),
    Stage("merge", "merge vectorized shards into one dataset", _merge, "merge", "single"),
    Stage("sft", "supervised training of the SpeechLM (packed, DDP/FSDP/DeepSpeed)", _sft, "training", "torchrun"),
    Stage("rlhf", "GRPO alignment with ASR/speaker/quality rewards", _rlhf, "rlhf_training", "torchrun",
          needs_rollout_server=True),
    Stage("export", "turn any checkpoint into a serving directory (HF + codec)", _export, "export", "single"),
    Stage("import", "Inworld-trainer SpeechLM checkpoint -> serving directory", _import, "export", "single"),
    Stage("infer", "zero-shot voice-cloning synthesis to a WAV file", _infer, "infer", "single"),
    Stage("eval", "Seed-TTS-eval-style evaluation: WER/CER, SIM, DNSMOS, RTF, report", _eval, "eval", "single"),
)}


# ------------------------------------------------------------------------------ pipeline steps
Root = Literal["data", "checkpoints", "outputs"]


@dataclass(frozen=True)
class RunLayout:
    """Where each step of a run reads and writes: the three storage roots of the pipeline spec, and
    each step's published output under them (`Step.publishes`)."""

    data: str
    checkpoints: str
    outputs: str

    def output(self, step: str) -> str:
        """The URL `step` publishes (its final codec, dataset, model, serving directory or report)."""
        root, path = STEPS[step].publishes
        return io.join(getattr(self, root), path)

    def run_dir(self, step: str) -> str:
        """The directory a training step writes (checkpoints, metrics.jsonl): its output's parent."""
        return self.output(step).rstrip("/").rsplit("/", 1)[0]


@dataclass(frozen=True)
class Wiring:
    """What a step's config is wired to: the run's layout, the steps it runs, and the codec to use."""

    layout: RunLayout
    enabled: frozenset[str]
    # The codec a stage uses, given the path its own config names (raises ConfigError without one).
    codec: Callable[[str | None], str]


def _wire_codec(config: TrainerConfig, w: Wiring) -> None:
    config.codec.train.output_dir = w.layout.run_dir("codec")


def _wire_vectorize(config: TrainerConfig, w: Wiring) -> None:
    config.vectorize.output_dir = w.layout.output("vectorize")
    config.vectorize.codec_model_path = w.codec(config.vectorize.codec_model_path)


def _wire_merge(config: TrainerConfig, w: Wiring) -> None:
    config.merge.dataset_path = w.layout.output("vectorize")


def _wire_training(step: str, base_model: str | None = None) -> Callable[[TrainerConfig, Wiring], None]:
    """SFT/RLHF on the merged dataset, in <checkpoints>/<step>; RLHF from `base_model`'s output."""

    def wire(config: TrainerConfig, w: Wiring) -> None:
        data = w.layout.output("merge")
        config.train_weighted_datasets = {data: 1.0}
        config.val_weighted_datasets = {data: 1.0}
        config.training.output_dir = w.layout.checkpoints
        config.training.run_name = step
        if base_model:
            config.rlhf_training.base_model_dir = w.layout.output(base_model)

    return wire


def _wire_export(source: str) -> Callable[[TrainerConfig, Wiring], None]:
    def wire(config: TrainerConfig, w: Wiring) -> None:
        config.export.checkpoint_path = w.layout.output(source)
        config.export.output_path = w.layout.output(f"export-{source}")
        config.export.codec_model_path = w.codec(config.export.codec_model_path)

    return wire


def _wire_eval(config: TrainerConfig, w: Wiring) -> None:
    trained = ["sft", "rlhf"] if "rlhf" in w.enabled else ["sft"]
    config.eval.model_path = w.layout.output(f"export-{trained[-1]}")
    config.eval.codec_model_path = w.codec(config.eval.codec_model_path)
    config.eval.output_dir = w.layout.output("eval")
    config.eval.metrics_dirs = [w.layout.run_dir(s) for s in trained]
    if not config.eval.test_list:
        raise ConfigError("eval.test_list is not set (the JSONL test list)")


@dataclass(frozen=True)
class Step:
    name: str
    stage: Stage
    spec_key: str  # the pipeline spec's `stages.<spec_key>`: enables and sizes the step
    publishes: tuple[Root, str]  # (storage root, path under it)
    wire: Callable[[TrainerConfig, Wiring], None]
    # Runs only when this step runs too (export-sft with sft).
    source: str | None = None


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("codec", STAGES["codec-train"], "codec", ("checkpoints", "codec/final"), _wire_codec),
    Step("vectorize", STAGES["vectorize"], "vectorize", ("data", "vectorized"), _wire_vectorize),
    # merge writes the merged dataset in place, beside the shards
    Step("merge", STAGES["merge"], "merge", ("data", "vectorized"), _wire_merge),
    Step("sft", STAGES["sft"], "sft", ("checkpoints", "sft/final_model"), _wire_training("sft")),
    Step("export-sft", STAGES["export"], "export", ("outputs", "export/sft"), _wire_export("sft"),
         source="sft"),
    Step("rlhf", STAGES["rlhf"], "rlhf", ("checkpoints", "rlhf/final_model"),
         _wire_training("rlhf", base_model="export-sft")),
    Step("export-rlhf", STAGES["export"], "export", ("outputs", "export/rlhf"), _wire_export("rlhf"),
         source="rlhf"),
    Step("eval", STAGES["eval"], "eval", ("outputs", "eval"), _wire_eval),
)}
STEP_ORDER = tuple(STEPS)
