"""Regenerate the example speech dataset: `python example/make_dataset.py`; or write a larger
training corpus at run time: `python example/make_dataset.py corpus --out DIR [--n 3000 --seed 0]`;
or the phone-aligned corpus of the shipped SpeechLM: `python example/make_dataset.py phones --out DIR`
(`--voices rms kal16 awb slt`: the four flite voices taking turns, each eval item prompted by its own voice).

Real synthetic speech from Debian's `flite` (four distinct voices: rms, kal16, awb, slt; pocketsphinx
understands them, so WER and speaker-similarity rewards carry signal) and `espeak-ng` (more voices
and speaking rates), converted by `sox` to 16 kHz mono 16-bit FLAC. Writes `example/wavs/*.flac` and
`example/configs/samples.jsonl` in the seed manifest format (wav paths relative to the manifest): the
from-scratch pipeline's data (example/pipeline.yaml); and the demo's (example/demo.yaml), in the shipped
SpeechLM's voice with phone timings: `example/speech/*.flac`, `example/configs/speech.jsonl` and
`example/configs/eval_list.jsonl` (held-out sentences cloned from a clip of that voice).
Needs: apt-get install -y flite espeak-ng sox libsox-fmt-all
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from trainer.model.phones import phone_times

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
# Never drawn by a corpus (the toy demo's former eval sentences: kept out so that every corpus, the
# shipped model's included, draws the sentences it always drew).
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


def write_example() -> None:
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
    total = sum(r["duration"] for r in records)
    print(f"wrote {len(records)} utterances, {total / 60:.1f} min of speech, to {wav_dir}")


# The corpus grammar: a fixed vocabulary of common words that pocketsphinx knows, so held-out
# sentences can be judged by ASR while every test word has been heard in training.
WORDS = {
    "adj": ["old", "young", "small", "big", "quiet", "bright", "dark", "warm", "cold", "green", "red",
            "blue", "happy", "tired", "busy", "empty", "heavy", "light", "clean", "strong", "gentle", "brown",
            "silent", "first"],
    "noun": ["man", "woman", "child", "dog", "cat", "bird", "horse", "teacher", "doctor", "farmer", "driver",
             "baker", "sailor", "girl", "boy", "student", "painter", "king", "friend", "neighbour"],
    "thing": ["book", "letter", "box", "cup", "table", "chair", "door", "window", "car", "boat", "ball",
              "bag", "hat", "coat", "key", "lamp", "bottle", "picture", "basket", "clock", "gate", "moon"],
    "place": ["the garden", "the kitchen", "the river", "the station", "the market", "the school", "the park",
              "the city", "the village", "the house", "the road", "the hill", "the forest", "the beach",
              "the farm", "the hills"],
    "verb_t": ["found", "carried", "opened", "closed", "painted", "cleaned", "washed", "dropped", "took",
               "moved", "bought", "sold", "fixed", "lost", "held", "wanted"],
    "verb_i": ["walked", "waited", "slept", "worked", "sang", "played", "stayed", "laughed", "rested",
               "stopped", "danced", "called", "rose"],
    "prep": ["near", "behind", "inside", "across", "along", "under", "beside", "past", "over"],
    "time": ["this morning", "last night", "every day", "in the evening", "after lunch", "before dinner",
             "on monday", "at noon", "in the spring", "all week", "today"],
    "number": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"],
    "verb_imp": ["close", "leave", "open", "take", "bring", "clean", "carry", "find"],
    "drink": ["tea", "milk", "water", "coffee", "soup"],
}
TEMPLATES = [
    "the {adj} {noun} {verb_t} the {thing} {time}",
    "the {noun} {verb_i} {prep} {place} {time}",
    "a {adj} {noun} {verb_t} a {adj} {thing} in {place}",
    "my {noun} {verb_i} {prep} the {adj} {thing}",
    "the {noun} {verb_t} {number} {things} {time}",
    "we {verb_i} {prep} {place} with the {adj} {noun}",
    "her {adj} {thing} was {prep} the {thing} in {place}",
    "the {adj} {noun} and the {noun} {verb_i} {time}",
    "please {verb_imp} the {adj} {thing} {time}",
    "the {thing} is waiting {prep} {place} for the {noun}",
    "when you {verb_i} {prep} {place} the {noun} {verb_i}",
    "a {adj} cup of {drink} was {prep} the {thing}",
]


def grammar_sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    fields: dict[str, str] = {}
    # Fill each slot occurrence independently ("a {adj} ... a {adj}" picks two adjectives).
    out = template
    while "{" in out:
        start = out.index("{")
        key = out[start + 1:out.index("}", start)]
        fields[key] = plural(rng.choice(WORDS["thing"])) if key == "things" else rng.choice(WORDS[key])
        out = out[:start] + fields[key] + out[out.index("}", start) + 1:]
    return out[0].upper() + out[1:] + "."


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def words_of(text: str) -> set[str]:
    return {w.strip(".,").lower() for w in text.split()}


def corpus_sentences(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """Disjoint sentence sets; every `test` word also occurs in `train` (val is only disjoint)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw() -> str:
        for _ in range(10_000):
            sentence = grammar_sentence(rng)
            if sentence not in seen and sentence not in HELD_OUT:
                seen.add(sentence)
                return sentence
        raise SystemExit("error: the grammar yields too few distinct sentences for these sizes")

    train = [draw() for _ in range(n_train)]
    train_vocab = set().union(*(words_of(s) for s in train))
    val = [draw() for _ in range(n_val)]
    test: list[str] = []
    while len(test) < n_test:
        candidate = draw()  # drawn sentences never return, so test stays disjoint from train and val
        if words_of(candidate) <= train_vocab:
            test.append(candidate)
    return {"train": train, "val": val, "test": test}


def write_corpus(out: Path, n: int, n_val: int, n_test: int, seed: int, workers: int, n_pairs: int = 0) -> None:
    """N training utterances in the four flite voices (distinct speakers ASR understands), plus
    held-out val/test sentences in the same voices and an eval list cloning test sentences from a
    training clip of the same voice. Re-running with the same arguments reuses finished audio.

    `n_pairs` more training utterances speak two training sentences in one breath: what zero-shot
    cloning asks of the SpeechLM (the prompt's transcript + the target text, continuing the prompt's
    codes) is then a case it has trained on, not only single sentences. They reuse training sentences,
    so the held-out sets stay unseen."""
    sets = corpus_sentences(n, n_val, n_test, seed)
    rng = random.Random(seed + 1)
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, str, float, str]] = []  # (split, id, text, stretch, voice)
    for split, sentences in sets.items():
        for i, text in enumerate(sentences):
            jobs.append((split, f"{split}_{i:05d}", text, rng.choice([0.9, 1.0, 1.0, 1.1]), FLITE_VOICES[i % 4]))
    pair_rng = random.Random(seed + 2)  # its own stream: adding pairs changes no other utterance
    for j in range(n_pairs):
        first, second = pair_rng.sample(sets["train"], 2)
        jobs.append(("train", f"pair_{j:05d}", f"{first} {second}", pair_rng.choice([0.9, 1.0, 1.0, 1.1]),
                     FLITE_VOICES[j % 4]))

    def run(job: tuple[str, str, str, float, str]) -> dict:
        split, utt_id, text, stretch, voice = job
        path = wav_dir / f"{utt_id}.flac"
        if not path.exists():
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "part.flac"
                synthesize(text, f"flite:{voice}", part, stretch, Path(tmp))
                os.replace(part, path)  # atomic: an interrupted run leaves no half-written clip
        return _record(split, utt_id, text, path, voice)

    by_split = _synthesize_splits(out, jobs, run, workers, sets)
    # Prompt: the voice's training clip nearest 4 s (long enough to carry the voice, short enough to
    # leave room for the target in the context).
    singles = [r for r in by_split["train"] if not r["id"].startswith("pair_")]
    prompts = {v: min((r for r in singles if r["speaker_id"] == v), key=lambda r: abs(r["duration"] - 4))
               for v in FLITE_VOICES}
    _write_jsonl(out / "eval_list.jsonl", [_eval_item(r, prompts[r["speaker_id"]]) for r in by_split["test"]])
    vocab = {split: set().union(*(words_of(s) for s in sentences)) for split, sentences in sets.items()}
    grammar_vocab = {w for values in WORDS.values() for v in values for w in words_of(v)}
    grammar_vocab |= {plural(thing) for thing in WORDS["thing"]}  # the "{number} {things}" template
    grammar_vocab |= {w for t in TEMPLATES for w in words_of(t) if "{" not in w}
    summary = {
        "seed": seed,
        "utterances": {split: len(rows) for split, rows in by_split.items()},
        "two_sentence_training_utterances": n_pairs,
        "hours": {split: round(sum(r["duration"] for r in rows) / 3600, 3) for split, rows in by_split.items()},
        "speakers": FLITE_VOICES,
        "grammar_vocabulary_size": len(grammar_vocab),
        "train_vocabulary_size": len(vocab["train"]),
        "test_words_seen_in_train": len(vocab["test"] & vocab["train"]) / max(1, len(vocab["test"])),
        "val_words_seen_in_train": len(vocab["val"] & vocab["train"]) / max(1, len(vocab["val"])),
        "sentence_overlap_train_heldout": len(set(sets["train"]) & (set(sets["val"]) | set(sets["test"]))),
    }
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


# Everyday sentences no corpus of ours holds: the open-vocabulary test of a phone-aligned model.
EVERYDAY = [
    "Could you tell me where the nearest pharmacy is?",
    "I think we should leave before the traffic gets worse.",
    "My sister is moving to a new apartment next month.",
    "The meeting has been moved to Thursday afternoon.",
    "Please remember to water the plants while I am away.",
    "He forgot his password again and had to reset it.",
    "We ordered pizza because nobody wanted to cook.",
    "The weather forecast says it will rain tomorrow.",
    "Can you turn the music down a little, please?",
    "She finally finished reading that long novel.",
    "Our flight was delayed by almost three hours.",
    "I usually take the bus to work on Mondays.",
    "The children are building a snowman in the yard.",
    "Do you know how much these tickets cost?",
    "The restaurant on the corner serves excellent noodles.",
    "Let me know if you need any help with the project.",
    "They are planning a surprise party for their teacher.",
    "This coffee machine makes a terrible noise.",
    "We watched an old movie and went to bed early.",
    "The museum will be closed for repairs until June.",
]


def frequent_words(n: int) -> list[str]:
    """The `n` most frequent English words (wordfreq's list, shipped in its PyPI package), letters only."""
    from wordfreq import top_n_list  # lazy: only the phones corpus needs it

    return [w for w in top_n_list("en", int(n * 1.2)) if w.isascii() and w.isalpha() and len(w) > 1][:n]


def varied_sentence(rng: random.Random, words: list[str]) -> str:
    """4 to 11 frequent words, some with a comma: no grammar, every phone context of open English text."""
    picks = [rng.choice(words) for _ in range(rng.randint(4, 11))]
    if len(picks) > 6 and rng.random() < 0.5:
        picks[rng.randint(2, len(picks) - 3)] += ","
    text = " ".join(picks)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"])


# The shipped SpeechLM's corpus (`phones` defaults): the demo's eval list is its held-out test split.
PHONES_CORPUS = {"n": 9000, "n_val": 100, "n_test": 40, "seed": 0, "varied": 0.5, "vocabulary": 8000}


def phone_sentence_sets(n: int, n_val: int, n_test: int, seed: int, varied: float, vocabulary: int
                        ) -> dict[str, list[str]]:
    """The phone corpus' sentences: training text is a `varied` share of frequent-word sentences (open
    vocabulary) and grammar sentences; val and test are grammar sentences never in training; `everyday`
    is EVERYDAY, outside any corpus."""
    rng = random.Random(seed)
    sets = corpus_sentences(n, n_val, n_test, seed)
    words = frequent_words(vocabulary)
    held = held_sentences(sets)
    train = []
    for grammar in sets["train"]:
        sentence = varied_sentence(rng, words) if rng.random() < varied else grammar
        if sentence not in held:
            train.append(sentence)
    return {"train": train, "val": sets["val"], "test": sets["test"], "everyday": EVERYDAY}


def held_sentences(sets: dict[str, list[str]]) -> set[str]:
    """What no training set may hold: `sets`' val and test, EVERYDAY and HELD_OUT."""
    return set(sets["val"]) | set(sets["test"]) | set(EVERYDAY) | set(HELD_OUT)


def phone_clip(wav_dir: Path, utt_id: str, text: str, voice: str) -> tuple[Path, list]:
    """<wav_dir>/<utt_id>.flac spoken by flite `voice`, untrimmed (flite's phone end times then match the
    clip within ~30 ms), peak -3 dBFS, 16 kHz, and its phone timings (<utt_id>.phones.json). Reused when
    both exist."""
    path, times_path = wav_dir / f"{utt_id}.flac", wav_dir / f"{utt_id}.phones.json"
    if not (path.exists() and times_path.exists()):
        with tempfile.TemporaryDirectory() as tmp:
            raw, part = Path(tmp) / "raw.wav", Path(tmp) / "part.flac"
            times = phone_times(text, voice=voice, wav_out=str(raw))  # the clip and its timings at once
            subprocess.run(["sox", "-D", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(part),
                            "gain", "-n", "-3"], check=True, capture_output=True)
            _write_atomic(times_path, json.dumps(times))
            os.replace(part, path)  # last: an interrupted run leaves no clip without its timings
    return path, json.loads(times_path.read_text())


def write_phones_corpus(out: Path, n: int, n_val: int, n_test: int, seed: int, workers: int,
                        voices: list[str], varied: float, vocabulary: int) -> None:
    """The phone-aligned corpus (`phone_sentence_sets`, clips by `phone_clip`, each line with its
    "phone_times"), utterance i of each split spoken by voices[i % len(voices)], and eval lists cloning
    each held-out sentence from a training clip of its own voice."""
    sets = phone_sentence_sets(n, n_val, n_test, seed, varied, vocabulary)
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)

    def run(job: tuple[str, int, str]) -> dict:
        split, i, text = job
        voice = voices[i % len(voices)]
        path, times = phone_clip(wav_dir, f"{split}_{i:05d}", text, voice)
        return _record(split, path.stem, text, path, voice, phone_times=times)

    jobs = [(split, i, text) for split, texts in sets.items() for i, text in enumerate(texts)]
    by_split = _synthesize_splits(out, jobs, run, workers, sets)
    # Eval lists: each voice's prompt is its training clip nearest 3 s (its phones are prefilled).
    prompts = {v: min((r for r in by_split["train"] if r["speaker_id"] == v), key=lambda r: abs(r["duration"] - 3))
               for v in voices}
    # eval_val.jsonl is for choosing among checkpoints, so that the test lists judge the choice unseen.
    for split, name in (("test", "eval_list.jsonl"), ("everyday", "eval_everyday.jsonl"), ("val", "eval_val.jsonl")):
        _write_jsonl(out / name, [_eval_item(r, prompts[r["speaker_id"]]) for r in by_split[split]])
    vocab = {split: set().union(*(words_of(t) for t in texts)) for split, texts in sets.items()}
    summary = {
        "seed": seed, "voices": voices, "varied_share": varied,
        "utterances": {split: len(rows) for split, rows in by_split.items()},
        "hours": {split: round(sum(r["duration"] for r in rows) / 3600, 3) for split, rows in by_split.items()},
        "train_vocabulary_size": len(vocab["train"]),
        "everyday_words_seen_in_train": round(len(vocab["everyday"] & vocab["train"]) / len(vocab["everyday"]), 3),
        "heldout_sentences_in_train": len(set(sets["train"]) & held_sentences(sets)),
    }
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def write_demo_speech(n: int = 160, voice: str = "rms", seed: int = 1) -> None:
    """The demo's data (`make demo` fine-tunes the shipped SpeechLM on it): `n` clips in the shipped
    model's voice and phone-aligned format (example/speech/, example/configs/speech.jsonl with phone
    timings), new sentences drawn as its corpus draws them; and example/configs/eval_list.jsonl: the
    shipped corpus' held-out test sentences (never in its training nor in these clips), cloned from a
    clip of this set, with flite's rendering of each as the ground truth."""
    shipped = phone_sentence_sets(**PHONES_CORPUS)
    held = held_sentences(shipped)
    rng, words = random.Random(seed), frequent_words(PHONES_CORPUS["vocabulary"])
    texts: list[str] = []
    while len(texts) < n:
        sentence = varied_sentence(rng, words) if len(texts) % 2 else grammar_sentence(rng)
        if sentence not in held and sentence not in texts:
            texts.append(sentence)
    wav_dir = ROOT / "speech"
    wav_dir.mkdir(exist_ok=True)
    for stale in wav_dir.iterdir():
        stale.unlink()

    def run(job: tuple[str, int, str]) -> dict:
        split, i, text = job
        path, times = phone_clip(wav_dir, f"{split}_{i:03d}", text, voice)
        record = _record(split, path.stem, text, path, voice, phone_times=times)
        record["wav_path"] = f"../speech/{path.name}"  # manifests live in example/configs
        return record

    jobs = [("train", i, t) for i, t in enumerate(texts)] + [("eval", i, t) for i, t in enumerate(shipped["test"])]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        records = list(pool.map(run, jobs))
    train = [r for r in records if r.pop("split") == "train"]
    targets = records[len(train):]
    _write_jsonl(ROOT / "configs" / "speech.jsonl", train)
    prompt = min(train, key=lambda r: abs(r["duration"] - 3))
    _write_jsonl(ROOT / "configs" / "eval_list.jsonl", [_eval_item(r, prompt) for r in targets])
    total = sum(r["duration"] for r in train)
    print(f"wrote {len(train)} utterances, {total / 60:.1f} min of {voice} speech, and {len(targets)} eval "
          f"items to {wav_dir}")


def _record(split: str, utt_id: str, text: str, path: Path, voice: str, **extra) -> dict:
    """A corpus manifest line for the clip at `path` (+ its split, popped when the manifests are written)."""
    info = sf.info(str(path))
    return {"id": utt_id, "transcript": text, "language": "en", "wav_path": f"wavs/{path.name}",
            "duration": round(info.duration, 3), "sample_rate": info.samplerate, "speaker_id": voice, **extra,
            "split": split}


def _synthesize_splits(out: Path, jobs: list, run, workers: int, splits) -> dict[str, list[dict]]:
    """`run` over `jobs` in threads; each split's records written to <out>/<split>.jsonl and returned."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(run, jobs))
    by_split: dict[str, list[dict]] = {s: [] for s in splits}
    for record in records:
        by_split[record.pop("split")].append(record)
    for split, rows in by_split.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    return by_split


def _eval_item(target: dict, prompt: dict) -> dict:
    """An eval-list line: `target`'s text cloned from the voice prompt `prompt` (both manifest records)."""
    return {"id": target["id"], "prompt_wav": prompt["wav_path"], "prompt_text": prompt["transcript"],
            "target_text": target["transcript"], "target_wav": target["wav_path"], "language": "en",
            "speaker_id": target["speaker_id"]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    corpus = sub.add_parser("corpus", help="write a larger grammar-generated training corpus")
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--n", type=int, default=3000, help="training utterances")
    corpus.add_argument("--n_val", type=int, default=100)
    corpus.add_argument("--n_test", type=int, default=100)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--n_pairs", type=int, default=1000,
                        help="extra training utterances of two training sentences (zero-shot cloning practice)")
    corpus.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    phones = sub.add_parser("phones", help="write the phone-aligned corpus (flite voices, phone timings)")
    phones.add_argument("--out", type=Path, required=True)
    phones.add_argument("--n", type=int, default=9000, help="training utterances")
    phones.add_argument("--n_val", type=int, default=100)
    phones.add_argument("--n_test", type=int, default=40)
    phones.add_argument("--seed", type=int, default=0)
    phones.add_argument("--voices", nargs="+", default=["rms"], choices=FLITE_VOICES,
                        help="flite voices, taking turns utterance by utterance (the shipped model: rms)")
    phones.add_argument("--varied", type=float, default=0.5, help="share of frequent-word training sentences")
    phones.add_argument("--vocabulary", type=int, default=8000, help="frequent words drawn from")
    phones.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.mode == "phones":
        write_phones_corpus(args.out, args.n, args.n_val, args.n_test, args.seed, args.workers, args.voices,
                            args.varied, args.vocabulary)
    elif args.mode == "corpus":
        write_corpus(args.out, args.n, args.n_val, args.n_test, args.seed, args.workers, args.n_pairs)
    else:
        write_example()
        write_demo_speech()


if __name__ == "__main__":
    main()
