"""Reward scoring: decode-once batched scoring vs the seed's per-function, per-sample scoring.

Same completions, same loaded scorer models, same process. The baseline does what the seed's reward
functions did: every function decodes each completion on its own (prompt + completion), and scores one
clip at a time (speaker similarity embeds the reference for every sample; DNSMOS runs the library's
per-clip path with its P.808 head, as torchmetrics' DNSMOS does). Ours: one batched decode shared by all
functions, batched scorers, reference audio/embeddings cached per prompt.

    .venv/bin/python bench/rewards.py                      # CPU, tiny codec, < 2 minutes
    .venv/bin/python bench/rewards.py --codec_preset full  # X-codec2-size decoder (random weights)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trainer.audio import read_audio, resample
from trainer.codec import Codec
from trainer.codec.presets import PRESETS
from trainer.rl.rewards import RewardScorer, ScorerModels, build_reward_funcs
from trainer.rl.rewards.functions import DNSMOSRewardFunc, SimilarityRewardFunc, WERRewardFunc
from trainer.scoring.asr import error_rate, wer_reward
from trainer.scoring.quality import dnsmos_reward
from trainer.scoring.speaker import cosine_similarity, similarity_reward

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "example" / "configs" / "samples.jsonl"


def load_completions(codec: Codec, prompts: int, generations: int, seconds: float):
    """Real speech encoded with the codec: prompt i's reference and `generations` completions of
    about `seconds` each (cut from other utterances)."""
    records = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["duration"] >= seconds][: prompts * (generations + 1)]
    codes = codec.encode([read_audio(str(MANIFEST.parent / r["wav_path"])).samples for r in records], 16000)
    items = []
    for p in range(prompts):
        group = codes[p * (generations + 1) : (p + 1) * (generations + 1)]
        texts = records[p * (generations + 1) : (p + 1) * (generations + 1)]
        for g in range(1, generations + 1):
            items.append({
                "prompt_codes": group[0], "codes": group[g][: int(seconds * codec.token_rate)],
                "reference_text": texts[0]["transcript"], "target_text": texts[g]["transcript"],
                "key": f"prompt{p}",
            })
    return items


def seed_style(codec: Codec, funcs, items) -> dict[str, list[float]]:
    """Each reward function decodes and scores one completion at a time."""
    from speechmos import dnsmos as speechmos_dnsmos

    def decode(codes, prompt=None):
        wave = codec.decode([codes], prompt_codes=None if prompt is None else [prompt])[0]
        return resample(wave, codec.output_sample_rate, 16000)

    out: dict[str, list[float]] = {f.name: [] for f in funcs}
    for func in funcs:
        for item in items:
            wave = decode(item["codes"], item["prompt_codes"])
            if isinstance(func, WERRewardFunc):
                text = func.transcriber.transcribe([wave], 16000)[0]
                out[func.name].append(wer_reward(error_rate(text, item["target_text"])))
            elif isinstance(func, SimilarityRewardFunc):
                reference = decode(item["prompt_codes"])
                a, b = func.encoder.embed([reference], 16000), func.encoder.embed([wave], 16000)
                out[func.name].append(float(similarity_reward(cosine_similarity(a, b))[0]))
            elif isinstance(func, DNSMOSRewardFunc):
                ovrl = speechmos_dnsmos.run(np.clip(wave, -1, 1), 16000)["ovrl_mos"]
                out[func.name].append(float(dnsmos_reward(ovrl)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument("--codec_preset", choices=sorted(PRESETS), default="tiny",
                        help="decode cost grows with the codec: 'full' is the X-codec2 decoder size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    codec = Codec.from_config(PRESETS[args.codec_preset]())
    items = load_completions(codec, args.prompts, args.generations, args.seconds)
    funcs = build_reward_funcs(["WERRewardFunc", "SimilarityRewardFunc", "DNSMOSRewardFunc"], ScorerModels())

    def ours(run: str) -> dict[str, list[float]]:
        # A fresh scorer and new reference keys per run: nothing is cached from an earlier run.
        result = RewardScorer(codec, funcs).score(
            [i["codes"] for i in items], [i["prompt_codes"] for i in items], [i["target_text"] for i in items],
            [i["reference_text"] for i in items], ["en"] * len(items),
            reference_keys=[f"{run}/{i['key']}" for i in items],
        )
        return {k: v.tolist() for k, v in result.rewards.items()}

    ours("warm-up")  # lazy imports (librosa), first ONNX/LSTM runs; the baseline shares them
    start = time.perf_counter()
    baseline_rewards = seed_style(codec, funcs, items)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    our_rewards = ours("timed")
    batched = time.perf_counter() - start

    print(f"{len(items)} completions of {args.seconds:.1f} s ({args.prompts} prompts x {args.generations}), "
          f"rewards {[f.name for f in funcs]}, torch threads {args.threads}")
    for name in ("WERRewardFunc", "SimilarityRewardFunc"):
        diff = np.max(np.abs(np.asarray(baseline_rewards[name]) - np.asarray(our_rewards[name])))
        print(f"  {name}: max |seed-style - ours| = {diff:.4f}")
    print(f"seed-style (decode per function, one clip at a time): {baseline:7.2f} s")
    print(f"decode once, batched scoring:                        {batched:7.2f} s")
    print(f"speedup: {baseline / batched:.2f}x")


if __name__ == "__main__":
    main()
