"""`tts-train <stage>`: the one entry point of every stage, on a laptop, under torchrun, in a pod.

Each stage lives in its own module, imported only when run (so `--help` is instant), which defines
`FLAGS` (the seed trainer's command-line flags -> config key paths) and `run(config) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from trainer.config import load_config
from trainer.errors import ConfigError, StageError

STAGES: dict[str, tuple[str, str]] = {
    "codec-train": ("trainer.codec.train", "train the audio codec (GAN; DDP under torchrun)"),
    "vectorize": ("trainer.data.vectorize", "encode a speech manifest into code shards (resumable)"),
    "merge": ("trainer.data.merge", "merge vectorized shards into one dataset"),
    "sft": ("trainer.train.sft", "supervised training of the SpeechLM (packed, DDP/FSDP/DeepSpeed)"),
    "rlhf": ("trainer.rl.grpo", "GRPO alignment with ASR/speaker/quality rewards"),
    "export": ("trainer.serve.export", "turn any checkpoint into a serving directory (HF + codec)"),
    "import": ("trainer.serve.reference_import", "Inworld-trainer SpeechLM checkpoint -> serving directory"),
    "infer": ("trainer.serve.infer", "zero-shot voice-cloning synthesis to a WAV file"),
    "eval": ("trainer.eval.harness", "Seed-TTS-eval-style evaluation: WER/CER, SIM, DNSMOS, RTF, report"),
}


def build_parser(stage: str | None = None, flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tts-train",
        description="SpeechLM TTS trainer stages. Each stage reads one config (YAML/JSON) plus overrides.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "--config_path", dest="config", help="YAML or JSON config file")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set training.learning_rate=3e-4 (repeatable)",
        )
        if name == stage:
            for flag, key in (flags or {}).items():
                p.add_argument(
                    f"--{flag}", dest=f"flag_{flag}", nargs="?", const="true", default=None,
                    help=f"sets {key}",
                )
    return parser


def _load_stage(stage: str):
    module_name, _ = STAGES[stage]
    return importlib.import_module(module_name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv[0] if argv and argv[0] in STAGES else None
    module = _load_stage(stage) if stage else None
    flags: dict[str, str] = getattr(module, "FLAGS", {}) if module else {}
    parser = build_parser(stage, flags)
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for flag, key in flags.items():
        value = getattr(args, f"flag_{flag}")
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
        return int(module.run(config) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
