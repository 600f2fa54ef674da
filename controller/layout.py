"""Where each stage of a run reads and writes: the one place the stage-chaining paths are defined.

    <checkpoints>/codec/final              codec-train output (our codec directory)
    <data>/vectorized                      vectorize shards, merged in place by merge
    <checkpoints>/sft/final_model          SFT final model (metrics.jsonl beside it)
    <checkpoints>/rlhf/final_model         RLHF final model
    <outputs>/export/{sft,rlhf}            serving directories (HF model + codec)
    <outputs>/eval                         evaluation report
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer import io

TRAINED_MODELS = ("sft", "rlhf")


@dataclass(frozen=True)
class RunLayout:
    data: str
    checkpoints: str
    outputs: str

    @property
    def codec_dir(self) -> str:
        return io.join(self.checkpoints, "codec")

    @property
    def codec_final(self) -> str:
        return io.join(self.codec_dir, "final")

    @property
    def vectorized(self) -> str:
        return io.join(self.data, "vectorized")

    def model_run_dir(self, source: str) -> str:
        """`<training.output_dir>/<training.run_name>` of the SFT or RLHF stage."""
        return io.join(self.checkpoints, source)

    def final_model(self, source: str) -> str:
        return io.join(self.model_run_dir(source), "final_model")

    def export_dir(self, source: str) -> str:
        return io.join(self.outputs, "export", source)

    @property
    def eval_dir(self) -> str:
        return io.join(self.outputs, "eval")
