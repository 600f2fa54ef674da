"""Codec public API: shapes, the 50 tokens/s invariant, code range, padding isolation, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.audio import read_audio
from trainer.codec import Codec, tiny_codec_config
from trainer.config import load_config
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    return Codec.from_config(tiny_codec_config())


def _waves(rng: np.random.Generator, seconds: list[float], rate: int) -> list[np.ndarray]:
    t = [np.arange(int(s * rate)) / rate for s in seconds]
    return [(0.3 * np.sin(2 * np.pi * 220 * x) + 0.05 * rng.standard_normal(len(x))).astype(np.float32) for x in t]


@pytest.mark.parametrize("sample_rate", [16000, 24000, 48000])
def test_shapes_and_token_rate_for_every_decoder_rate(sample_rate: int) -> None:
    torch.manual_seed(1)
    codec = Codec.from_config(tiny_codec_config(sample_rate))
    assert codec.token_rate == 50 and codec.input_sample_rate == 16000
    assert codec.output_sample_rate == sample_rate
    rng = np.random.default_rng(0)
    seconds = [1.0, 0.37, 2.013]
    for input_rate in (16000, 22050, 44100):
        codes = codec.encode(_waves(rng, seconds, input_rate), input_rate)
        for s, c in zip(seconds, codes, strict=False):
            assert c.ndim == 1 and c.dtype == np.int64
            assert abs(len(c) - math.ceil(s * 50)) <= 1
    audio = codec.decode(codes)
    for c, a in zip(codes, audio, strict=False):
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert len(a) == len(c) * sample_rate // 50


def test_codes_are_in_range_and_vary(codec: Codec) -> None:
    codes = codec.encode(_waves(np.random.default_rng(1), [1.5, 0.8], 16000), 16000)
    joined = np.concatenate(codes)
    assert joined.min() >= 0 and joined.max() < codec.codebook_size == 256
    assert len(np.unique(joined)) > 5


def test_random_init_codec_spreads_real_speech_over_many_codes() -> None:
    """At init the encoder must pass speech through at O(1) scale; a vanishing encoder maps every
    frame to one code and everything trained on those codes learns a constant."""
    manifest = REPO / "example" / "configs" / "samples.jsonl"
    if not manifest.exists():
        pytest.skip("example dataset not generated")
    records = [json.loads(line) for line in manifest.read_text().splitlines()[:4]]
    waves = [read_audio(str(manifest.parent / r["wav_path"])).samples for r in records]
    for seed in (0, 1):
        torch.manual_seed(seed)
        codes = np.concatenate(Codec.from_config(tiny_codec_config()).encode(waves, 16000))
        assert len(np.unique(codes)) >= 20, np.unique(codes)


def test_batched_encode_equals_each_item_alone(codec: Codec) -> None:
    waves = _waves(np.random.default_rng(2), [0.3, 1.7, 0.95, 1.0, 0.02, 1.33], 16000)
    batched = codec.encode(waves, 16000, batch_size=6)
    for wave, codes in zip(waves, batched, strict=False):
        alone = codec.encode([wave], 16000)[0]
        np.testing.assert_array_equal(codes, alone)
    assert len({len(c) for c in batched}) > 1  # lengths really differed inside the batch


def test_batched_decode_matches_single_and_prompt_decode_returns_the_continuation(codec: Codec) -> None:
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, 256, n) for n in (7, 30, 18)]
    batched = codec.decode(codes)
    for c, audio in zip(codes, batched, strict=False):
        np.testing.assert_allclose(audio, codec.decode([c])[0], atol=1e-4)
    prompt = rng.integers(0, 256, 12)
    continued = codec.decode([codes[0]], prompt_codes=[prompt])[0]
    whole = codec.decode([np.concatenate([prompt, codes[0]])])[0]
    assert len(continued) == len(codes[0]) * 320
    np.testing.assert_allclose(continued, whole[len(prompt) * 320 :], atol=1e-5)
    # The prompt is context, not decoration: the continuation differs from decoding the codes alone.
    assert not np.allclose(continued, batched[0], atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        codec.decode([np.array([256])])


def test_save_load_round_trip_and_separate_components(codec: Codec, tmp_path) -> None:
    waves = _waves(np.random.default_rng(4), [0.6, 1.1], 16000)
    codes = codec.encode(waves, 16000)
    audio = codec.decode(codes)
    codec.save(str(tmp_path / "codec"))
    assert (tmp_path / "codec" / "_COMPLETE").exists()
    assert (tmp_path / "codec" / "model.safetensors").exists()
    # A directory an older release wrote (pickled model.pt) still loads.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model_config.json").write_bytes((tmp_path / "codec" / "model_config.json").read_bytes())
    torch.save({"model": codec.codec_state_dict(), "components": ["encoder", "decoder"]}, legacy / "model.pt")
    for path in (tmp_path / "codec", tmp_path / "codec" / "model.safetensors", legacy, legacy / "model.pt"):
        loaded = Codec.load(str(path))
        for a, b in zip(loaded.encode(waves, 16000), codes, strict=False):
            np.testing.assert_array_equal(a, b)
    decoder = Codec.load(str(tmp_path / "codec"), components=("decoder",))
    assert not hasattr(decoder, "acoustic_encoder")
    for a, b in zip(decoder.decode(codes), audio, strict=False):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(RuntimeError, match="without its encoder"):
        decoder.encode(waves, 16000)
    encoder = Codec.load(str(tmp_path / "codec"), components=("encoder",))
    assert not hasattr(encoder, "backbone")
    np.testing.assert_array_equal(encoder.encode(waves, 16000)[1], codes[1])


def test_loading_garbage_fails_clearly(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Codec.load(str(tmp_path / "nope"))
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="neither a codec checkpoint"):
        Codec.load(str(tmp_path / "x.pt"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["codec.model.sample_rate=48000"], "codec.model: .*prod\\(upsample_factors\\) must equal token_rate"),
        (["codec.model.encoder_strides=[2,2,4,4,4]"], "codec.model: .*prod\\(encoder_strides\\)"),
        (["codec.model.fsq_levels=[4,1]"], "codec.model: fsq_levels"),
        (
            ["codec.model.decoder_dim=48", "codec.model.decoder_heads=4"],
            "codec.model: decoder_dim must be divisible by 32",
        ),
        (["codec.model.sample_rate=22050"], "codec.model.sample_rate"),
        (["codec.train.batch_size=0"], "codec.train.batch_size"),
        (["codec.model.fsq_level=[4]"], "codec.model.fsq_level: extra inputs"),
    ],
)
def test_bad_codec_configs_fail_with_their_key_path(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_semantic_branch_from_a_local_wav2vec2_bert_dir(tmp_path) -> None:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(5)
    w2v_dir = tmp_path / "w2v"
    w2v = Wav2Vec2BertModel(
        Wav2Vec2BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            output_hidden_size=32, conv_depthwise_kernel_size=3,
        )
    )
    w2v.save_pretrained(w2v_dir)
    SeamlessM4TFeatureExtractor().save_pretrained(w2v_dir)
    config = tiny_codec_config().model_copy(update={"semantic": str(w2v_dir), "semantic_dim": 32, "semantic_layer": 2})
    codec = Codec.from_config(config)
    waves = _waves(np.random.default_rng(6), [1.0, 0.5], 16000)
    codes = codec.encode(waves, 16000)
    assert [len(c) for c in codes] == [51, 26]  # X-codec2 pads a whole hop onto exact multiples
    assert codec.semantic_model is not None
    assert not any(k.startswith("semantic_model.") for k in codec.codec_state_dict())
    codec.save(str(tmp_path / "codec"))
    np.testing.assert_array_equal(Codec.load(str(tmp_path / "codec")).encode(waves, 16000)[0], codes[0])
    with pytest.raises(ConfigError, match="not a local directory"):
        Codec.from_config(config.model_copy(update={"semantic": str(tmp_path / "missing")})).encode(waves, 16000)
    with pytest.raises(ConfigError, match="hidden_size"):
        Codec.from_config(config.model_copy(update={"semantic_dim": 64})).encode(waves, 16000)


def test_length_buckets_bound_padding_and_keep_every_item():
    from trainer.codec.model import MAX_PADDING_FRACTION, length_buckets

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(320, 320 * 750, 200)]
    buckets = length_buckets(lengths, batch_size=16)
    assert sorted(i for b in buckets for i in b) == list(range(200))
    for bucket in buckets:
        real = sum(lengths[i] for i in bucket)
        assert len(bucket) <= 16
        assert len(bucket) == 1 or max(lengths[i] for i in bucket) * len(bucket) <= (1 + MAX_PADDING_FRACTION) * real
    assert len(buckets) < 200  # it still batches
