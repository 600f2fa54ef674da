"""Regenerate the example speech dataset: `python example/make_dataset.py`.

Real synthetic speech from Debian's `flite` (four distinct voices: rms, kal16, awb, slt; pocketsphinx
understands them, so WER and speaker-similarity rewards carry signal) and `espeak-ng` (more voices
and speaking rates), converted by `sox` to 16 kHz mono 16-bit FLAC. Writes `example/wavs/*.flac` and
`example/configs/samples.jsonl` in the seed manifest format (wav paths relative to the manifest),
and `example/configs/eval_list.jsonl` (held-out sentences spoken in a reference voice).
Needs: apt-get install -y flite espeak-ng sox libsox-fmt-all
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A cold wind blew across the open field.",
    "She opened the window and looked at the sea.",
    "We will meet at the station at nine.",
    "The old clock in the hall stopped at noon.",
    "Please bring a pencil and a sheet of paper.",
    "The garden was full of red and yellow flowers.",
    "He found the key under a small grey stone.",
    "The train was late because of the heavy snow.",
    "Fresh bread smells better than anything else.",
    "The children played in the park until dark.",
    "Turn left at the bridge and follow the river.",
    "The baker sells warm rolls every morning.",
    "My brother likes to read books about ships.",
    "The lamp on the desk gives a soft light.",
    "Rain fell all night on the quiet town.",
    "They painted the fence a bright shade of blue.",
    "A small bird sang from the top of the tree.",
    "The doctor asked him to rest for a week.",
    "We need more milk, eggs and butter.",
    "The mountain road is narrow and steep.",
    "Her voice was calm and clear on the phone.",
    "The ship sailed out of the harbour at dawn.",
    "Keep the door closed to save the heat.",
    "The teacher wrote the answer on the board.",
    "A strong coffee helps me start the day.",
    "The farmer counted his sheep before sunset.",
    "The museum opens at ten on weekdays.",
    "He fixed the bicycle with a simple tool.",
    "The lake was still and the sky was grey.",
    "Please speak slowly so that everyone can follow.",
    "The letter arrived two days after the party.",
    "The cat slept on a pillow near the fire.",
    "We walked along the beach and collected shells.",
    "The soup needs a little more salt.",
    "The band played until the lights went out.",
    "Every morning she runs around the lake.",
    "The map shows a path through the forest.",
    "The room was quiet except for the ticking clock.",
    "He planted three apple trees in the spring.",
    "The market is busy on Saturday mornings.",
    "Our neighbours have a large black dog.",
    "The kettle is boiling, so the tea is nearly ready.",
    "The plane landed safely in the storm.",
    "She keeps her notes in a green folder.",
    "The river runs fast after a week of rain.",
    "Thank you for waiting, your table is ready.",
    "The library has a new section for children.",
    "A gentle breeze moved the tall grass.",
    "The engineers tested the bridge before it opened.",
    "I left my umbrella on the bus this morning.",
    "The stars were bright above the desert.",
    "He whistled a tune while he washed the dishes.",
    "The workers finished the roof before winter.",
    "Most people enjoy a walk on a sunny day.",
    "The price of the ticket includes lunch.",
    "The little boat drifted slowly toward the shore.",
    "Wait here while I get the car.",
    "The storm knocked down two trees on our street.",
    "The song reminded her of a summer long ago.",
]
# Spoken only in the eval list: the model never trains on these texts.
HELD_OUT = [
    "The bright moon rose over the silent hills.",
    "Please close the gate when you leave the farm.",
    "A warm cup of tea is waiting on the table.",
    "The young painter sold her first picture today.",
]
# Short phrases give the 1-2 s end of the length range.
SHORT = ["Yes, please.", "Good morning.", "Thank you.", "Hello there.", "Not today.", "See you soon."]
FLITE_VOICES = ["rms", "kal16", "awb", "slt"]
ESPEAK_VOICES = [("en-us", 150), ("en-us+f3", 165), ("en-gb", 140), ("en-gb+m3", 175)]


def synthesize(text: str, voice: str, out: Path, stretch: float, tmp: Path, pad: float = 0.15) -> None:
    raw = tmp / "raw.wav"
    if voice.startswith("flite:"):
        name = voice.split(":", 1)[1]
        cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={stretch}", "-t", text, "-o", str(raw)]
    else:
        name, rate = voice.split(":", 1)[1].rsplit("@", 1)
        cmd = ["espeak-ng", "-v", name, "-s", str(int(int(rate) / stretch)), "-w", str(raw), text]
    subprocess.run(cmd, check=True, capture_output=True)
    # Trim leading/trailing silence, pad each side, normalise to -3 dBFS peak.
    subprocess.run(
        ["sox", "-D", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out),
         "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse",
         "pad", str(pad), str(pad), "gain", "-n", "-3"],
        check=True, capture_output=True,
    )


def main() -> None:
    rng = random.Random(777)
    voices = [f"flite:{v}" for v in FLITE_VOICES] + [f"espeak:{v}@{r}" for v, r in ESPEAK_VOICES]
    wav_dir = ROOT / "wavs"
    wav_dir.mkdir(exist_ok=True)
    for stale in wav_dir.glob("*.flac"):
        stale.unlink()
    records = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i in range(120):
            # Mostly one or two sentences; some join three to five for 10-15 s clips.
            n = rng.choices([0, 1, 2, 3, 4, 5], weights=[1, 6, 4, 2, 2, 1])[0]
            picks = [SHORT[i % len(SHORT)]] if n == 0 else rng.sample(SENTENCES, n)
            text = " ".join(picks)
            # Flite voices speak 2 of every 3 clips: they are the ones ASR understands best.
            voice = voices[i % 4] if i % 3 else voices[4 + (i // 3) % 4]
            stretch = rng.choice([0.85, 1.0, 1.0, 1.15])
            name = f"utt_{i:03d}.flac"
            synthesize(text, voice, wav_dir / name, stretch, tmp)
            info = sf.info(str(wav_dir / name))
            if info.duration < 1.0:  # keep the 1-15 s range: more silence around short phrases
                synthesize(text, voice, wav_dir / name, stretch, tmp, pad=0.15 + (1.05 - info.duration) / 2)
                info = sf.info(str(wav_dir / name))
            while info.duration > 15.0:  # keep the 1-15 s range: drop sentences
                picks = picks[:-1]
                text = " ".join(picks)
                synthesize(text, voice, wav_dir / name, stretch, tmp)
                info = sf.info(str(wav_dir / name))
            records.append({
                "id": f"utt_{i:03d}",
                "transcript": text,
                "language": "en",
                "wav_path": f"../wavs/{name}",
                "duration": round(info.duration, 3),
                "sample_rate": info.samplerate,
                "speaker_id": voice.split(":", 1)[1].split("@")[0],
            })
    manifest = ROOT / "configs" / "samples.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Eval list: each held-out sentence cloned from a flite reference clip; the same voice speaking
    # the target text is the ground-truth row the eval report scores alongside the model.
    refs = [r for r in records if r["speaker_id"] in FLITE_VOICES and r["duration"] < 6.0]
    eval_items = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for k, text in enumerate(HELD_OUT):
            voice = FLITE_VOICES[k % 4]
            ref = next(r for r in refs if r["speaker_id"] == voice)
            target = f"eval_{k:02d}.flac"
            synthesize(text, f"flite:{voice}", wav_dir / target, 1.0, Path(tmp_name))
            eval_items.append({
                "id": f"eval_{k:02d}",
                "prompt_wav": ref["wav_path"],
                "prompt_text": ref["transcript"],
                "target_text": text,
                "target_wav": f"../wavs/{target}",
                "language": "en",
            })
    (ROOT / "configs" / "eval_list.jsonl").write_text("".join(json.dumps(e) + "\n" for e in eval_items))
    total = sum(r["duration"] for r in records)
    print(f"wrote {len(records)} utterances, {total / 60:.1f} min of speech, to {wav_dir}")


if __name__ == "__main__":
    main()
