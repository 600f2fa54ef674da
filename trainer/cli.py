"""`tts-train <stage>`: the one entry point of every stage, on a laptop, under torchrun, in a pod.

The stages are those of the registry (trainer/stages.py). Each stage module, imported only when its
stage runs (so `--help` is instant), defines `FLAGS` (the seed trainer's command-line flags -> config
key paths) and `run(config) -> int`, and optionally `NOTED_FLAGS` (reference flags accepted with a
warning saying what happens instead or how ours differs; a noted flag that is also in `FLAGS` still
sets its key) and `REFUSED_FLAGS` (reference flags that exit 2 with the reason).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from trainer.config import load_config
from trainer.config_compat import stage_notes
from trainer.errors import ConfigError, StageError
from trainer.stages import STAGES


def build_parser(
    stage: str | None = None, flags: dict[str, str] | None = None, others: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tts-train",
        description="SpeechLM TTS trainer stages. Each stage reads one config (YAML/JSON) plus overrides.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, entry in STAGES.items():
        p = sub.add_parser(name, help=entry.summary, description=entry.summary)
        p.add_argument("--config", "--config_path", dest="config", help="YAML or JSON config file")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set training.learning_rate=3e-4 (repeatable)",
        )
        if name == stage:
            for flag, key in (flags or {}).items():
                note = (others or {}).get(flag)
                p.add_argument(
                    f"--{flag}", dest=f"flag_{flag}", nargs="?", const="true", default=None,
                    help=f"sets {key}" + (f"; {note}" if note else ""),
                )
            for flag, why in (others or {}).items():
                if flag not in (flags or {}):
                    p.add_argument(f"--{flag}", dest=f"flag_{flag}", nargs="?", const="true", default=None, help=why)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv[0] if argv and argv[0] in STAGES else None
    module = STAGES[stage].load() if stage else None
    flags: dict[str, str] = getattr(module, "FLAGS", {}) if module else {}
    noted: dict[str, str] = getattr(module, "NOTED_FLAGS", {}) if module else {}
    refused: dict[str, str] = getattr(module, "REFUSED_FLAGS", {}) if module else {}
    parser = build_parser(stage, flags, {**noted, **refused})
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag, why in refused.items():
        if getattr(args, f"flag_{flag}") not in (None, "false", "False", "0"):
            print(f"error: --{flag} is not supported: {why}", file=sys.stderr)
            return 2
    for flag, why in noted.items():
        if getattr(args, f"flag_{flag}") is not None:
            logging.getLogger("trainer.cli").warning("--%s: %s", flag, why)
    overrides = list(args.overrides)
    for flag, key in flags.items():
        value = getattr(args, f"flag_{flag}")
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
        stage_notes(config, args.stage)
        return int(module.run(config) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
