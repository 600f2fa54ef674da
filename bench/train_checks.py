"""Training checks through the real CLI (`tts-train sft`) on a tiny model and a small generated dataset:

1. bf16 loss parity: the same run in fp32 and bf16 (same seed, data and order); max relative loss gap.
2. FSDP2 on one process: `torchrun --nproc_per_node 1 ... training.strategy=fsdp` in bf16; losses vs
   the plain bf16 run, and the exported model loads with `from_pretrained`.

    python bench/train_checks.py                  # on whatever device the trainer picks (CUDA if present)
    python bench/train_checks.py --steps 6        # shorter

Prints one line per run (exit status, steps, last loss, mean real tokens/s) and the two gaps; exits 1
when a run fails or a gap is over its bound (bf16 vs fp32: 5 % relative, FSDP vs single: 2 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny dataset writer and SFT config (one definition)

from speechlm_fixtures import sft_config, write_vectorized  # noqa: E402

from trainer.metrics import read_scalars  # noqa: E402

BF16_TOLERANCE = 0.05
FSDP_TOLERANCE = 0.02


def _run(name: str, config: dict, root: Path, torchrun: bool = False) -> dict[int, dict]:
    out = root / name
    config = {**config, "training": {**config["training"], "output_dir": str(out)}}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone"] if torchrun \
        else [sys.executable]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*launcher, "-m", "trainer", "sft", "--config", str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    records = {r["step"]: r for r in read_scalars(str(out / "t" / "metrics.jsonl")) if "loss" in r} \
        if (out / "t" / "metrics.jsonl").exists() else {}
    tps = [r["tokens_per_second"] for s, r in records.items() if s > 1]
    last = records[max(records)]["loss"] if records else float("nan")
    print(f"{name:<12} exit {proc.returncode}  steps {len(records)}  last loss {last:.4f}  "
          f"real tok/s {sum(tps) / max(len(tps), 1):.0f}")
    if proc.returncode:
        print(proc.stderr[-3000:])
    return records


def _gap(a: dict[int, dict], b: dict[int, dict]) -> float:
    steps = sorted(set(a) & set(b))
    if not steps or len(steps) != len(a):
        return float("inf")
    return max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="train-checks-") as tmp:
        root = Path(tmp)
        data = write_vectorized(root / "data")
        base = sft_config(data, root, max_steps=args.steps, eval_steps=args.steps, logging_steps=1)
        base["checkpointing"]["save_steps"] = args.steps
        fp32 = _run("fp32", base, root)
        bf16_config = {**base, "training": {**base["training"], "precision": "bf16"}}
        bf16 = _run("bf16", bf16_config, root)
        fsdp = _run("fsdp_bf16", {**bf16_config, "training": {**bf16_config["training"], "strategy": "fsdp"}}, root,
                    torchrun=True)
        loads = False
        final = root / "fsdp_bf16" / "t" / "final_model"
        if final.exists():
            from transformers import AutoModelForCausalLM

            loads = AutoModelForCausalLM.from_pretrained(final) is not None
        bf16_gap, fsdp_gap = _gap(fp32, bf16), _gap(bf16, fsdp)
        print(f"bf16 vs fp32: max relative loss gap {bf16_gap:.2e} over {len(fp32)} steps (bound {BF16_TOLERANCE})")
        print(f"fsdp vs single (bf16): max relative loss gap {fsdp_gap:.2e} (bound {FSDP_TOLERANCE}); "
              f"exported model loads: {loads}")
        ok = bf16_gap <= BF16_TOLERANCE and fsdp_gap <= FSDP_TOLERANCE and loads
        print("train checks:", "PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
