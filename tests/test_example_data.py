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


def test_eval_list_prompts_and_targets_exist() -> None:
    eval_list = CONFIGS / "eval_list.jsonl"
    items = [json.loads(line) for line in eval_list.read_text().splitlines()]
    train_texts = {json.loads(line)["transcript"] for line in (CONFIGS / "samples.jsonl").read_text().splitlines()}
    assert items
    for item in items:
        for key in ("prompt_wav", "target_wav"):
            assert Path(resolve_wav_path(str(eval_list), item[key])).is_file()
        assert item["prompt_text"] in train_texts
        # Held-out: the target sentence is never a training transcript (nor part of one).
        assert not any(item["target_text"] in t for t in train_texts)


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


def test_the_default_corpus_trains_every_word_of_the_demo_eval_but_none_of_its_sentences() -> None:
    """`make demo` fine-tunes the models trained on the corpus and is judged on example/configs/
    eval_list.jsonl: its sentences are held out of the corpus, their words are not (each heard often)."""
    make_dataset = _load_make_dataset()
    train = make_dataset.corpus_sentences(3000, 100, 100, seed=0)["train"]
    targets = [json.loads(line)["target_text"] for line in (CONFIGS / "eval_list.jsonl").read_text().splitlines()]
    assert sorted(targets) == sorted(make_dataset.HELD_OUT)
    counts = Counter(w for sentence in train for w in make_dataset.words_of(sentence))
    demo_words = set().union(*(make_dataset.words_of(t) for t in targets))
    assert min(counts[w] for w in demo_words) >= 20, {w: counts[w] for w in demo_words}
    assert not set(targets) & set(train)


def test_corpus_mode_writes_manifests_audio_eval_list_and_summary(tmp_path: Path) -> None:
    make_dataset = _load_make_dataset()
    make_dataset.main(["corpus", "--out", str(tmp_path), "--n", "8", "--n_val", "2", "--n_test", "2",
                       "--n_pairs", "2", "--workers", "2"])
    for split, count in (("train", 10), ("val", 2), ("test", 2)):
        rows = [r for _, r in read_manifest(str(tmp_path / f"{split}.jsonl"))]
        assert len(rows) == count and not any(isinstance(r, LineError) for r in rows)
        for row in rows:
            info = sf.info(resolve_wav_path(str(tmp_path / f"{split}.jsonl"), row["wav_path"]))
            assert abs(info.duration - row["duration"]) < 0.01 and info.samplerate == 16000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["utterances"] == {"train": 10, "val": 2, "test": 2}
    assert summary["two_sentence_training_utterances"] == 2
    # A pair is two training sentences in one voice, longer than either sentence alone.
    train = {r["id"]: r for _, r in read_manifest(str(tmp_path / "train.jsonl"))}
    singles = {r["transcript"]: r for r in train.values() if not r["id"].startswith("pair_")}
    for pair in (train["pair_00000"], train["pair_00001"]):
        first, second = pair["transcript"].split(". ")
        assert f"{first}." in singles and second in singles
        assert pair["duration"] > max(singles[f"{first}."]["duration"], singles[second]["duration"])
    assert summary["test_words_seen_in_train"] == 1.0 and summary["sentence_overlap_train_heldout"] == 0
    assert summary["demo_eval_sentences_in_train"] == 0 and 0 < summary["demo_eval_words_seen_in_train"] <= 1
    items = [json.loads(line) for line in (tmp_path / "eval_list.jsonl").read_text().splitlines()]
    test_rows = [r for _, r in read_manifest(str(tmp_path / "test.jsonl"))]
    assert [i["target_text"] for i in items] == [r["transcript"] for r in test_rows]
