"""Packing, mixing and the packed dataset: whole samples, efficiency, rank sharding, exact resume."""

import fsspec
import numpy as np
import pytest
from speechlm_fixtures import write_vectorized

from trainer.data.dataset import PackedData, SamplerState, VectorizedSplit
from trainer.data.mixing import epoch_picks
from trainer.data.packing import pack_rows, packing_stats
from trainer.model.build import build_speechlm
from trainer.model.prompt import IGNORE_INDEX, PromptFormat


@pytest.fixture(scope="module")
def prompt():
    _, tokenizer, vocab = build_speechlm("tiny", 64)
    return PromptFormat(tokenizer, vocab)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_vectorized(tmp_path_factory.mktemp("vec"), n_train=60, n_val=6)


def test_pack_rows_keeps_samples_whole_and_is_efficient():
    rng = np.random.default_rng(0)
    seconds = np.clip(rng.lognormal(np.log(5), 0.6, 5000), 1, 20)
    lengths = (seconds * 50 + 20).astype(int)
    rows = pack_rows(lengths, 4096)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every sample exactly once, never split
    assert all(sum(lengths[i] for i in row) <= 4096 for row in rows)
    stats = packing_stats(lengths, rows, 4096)
    print(f"packing efficiency {stats.efficiency:.4f} over {stats.rows} rows")
    assert stats.efficiency >= 0.98
    assert pack_rows(lengths, 4096) == rows  # deterministic


def test_pack_rows_rejects_oversized_sample():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(np.array([10, 300]), 256)


def test_weighted_mixing_counts():
    picks = epoch_picks([10, 20], [2.0, 0.5], seed=1, epoch=0)
    first = picks[picks[:, 0] == 0][:, 1]
    second = picks[picks[:, 0] == 1][:, 1]
    assert sorted(first.tolist()) == sorted(list(range(10)) * 2)
    assert len(second) == 10 and len(set(second.tolist())) == 10
    assert not np.array_equal(picks, epoch_picks([10, 20], [2.0, 0.5], seed=1, epoch=1))
    assert np.array_equal(picks, epoch_picks([10, 20], [2.0, 0.5], seed=1, epoch=0))


def _data(data_dir, prompt, **kw):
    args = dict(max_seq_len=256, pack_length=256, batch_size=2, seed=3, codebook_size=64)
    args.update(kw)
    return PackedData({str(data_dir): 1.0}, "train", prompt, **args)


def test_batches_have_per_sample_boundaries(data_dir, prompt):
    data = _data(data_dir, prompt)
    batch, _ = next(data.iterate(SamplerState()))
    row_ids, row_pos, row_doc, row_tgt = batch.input_ids[0], batch.position_ids[0], batch.doc_ids[0], batch.targets[0]
    for doc in row_doc.unique().tolist()[:-1]:
        where = (row_doc == doc).nonzero().reshape(-1)
        assert row_pos[where].tolist() == list(range(len(where)))  # positions restart per sample
        assert row_ids[where[0]] == prompt.tokenizer.bos_token_id
        assert row_tgt[where[-1]] == IGNORE_INDEX  # a sample never predicts the next sample's first token
        assert row_tgt[where[-2]] == prompt.vocab.speech_end_id
    assert batch.real_tokens == int((batch.doc_ids != batch.doc_ids.max(dim=1, keepdim=True).values).sum())


def test_two_ranks_see_disjoint_data(data_dir, prompt):
    seen = []
    for rank in (0, 1):
        data = _data(data_dir, prompt, rank=rank, world_size=2, batch_size=1)
        it = data.iterate(SamplerState())
        ids = set()
        for _ in range(data.batches_per_epoch(0)):
            batch, _ = next(it)
            ids.add(tuple(batch.input_ids[0].tolist()))
        seen.append(ids)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_sampler_resume_continues_exactly(data_dir, prompt):
    data = _data(data_dir, prompt, batch_size=1)
    it = data.iterate(SamplerState())
    run = [next(it) for _ in range(data.batches_per_epoch(0) + 5)]  # crosses an epoch boundary
    cut = len(run) - 8
    resumed = _data(data_dir, prompt, batch_size=1).iterate(run[cut - 1][1])
    for batch, state in run[cut:]:
        again, again_state = next(resumed)
        assert again_state == state
        assert np.array_equal(again.input_ids, batch.input_ids)


def test_too_long_samples_are_skipped_and_counted(data_dir, prompt):
    data = _data(data_dir, prompt, pack_length=64, max_seq_len=64)
    assert data.skipped > 0
    assert all(sum(data.lengths[d][k] for d, k in row) <= 64 for row in data.rows(0))


def test_sharded_equals_merged_and_reads_remote(tmp_path):
    merged = VectorizedSplit(str(write_vectorized(tmp_path / "m", seed=5)), "train")
    sharded = VectorizedSplit(str(write_vectorized(tmp_path / "s", seed=5, sharded=True)), "train")
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "s").iterdir():
        fs.pipe_file(f"/vec/{f.name}", f.read_bytes())
    remote = VectorizedSplit("memory://vec", "train")
    assert len(merged) == len(sharded) == len(remote) == 48
    for k in (0, 23, 24, 47):
        assert np.array_equal(merged.sample_codes(k), sharded.sample_codes(k))
        assert np.array_equal(merged.sample_codes(k), remote.sample_codes(k))
        assert merged.texts[k] == sharded.texts[k]
