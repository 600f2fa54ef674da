"""Copy the models `make example-models` trained into example/models/, with their provenance.

    python example/ship_models.py [--run runs/example-models] [--out example/models] [--only codec]

For each model: the weights as safetensors (the SpeechLM and the codec's decoder at float16, half the
bytes; the codec's encoder at float32, so codes are unchanged), the stage config that produced it, the command, steps,
wall time and the figures its run measured (`provenance.json`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.codec import Codec  # noqa: E402
from trainer.codec.checkpoint import DECODER_PREFIXES  # noqa: E402
from trainer.metrics import read_scalars  # noqa: E402
from trainer.stages import RunLayout  # noqa: E402

COMMAND = "make example-models  (ttsctl run example/models.yaml --backend local)"
CODEC_CONFIG = ROOT / "example" / "configs" / "models" / "codec-small.yaml"
SPEECHLM_FILES = ("config.json", "generation_config.json", "model.safetensors", "speechlm.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json")


def run_summary(rows: list[dict]) -> dict:
    """Steps, wall time and the last value of every scalar of a run's metrics.jsonl rows."""
    times = [r["time"] for r in rows if "time" in r]
    last: dict[str, float] = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")})
    return {"steps": max(r.get("step", 0) for r in rows), "wall_time_s": round(max(times) - min(times), 1),
            "last": last}


def ship_codec(layout: RunLayout, out: Path, command: str = COMMAND, config: Path = CODEC_CONFIG,
               corpus: Path | None = None) -> Path:
    codec = Codec.load(layout.output("codec"))
    target = out / "codec-small"
    # A decoder continued from a shipped codec (codec.train.init_from) keeps that codec's history.
    init_from = yaml.safe_load(config.read_text())["codec"]["train"].get("init_from")
    parent = ROOT / init_from / "provenance.json" if init_from else None
    parent_provenance = json.loads(parent.read_text()) if parent is not None and parent.exists() else None
    # The decoder (90 % of the weights) at float16; the encoder stays float32 so its codes are exactly
    # the ones the shipped SpeechLM was trained on.
    for prefix in DECODER_PREFIXES:
        module = getattr(codec, prefix.rstrip("."), None)
        if module is not None:
            module.half()
    codec.save(str(target))
    shutil.copy2(config, target / "train_config.yaml")
    rows = read_scalars(str(Path(layout.run_dir("codec")) / "metrics.jsonl"))
    summary = run_summary(rows)
    curve = [{"step": r["step"], "resynth_wer": r["resynth_wer"], "resynth_sim": r["resynth_sim"]}
             for r in rows if "resynth_wer" in r]
    provenance = {
        "command": command, "config": "train_config.yaml (a copy of the stage config the run used)",
        "weights_dtype": {"encoder": "float32", "decoder": "float16"},
        "steps": summary["steps"], "wall_time_s": summary["wall_time_s"], "resynthesis_curve": curve,
        "corpus": json.loads(corpus.read_text()) if corpus is not None and corpus.exists() else None,
    }
    if init_from:
        provenance["continued_from"] = {"codec": init_from, "provenance": parent_provenance}
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return target


def ship_speechlm(layout: RunLayout, out: Path, command: str = COMMAND) -> Path:
    source = Path(layout.output("export-rlhf"))
    source = source if source.exists() else Path(layout.output("export-sft"))
    if not source.exists():
        raise SystemExit(f"no SpeechLM export at {source}: run the pipeline first (make example-models)")
    target = out / "speechlm-small"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SPEECHLM_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    # float16 on disk (half the bytes; loaded as float32): the repository travels to a GPU machine whole.
    weights = load_file(str(target / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              str(target / "model.safetensors"), metadata={"format": "pt"})
    runs = {src: run_summary(read_scalars(str(Path(layout.run_dir(src)) / "metrics.jsonl")))
            for src in ("sft", "rlhf") if (Path(layout.run_dir(src)) / "metrics.jsonl").exists()}
    results = Path(layout.output("eval")) / "results.json"
    # Every eval of the run (the pipeline's, and any other list scored into <run>/eval-*/ by hand).
    evals = {d.name: json.loads((d / "results.json").read_text())["aggregate"]
             for d in sorted(Path(layout.output("eval")).parent.glob("eval-*")) if (d / "results.json").exists()}
    provenance = {
        "command": command,
        "configs": [f"example/configs/models/{src}-phones.json" for src in runs],
        "exported_from": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
        "runs": {k: {"steps": v["steps"], "wall_time_s": v["wall_time_s"]} for k, v in runs.items()},
        "eval": json.loads(results.read_text())["aggregate"] if results.exists() else None,
        "other_evals": evals,
    }
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "example-models")
    parser.add_argument("--out", type=Path, default=ROOT / "example" / "models")
    parser.add_argument("--only", choices=["codec", "speechlm"])
    parser.add_argument("--command", default=COMMAND, help="the command that trained the models, for provenance")
    parser.add_argument("--codec_config", type=Path, default=CODEC_CONFIG, help="the codec stage config the run used")
    args = parser.parse_args(argv)
    layout = RunLayout(str(args.run / "data"), str(args.run / "checkpoints"), str(args.run))
    torch.set_num_threads(1)
    if args.only != "speechlm":
        corpus = args.run / "corpus" / "summary.json"
        print(f"codec -> {ship_codec(layout, args.out, args.command, args.codec_config, corpus)}")
    if args.only != "codec":
        print(f"speechlm -> {ship_speechlm(layout, args.out, args.command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
