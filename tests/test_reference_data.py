"""Vectorized data both ways with the seed (inworld-ai/tts): files made by its vectorizer/merger go
through our merge, reader and SFT; our vectorize/merge output goes through its merger and loader.

The seed's side is re-implemented here from its source, call for call: tools/data/data_vectorizer.py
`main`/`save_data` (np.save of the start offsets, np.memmap int32 codes, per-rank train/val tail
split with the val offsets rebased), tools/data/data_merger.py (`read_the_directory`,
`create_shards`, `merge_shards`, `validate_merged_shards`) and
tts/data/data_utils.py `load_and_filter_audio_codes_and_samples` (the loader's read).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pytest
from speechlm_fixtures import learnable_codes, sft_config, transcripts

from trainer import cli
from trainer.audio import read_audio
from trainer.codec import Codec, tiny_codec_config
from trainer.data import shards
from trainer.data.dataset import VectorizedSplit
from trainer.data.vectorize import split_of

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example" / "configs" / "samples.jsonl"
CODEBOOK = 64  # speechlm_fixtures' tiny SFT model


# ------------------------------------------------------------------------------- the seed's side
def seed_save_data(samples: list[dict], codes: np.ndarray, codes_index: np.ndarray, output_dir: str,
                   split: str, rank: int) -> None:
    """data_vectorizer.save_data."""
    np.save(os.path.join(output_dir, f"{split}_codes_index_{rank}.npy"), codes_index)
    codes_arr = np.memmap(os.path.join(output_dir, f"{split}_codes_{rank}.npy"), dtype=np.int32, mode="w+",
                          shape=(codes.shape[0],))
    codes_arr[:] = codes
    codes_arr.flush()
    with open(os.path.join(output_dir, f"{split}_samples_{rank}.jsonl"), "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def seed_vectorizer_rank(output_dir: str, rank: int, samples: list[dict], codes: list[list[int]],
                         val_split: float) -> None:
    """The end of data_vectorizer.main for one rank: offsets, the tail val split, rebased val offsets."""
    codes_index, index_counter = [], 0
    for item in codes:
        codes_index.append(index_counter)
        index_counter += len(item)
    train_num_samples = int(len(codes) * (1 - val_split))
    train_codes = np.concatenate(codes[:train_num_samples])
    train_codes_index = np.array(codes_index[:train_num_samples])
    val_codes = np.concatenate(codes[train_num_samples:])
    val_codes_index = np.array(codes_index[train_num_samples:])
    val_codes_index -= np.min(val_codes_index)
    seed_save_data(samples[:train_num_samples], train_codes, train_codes_index, output_dir, "train", rank)
    seed_save_data(samples[train_num_samples:], val_codes, val_codes_index, output_dir, "val", rank)


def _shard_id(filename: str) -> int:
    shard_id, _ = filename.split(".")
    return int(shard_id.split("_")[-1])


def seed_merger(dataset_path: str) -> None:
    """data_merger.main without --remove_shards: every check it makes, then the merged files."""
    files = os.listdir(dataset_path)
    found = {}
    for split in ("train", "val"):
        found[split] = [
            sorted((f for f in files if fnmatch.fnmatch(f, pattern)), key=_shard_id)
            for pattern in (f"{split}_codes_[0-9]*.npy", f"{split}_codes_index_*.npy", f"{split}_samples_*.jsonl")
        ]
        assert len({len(names) for names in found[split]}) == 1, "codes/index/samples shard counts differ"
        for names in found[split]:
            assert [_shard_id(n) for n in names] == list(range(len(names))), "shard ids are not 0..n-1"
    assert len(found["train"][0]) == len(found["val"][0]), "train and val shard counts differ"
    for split in ("train", "val"):
        current_offset, all_codes, all_index, all_samples = 0, [], [], []
        for codes_name, index_name, samples_name in zip(*found[split], strict=True):
            shard_codes = np.memmap(os.path.join(dataset_path, codes_name), dtype=np.int32, mode="r")
            shard_index = np.load(os.path.join(dataset_path, index_name))
            with open(os.path.join(dataset_path, samples_name), encoding="utf-8") as sf:
                shard_samples = [line.rstrip("\n") for line in sf]
            assert len(shard_index) == len(shard_samples), f"{index_name}: codes_index length != samples lines"
            shard_index += current_offset
            all_codes.append(shard_codes.copy())
            all_index.append(shard_index)
            all_samples.extend(shard_samples)
            current_offset += shard_codes.shape[0]
        merged_codes, merged_index = np.concatenate(all_codes), np.concatenate(all_index)
        out = np.memmap(os.path.join(dataset_path, f"{split}_codes.npy"), dtype=np.int32, mode="w+",
                        shape=(merged_codes.shape[0],))
        out[:] = merged_codes
        out.flush()
        np.save(os.path.join(dataset_path, f"{split}_codes_index.npy"), merged_index, allow_pickle=False)
        with open(os.path.join(dataset_path, f"{split}_samples.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in all_samples)
        seed_validate_merged(dataset_path, split)


def seed_validate_merged(dataset_path: str, split: str) -> None:
    """data_merger.validate_merged_shards."""
    np.memmap(os.path.join(dataset_path, f"{split}_codes.npy"), dtype=np.int32, mode="r")
    codes_index = np.load(os.path.join(dataset_path, f"{split}_codes_index.npy"))
    with open(os.path.join(dataset_path, f"{split}_samples.jsonl"), encoding="utf-8") as f:
        samples = [line.rstrip("\n") for line in f]
    assert len(samples) == len(codes_index), "merged codes_index length != samples lines"


def seed_loader(dataset_dir: str, split: str) -> list[tuple[dict, np.ndarray]]:
    """data_utils.load_and_filter_audio_codes_and_samples' read (its filters left out)."""
    codes = np.memmap(os.path.join(dataset_dir, f"{split}_codes.npy"), dtype=np.int32, mode="r")
    codes_index = np.load(os.path.join(dataset_dir, f"{split}_codes_index.npy"))
    number_of_codes = codes.shape[0]
    out = []
    with open(os.path.join(dataset_dir, f"{split}_samples.jsonl"), encoding="utf-8") as f:
        for idx, line in enumerate(f):
            left = codes_index[idx]
            right = codes_index[idx + 1] if idx < len(codes_index) - 1 else number_of_codes
            out.append((json.loads(line), np.array(codes[left:right])))
    return out


# ------------------------------------------------------------------------- a seed-made dataset
def seed_dataset(root: Path, shard_sizes: tuple[int, ...] = (9, 11, 10), val_split: float = 0.2) -> dict:
    """What the seed's vectorizer writes with len(shard_sizes) ranks; returns {split: [(record, codes)]}
    in merged order. Records look like its Sample.to_json (no num_codes)."""
    rng = np.random.default_rng(3)
    texts = transcripts()
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list] = {"train": [], "val": []}
    n = 0
    for rank, size in enumerate(shard_sizes):
        samples, codes = [], []
        for _ in range(size):
            samples.append({"id": f"utt{n}", "wav_path": f"/data/utt{n}.wav", "language": "en",
                            "transcript": texts[n % len(texts)], "duration": 1.0, "sample_rate": 24000,
                            "dataset_name": "libritts"})
            codes.append(learnable_codes(rng, int(rng.integers(10, 60)), CODEBOOK).tolist())
            n += 1
        seed_vectorizer_rank(str(root), rank, samples, codes, val_split)
        train = int(size * (1 - val_split))
        expected["train"] += list(zip(samples[:train], codes[:train], strict=True))
        expected["val"] += list(zip(samples[train:], codes[train:], strict=True))
    return expected


def assert_same_samples(got: list[tuple[dict, np.ndarray]], expected: list[tuple[dict, list[int]]]) -> None:
    assert len(got) == len(expected)
    for (record, codes), (want_record, want_codes) in zip(got, expected, strict=True):
        assert record["id"] == want_record["id"]
        np.testing.assert_array_equal(codes, want_codes)


def test_seed_files_are_what_the_docstring_says(tmp_path):
    """Guards the re-implementation above: codes raw int32 (no .npy header), N offsets, val rebased."""
    seed_dataset(tmp_path, shard_sizes=(5,), val_split=0.4)
    raw = (tmp_path / "train_codes_0.npy").read_bytes()
    assert not raw.startswith(shards.NPY_MAGIC)
    index = np.load(tmp_path / "train_codes_index_0.npy")
    val_index = np.load(tmp_path / "val_codes_index_0.npy")
    assert len(index) == 3 and len(val_index) == 2 and index[0] == 0 and val_index[0] == 0
    assert len(raw) // 4 > index[-1]  # the last sample runs to the end of the file


def test_seed_dataset_through_our_merge_reader_and_sft(tmp_path, capsys):
    data = tmp_path / "seed"
    expected = seed_dataset(data)
    # Shards, as the seed's vectorizer left them, read by our reader.
    shard = shards.read_shard(str(data), "val", 1)
    assert_same_samples([(shard.records[k], shard.sample(k)) for k in range(len(shard))], expected["val"][2:5])
    sharded = VectorizedSplit(str(data), "train")
    assert sharded.texts == [r["transcript"] for r, _ in expected["train"]]
    for k, (_, codes) in enumerate(expected["train"]):
        np.testing.assert_array_equal(sharded.sample_codes(k), codes)

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"modeling": {"parameters": {"codebook_size": CODEBOOK}}}))
    assert cli.main(["merge", "--config", str(cfg), "--dataset_path", str(data)]) == 0
    assert f"train: {len(expected['train'])} samples" in capsys.readouterr().out
    for split in shards.SPLITS:
        # Our merged files are still the seed's: its validator and loader read them.
        seed_validate_merged(str(data), split)
        assert_same_samples(seed_loader(str(data), split), expected[split])
        merged = shards.read_shard(str(data), split)
        assert_same_samples([(merged.records[k], merged.sample(k)) for k in range(len(merged))], expected[split])

    out = tmp_path / "sft"
    config = sft_config(data, out, max_steps=2)
    (tmp_path / "sft.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["sft", "--config", str(tmp_path / "sft.json"), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(printed[printed.index("{"):])
    # Every seed-made sample is kept by the load-time filters and a real batch gives a finite loss.
    assert plan["problems"] == [] and 0 < plan["first_batch_loss"] < 100
    assert sum(d["kept_by_filters"] for d in plan["data"]["train"]) == len(expected["train"])


def test_seed_merged_dataset_matches_our_merge_byte_for_byte(tmp_path):
    ours, seeds = tmp_path / "ours", tmp_path / "seeds"
    seed_dataset(ours)
    seed_dataset(seeds)
    seed_merger(str(seeds))
    assert cli.main(["merge", "--dataset_path", str(ours)]) == 0
    for split in shards.SPLITS:
        files = shards.shard_files(split)
        assert (ours / files.codes).read_bytes() == (seeds / files.codes).read_bytes()
        np.testing.assert_array_equal(np.load(ours / files.index), np.load(seeds / files.index))
        assert [json.loads(x) for x in (ours / files.samples).read_text().splitlines()] == [
            json.loads(x) for x in (seeds / files.samples).read_text().splitlines()
        ]
        # And our reader reads the seed merger's output.
        assert len(VectorizedSplit(str(seeds), split)) == len(shards.read_shard(str(ours), split))


# ------------------------------------------------------------------------ our data, the seed's way
@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> tuple[Path, Codec]:
    """Our vectorize of 10 short example clips in 3 units (4, 4, 2 lines), each unit with samples in
    both splits (the seed's merger cannot map an empty codes file), and its codec."""
    root = tmp_path_factory.mktemp("ours")
    codec = Codec.from_config(tiny_codec_config())
    codec.save(str(root / "codec"))
    records = sorted((json.loads(line) for line in EXAMPLE.read_text().splitlines()), key=lambda r: r["duration"])
    by_split = {s: [r for r in records if split_of(r, 0.5) == s] for s in shards.SPLITS}
    picked = [by_split[s][i] for i in range(5) for s in shards.SPLITS]  # train, val, train, val, ...
    manifest = root / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({**r, "wav_path": str((EXAMPLE.parent / r["wav_path"]).resolve())}) + "\n" for r in picked
    ))
    out = root / "out"
    args = ["vectorize", "--codec_model_path", str(root / "codec"), "--dataset_path", str(manifest),
            "--output_dir", str(out), "--set", "metrics.port=0", "--set", "vectorize.samples_per_shard=4",
            "--val_split", "0.5", "--batch_size", "3"]
    assert cli.main(args) == 0
    return out, codec


def expected_codes(codec: Codec, records: list[dict]) -> list[np.ndarray]:
    """Each clip encoded on its own (the codec's codes do not depend on the batch)."""
    audios = [read_audio(r["resolved_wav_path"]) for r in records]
    return [codec.encode([a.samples], a.sample_rate)[0] for a in audios]


def test_our_vectorize_and_merge_read_by_the_seed(ours, tmp_path):
    out, codec = ours
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for p in out.iterdir():
        (seeds / p.name).write_bytes(p.read_bytes())
    # Every split of every unit holds samples here, which the seed's merger needs (it cannot map an
    # empty codes file); its merger accepts our shards and its loader reads what it merged.
    assert all(len(shards.read_shard(str(out), s, i)) for s in shards.SPLITS for i in range(3))
    seed_merger(str(seeds))
    assert cli.main(["merge", "--dataset_path", str(out)]) == 0
    total = 0
    for split in shards.SPLITS:
        seed_validate_merged(str(out), split)
        from_ours, from_seeds = seed_loader(str(out), split), seed_loader(str(seeds), split)
        records = [record for record, _ in from_ours]
        want = expected_codes(codec, records)
        for (record, codes), want_codes in zip(from_ours, want, strict=True):
            assert len(codes) == record["num_codes"] > 0
            np.testing.assert_array_equal(codes, want_codes)
        assert_same_samples(from_seeds, [(r, c) for r, c in zip(records, want, strict=True)])
        total += len(records)
        # The seed's merger's check on our shards and merged files: index length == samples lines.
        for i in [*range(3), None]:
            files = shards.shard_files(split, i)
            lines = (out / files.samples).read_text().count("\n")
            assert len(np.load(out / files.index)) == lines
            assert not (out / files.codes).read_bytes().startswith(shards.NPY_MAGIC)
    assert total == 10
    # Our extra files sit beside the seed's names.
    assert {"dataset_info.json", "vectorize_summary.json", "_merged.json", "_done_0.json",
            "rejects_0.jsonl"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------------- the layout we wrote before
def write_legacy_shard(root: Path, split: str, shard: int | None, codes: list[np.ndarray], records: list[dict]) -> None:
    """This trainer's earlier writer: codes as a real .npy (header), N+1 boundary offsets."""
    files = shards.shard_files(split, shard)
    bounds = np.zeros(len(codes) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in codes], out=bounds[1:])
    np.save(root / files.codes, np.concatenate(codes).astype(np.int32))
    np.save(root / files.index, bounds)
    (root / files.samples).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_legacy_and_seed_shards_merge_together_into_the_seed_layout(tmp_path):
    rng = np.random.default_rng(1)
    expected: dict[str, list] = {"train": [], "val": []}
    for i, n in enumerate((3, 4, 2, 1)):  # train_0 legacy, train_1 seed, val_0 legacy, val_1 seed
        split, shard = "train" if i < 2 else "val", i % 2
        codes = [rng.integers(0, CODEBOOK, int(rng.integers(1, 20))) for _ in range(n)]
        records = [{"id": f"{split}{shard}-{k}", "transcript": "x", "num_codes": len(c)} for k, c in enumerate(codes)]
        if shard == 0:
            write_legacy_shard(tmp_path, split, shard, codes, records)
        else:
            shards.write_shard(str(tmp_path), split, shard, codes, records)
        expected[split] += list(zip(records, codes, strict=True))

    def read_split(root: Path, split: str) -> list[tuple[dict, np.ndarray]]:
        data = VectorizedSplit(str(root), split)
        return [(r, data.sample_codes(k)) for k, (r, _) in enumerate(expected[split])]

    for split in shards.SPLITS:
        assert_same_samples(read_split(tmp_path, split), expected[split])
    legacy_merged = tmp_path / "legacy"
    legacy_merged.mkdir()
    train_codes, train_records = [c for _, c in expected["train"]], [r for r, _ in expected["train"]]
    write_legacy_shard(legacy_merged, "train", None, train_codes, train_records)
    assert_same_samples(read_split(legacy_merged, "train"), expected["train"])
    merged = shards.read_shard(str(legacy_merged), "train")
    assert_same_samples([(merged.records[k], merged.sample(k)) for k in range(len(merged))], expected["train"])

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"modeling": {"parameters": {"codebook_size": CODEBOOK}}}))
    assert cli.main(["merge", "--config", str(cfg), "--dataset_path", str(tmp_path)]) == 0
    for split in shards.SPLITS:
        assert_same_samples(seed_loader(str(tmp_path), split), expected[split])


def test_a_raw_file_that_looks_like_npy_is_a_clear_error(tmp_path, capsys):
    # b"\x93NUM" read as a little-endian int32 is 1297436307: never a code, so never a valid raw file.
    assert int(np.frombuffer(shards.NPY_MAGIC[:4], "<i4")[0]) == 1297436307
    shards.write_shard(str(tmp_path), "train", 0, [np.array([1, 2, 3])], [{"id": "a", "transcript": "x"}])
    shards.write_shard(str(tmp_path), "val", 0, [np.array([1, 2])], [{"id": "b", "transcript": "x"}])
    (tmp_path / "train_codes_0.npy").write_bytes(shards.NPY_MAGIC + b"\x00\x00\x00\x00\x00\x00")
    assert cli.main(["merge", "--dataset_path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "train_codes_0.npy: starts with the .npy magic but is not a valid .npy" in err and "Traceback" not in err


# --------------------------------------------------------------------------- merge --only_glue_samples
def test_only_glue_samples_concatenates_samples_files_in_shard_order(tmp_path, capsys):
    for i in (0, 2, 10, 1):
        (tmp_path / f"samples_{i}.jsonl").write_text(
            "".join(json.dumps({"id": f"{i}-{k}", "transcript": "é"}) + "\n" for k in range(2))
        )
    shards.write_shard(str(tmp_path), "train", 0, [np.array([1])], [{"id": "t"}])  # left alone
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli.main(["merge", "--dataset_path", str(tmp_path), "--only_glue_samples"]) == 0
    assert "samples.jsonl: 8 samples from 4 files" in capsys.readouterr().out
    glued = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in glued] == [f"{i}-{k}" for i in (0, 1, 2, 10) for k in range(2)]
    assert glued[0]["transcript"] == "é"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "samples.jsonl"} == before
    assert not (tmp_path / "train_codes.npy").exists()

    (tmp_path / "samples_3.jsonl").write_text('{"id": 1}\n{broken\n')
    (tmp_path / "samples.jsonl").unlink()
    assert cli.main(["merge", "--dataset_path", str(tmp_path), "--only_glue_samples"]) == 1
    err = capsys.readouterr().err
    assert "samples_3.jsonl:2: not JSON" in err and not (tmp_path / "samples.jsonl").exists()
    assert not list(tmp_path.glob(".*tmp-*"))
