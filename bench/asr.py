"""pocketsphinx with every clip judged on its own: one decoder re-initialising its feature extraction per
clip (ours, trainer.scoring.asr.PocketsphinxTranscriber) vs a fresh decoder per clip (the baseline, what
the transcriber did before), on the same clips in the same process.

    .venv/bin/python bench/asr.py            # the example speech (flite rms, ~3 s clips), < 2 minutes

Both must give the same transcripts, in either order of the clips: a GRPO group's WER rewards and an
eval row must not depend on which clips were transcribed before them. The ratio is what a GRPO step with
the WER reward saves in transcription (16 rollouts per step in example/configs/models/rlhf-phones.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from trainer.audio import read_audio
from trainer.scoring.asr import ASR_SAMPLE_RATE, PocketsphinxTranscriber, pocketsphinx_utterance, resample

REPO = Path(__file__).resolve().parents[1]


def fresh_decoder_per_clip(waves: list[np.ndarray], sample_rate: int) -> list[str]:
    from pocketsphinx import Decoder

    texts = []
    for wave in waves:
        pcm = np.clip(resample(wave, sample_rate, ASR_SAMPLE_RATE), -1.0, 1.0)
        texts.append(pocketsphinx_utterance(Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL"), pcm))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=60)
    args = parser.parse_args()
    files = sorted((REPO / "example" / "speech").glob("*.flac"))[: args.clips]
    if not files:
        raise SystemExit("no example speech: run `make install` first (it writes example/speech)")
    audio = [read_audio(str(f)) for f in files]
    sample_rate = audio[0].sample_rate
    waves = [a.samples for a in audio]
    seconds = sum(len(w) for w in waves) / sample_rate

    start = time.perf_counter()
    baseline = fresh_decoder_per_clip(waves, sample_rate)
    t_baseline = time.perf_counter() - start
    ours_asr = PocketsphinxTranscriber()
    start = time.perf_counter()
    ours = ours_asr.transcribe(waves, sample_rate)
    t_ours = time.perf_counter() - start
    reversed_order = ours_asr.transcribe(waves[::-1], sample_rate)[::-1]

    same = sum(a == b for a, b in zip(ours, baseline, strict=True))
    same_reversed = sum(a == b for a, b in zip(reversed_order, baseline, strict=True))
    print(f"{len(waves)} clips, {seconds:.0f} s of speech")
    print(f"fresh decoder per clip (baseline): {t_baseline:.1f} s ({t_baseline / len(waves) * 1000:.0f} ms/clip)")
    print(f"one decoder, reinit_feat per clip: {t_ours:.1f} s ({t_ours / len(waves) * 1000:.0f} ms/clip)")
    print(f"speed-up: {t_baseline / t_ours:.2f}x; transcripts equal to the baseline's: {same}/{len(waves)} "
          f"in order, {same_reversed}/{len(waves)} in reverse order")
    if same != len(waves) or same_reversed != len(waves):
        raise SystemExit("transcripts differ from a fresh decoder's")


if __name__ == "__main__":
    main()
