"""`tts-train merge`: round trip from real vectorize output, validation, atomic removal, resumption."""

from __future__ import annotations

import json
import re
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

from trainer import cli, io
from trainer.codec import Codec, tiny_codec_config
from trainer.data import shards
from trainer.data.merge import merge
from trainer.errors import StageError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example" / "configs" / "samples.jsonl"
SHARD_FILE = re.compile(r"(train|val)_(codes|codes_index|samples)_\d+\.(npy|jsonl)")


def synthetic_dataset(url: str, shard_sizes: dict[str, list[int]], codebook_size: int = 256) -> dict:
    """Shards of random codes; returns {split: [(codes, record), ...]} in shard order."""
    rng = np.random.default_rng(0)
    expected: dict[str, list] = {}
    for split, sizes in shard_sizes.items():
        expected[split] = []
        for i, size in enumerate(sizes):
            codes = [rng.integers(0, codebook_size, rng.integers(1, 30)) for _ in range(size)]
            records = [{"id": f"{split}-{i}-{k}", "transcript": "x", "num_codes": len(c)} for k, c in enumerate(codes)]
            shards.write_shard(url, split, i, codes, records)
            expected[split] += list(zip(codes, records, strict=True))
    io.write_json_atomic(io.join(url, shards.DATASET_INFO), {"codebook_size": codebook_size, "token_rate": 50})
    return expected


def assert_merged(url: str, expected: dict) -> None:
    for split, items in expected.items():
        merged = shards.read_shard(url, split)
        shards.validate_shard(merged, 256, split)
        assert merged.records == [r for _, r in items]
        for k, (codes, _) in enumerate(items):
            np.testing.assert_array_equal(merged.sample(k), codes)


@pytest.fixture(scope="module")
def vectorized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vectorized")
    Codec.from_config(tiny_codec_config()).save(str(root / "codec"))
    records = sorted((json.loads(line) for line in EXAMPLE.read_text().splitlines()), key=lambda r: r["duration"])
    manifest = root / "m.jsonl"
    lines = [json.dumps({**r, "wav_path": str((EXAMPLE.parent / r["wav_path"]).resolve())}) for r in records[:12]]
    manifest.write_text("\n".join([*lines, "not json"]) + "\n")
    out = root / "out"
    args = ["vectorize", "--codec_model_path", str(root / "codec"), "--dataset_path", str(manifest),
            "--output_dir", str(out), "--set", "metrics.port=0", "--set", "vectorize.samples_per_shard=4",
            "--set", "vectorize.val_fraction=0.3"]
    assert cli.main(args) == 0
    return out


def test_merge_round_trip_then_remove_shards(vectorized, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    for p in vectorized.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    before = {split: [shards.read_shard(str(out), split, i) for i in range(4)] for split in shards.SPLITS}
    expected = {
        split: [(s.sample(k), s.records[k]) for s in shard_list for k in range(len(s))]
        for split, shard_list in before.items()
    }
    assert all(expected.values())  # both splits hold samples

    assert cli.main(["merge", "--dataset_path", str(out)]) == 0
    assert_merged(str(out), expected)
    assert shards.shard_ids(str(out), "train") == [0, 1, 2, 3]  # kept without --remove_shards
    summary = json.loads((out / "vectorize_summary.json").read_text())
    record = json.loads((out / "_merged.json").read_text())
    assert record["splits"]["train"]["samples"] + record["splits"]["val"]["samples"] == summary["accepted"]["total"]

    merged_bytes = {p.name: p.read_bytes() for p in out.glob("*_codes.npy")}
    assert cli.main(["merge", "--dataset_path", str(out), "--remove_shards"]) == 0
    assert not [p.name for p in out.iterdir() if SHARD_FILE.fullmatch(p.name)]
    assert list(out.glob("rejects_*.jsonl")) and (out / "vectorize_summary.json").exists()
    assert {p.name: p.read_bytes() for p in out.glob("*_codes.npy")} == merged_bytes
    # Nothing left to merge: a re-run is a no-op, not an error and not an empty dataset.
    assert cli.main(["merge", "--dataset_path", str(out), "--remove_shards"]) == 0
    assert_merged(str(out), expected)
    assert not list(out.glob(".*tmp-*"))


def test_interrupted_removal_is_finished_by_a_rerun(tmp_path):
    expected = synthetic_dataset(str(tmp_path), {"train": [3, 2, 4], "val": [1, 0, 2]})
    merge(str(tmp_path), remove=False, codebook_size=256)
    # A kill during removal: some shards are gone, the merged files and _merged.json are complete.
    for name in astuple(shards.shard_files("train", 1)):
        (tmp_path / name).unlink()
    merge(str(tmp_path), remove=True, codebook_size=256)
    assert_merged(str(tmp_path), expected)
    assert not shards.shard_ids(str(tmp_path), "train") and not shards.shard_ids(str(tmp_path), "val")


@pytest.mark.parametrize(
    "damage",
    ["code_out_of_range", "index_past_codes", "num_codes_mismatch", "index_short", "codes_torn", "index_raw"],
)
def test_invalid_shards_stop_the_merge_before_anything_is_written(tmp_path, capsys, damage):
    synthetic_dataset(str(tmp_path), {"train": [3, 3], "val": [2]})
    files = shards.shard_files("train", 1)
    codes_path, index_path = tmp_path / files.codes, tmp_path / files.index
    codes, index = np.fromfile(codes_path, dtype="<i4"), np.load(index_path)
    if damage == "code_out_of_range":
        codes[-1] = 256
        codes.tofile(codes_path)
    elif damage == "index_past_codes":
        index[-1] = len(codes) + 5
        np.save(index_path, index)
    elif damage == "index_short":
        np.save(index_path, index[:-1])
    elif damage == "codes_torn":  # a write cut mid-code
        codes_path.write_bytes(codes_path.read_bytes()[:-2])
    elif damage == "index_raw":  # offsets written like the codes, without the np.save header
        index_path.write_bytes(index.tobytes())
    else:
        lines = (tmp_path / files.samples).read_text().splitlines()
        lines[0] = json.dumps({**json.loads(lines[0]), "num_codes": 999})
        (tmp_path / files.samples).write_text("\n".join(lines) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    assert cli.main(["merge", "--dataset_path", str(tmp_path), "--remove_shards"]) == 1
    err = capsys.readouterr().err
    assert (files.codes in err or files.index in err) and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no merged files, every shard kept


def test_merge_refuses_an_unfinished_vectorize(tmp_path, capsys):
    synthetic_dataset(str(tmp_path), {"train": [2], "val": [1]})
    (tmp_path / "_done_0.json").write_text("{}")
    assert cli.main(["merge", "--dataset_path", str(tmp_path)]) == 1
    assert "vectorize has not finished" in capsys.readouterr().err
    assert not (tmp_path / "train_codes.npy").exists()


def test_seed_shards_without_dataset_info_use_the_config_codebook(tmp_path, capsys):
    # The seed trainer writes shards only: no dataset_info.json.
    shards.write_shard(str(tmp_path), "train", 0, [np.array([5, 69999])], [{"id": "a", "num_codes": 2}])
    (tmp_path / "cfg.yaml").write_text("modeling:\n  parameters:\n    codebook_size: 65536\n")
    assert cli.main(["merge", "--config", str(tmp_path / "cfg.yaml"), "--dataset_path", str(tmp_path)]) == 1
    assert "outside [0, 65536)" in capsys.readouterr().err


def test_merge_over_fsspec_url():
    url = "memory://merge-test/ds"
    expected = synthetic_dataset(url, {"train": [2, 3], "val": [1, 1]})
    merge(url, remove=True, codebook_size=256)
    assert_merged(url, expected)
    assert not shards.shard_ids(url, "train")
    io.remove("memory://merge-test", recursive=True)


def test_merge_needs_an_existing_directory(tmp_path, capsys):
    assert cli.main(["merge", "--dataset_path", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(StageError, match="no shards"):
        merge(str(tmp_path), remove=False, codebook_size=256)
