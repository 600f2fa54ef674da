"""The shipped example dataset: real speech, the seed manifest format, paths that resolve."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import soundfile as sf

from trainer.data.manifest import LineError, read_manifest, resolve_wav_path

CONFIGS = Path(__file__).resolve().parents[1] / "example" / "configs"


def test_manifest_resolves_to_real_speech_files() -> None:
    manifest = str(CONFIGS / "samples.jsonl")
    records = []
    for line_no, record in read_manifest(manifest):
        assert not isinstance(record, LineError), f"line {line_no}: {record}"
        path = Path(resolve_wav_path(manifest, record["wav_path"]))
        assert path.is_file(), f"line {line_no}: {path} missing"
        info = sf.info(str(path))
        assert info.samplerate == record["sample_rate"] == 16000 and info.channels == 1
        assert abs(info.duration - record["duration"]) < 0.01
        records.append(record)
    assert len(records) >= 100
    durations = [r["duration"] for r in records]
    assert min(durations) >= 1.0 and max(durations) <= 15.0 and max(durations) > 10.0
    assert len(Counter(r["speaker_id"] for r in records)) >= 4
    assert all(r["transcript"].strip() and r["language"] == "en" for r in records)
    total_bytes = sum((CONFIGS.parent / "wavs" / p.name).stat().st_size for p in (CONFIGS.parent / "wavs").iterdir())
    assert total_bytes <= 15 * 2**20


def test_demo_speech_is_phone_aligned_in_one_voice_and_the_eval_list_is_held_out() -> None:
    """The demo's data (example/demo.yaml) is what the shipped SpeechLM knows: its voice, phone timings
    that end where the clip ends; its eval prompts are clips of that set, its targets never trained on."""
    manifest = str(CONFIGS / "speech.jsonl")
    records = []
    for line_no, record in read_manifest(manifest):
        assert not isinstance(record, LineError), f"line {line_no}: {record}"
        info = sf.info(resolve_wav_path(manifest, record["wav_path"]))
        assert abs(info.duration - record["duration"]) < 0.01 and info.samplerate == 16000
        ends = [end for _, end in record["phone_times"]]
        assert ends == sorted(ends) and abs(ends[-1] - info.duration) < 0.05
        records.append(record)
    assert len(records) >= 100 and {r["speaker_id"] for r in records} == {"rms"}
    eval_list = CONFIGS / "eval_list.jsonl"
    items = [json.loads(line) for line in eval_list.read_text().splitlines()]
    train_texts = {r["transcript"] for r in records}
    shipped = _load_make_dataset().phone_sentence_sets(**_load_make_dataset().PHONES_CORPUS)
    assert [item["target_text"] for item in items] == shipped["test"]  # the shipped model's held-out figure
    for item in items:
        for key in ("prompt_wav", "target_wav"):
            assert Path(resolve_wav_path(str(eval_list), item[key])).is_file()
        assert item["prompt_text"] in train_texts
        assert item["target_text"] not in train_texts and item["target_text"] not in shipped["train"]


def _load_make_dataset():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", CONFIGS.parent / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_sentence_sets_are_disjoint_deterministic_and_test_words_are_trained() -> None:
    make_dataset = _load_make_dataset()
    sets = make_dataset.corpus_sentences(3000, 100, 100, seed=0)
    assert sets == make_dataset.corpus_sentences(3000, 100, 100, seed=0)
    assert sets != make_dataset.corpus_sentences(3000, 100, 100, seed=1)
    assert [len(sets[k]) for k in ("train", "val", "test")] == [3000, 100, 100]
    train, val, test = (set(sets[k]) for k in ("train", "val", "test"))
    assert len(train) == 3000 and not (train & val) and not (train & test) and not (val & test)
    train_vocab = set().union(*(make_dataset.words_of(s) for s in train))
    assert all(make_dataset.words_of(s) <= train_vocab for s in test)


def test_phone_corpus_takes_turns_between_voices_and_prompts_each_item_in_its_own_voice(tmp_path: Path) -> None:
    """`make_dataset.py phones --voices`: the four-voice corpus (real flite); every eval item is cloned
    from a training clip of the target's own voice, and the selection list (eval_val) is the val split."""
    out = tmp_path / "corpus"
    _load_make_dataset().main(["phones", "--out", str(out), "--n", "8", "--n_val", "4", "--n_test", "4",
                               "--vocabulary", "300", "--workers", "2", "--voices", "rms", "slt"])
    manifests = {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
                 for split in ("train", "val", "test")}
    for rows in manifests.values():
        assert [r["speaker_id"] for r in rows] == ["rms", "slt"] * (len(rows) // 2)
        assert all(r["phone_times"] for r in rows)
    speaker = {r["wav_path"]: r["speaker_id"] for rows in manifests.values() for r in rows}
    train_texts = {r["transcript"] for r in manifests["train"]}
    for name, split in (("eval_list.jsonl", "test"), ("eval_val.jsonl", "val")):
        items = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert [i["target_text"] for i in items] == [r["transcript"] for r in manifests[split]]
        assert all(speaker[i["prompt_wav"]] == speaker[i["target_wav"]] == i["speaker_id"] for i in items)
        assert all(i["prompt_text"] in train_texts and i["target_text"] not in train_texts for i in items)
    assert json.loads((out / "summary.json").read_text())["voices"] == ["rms", "slt"]
