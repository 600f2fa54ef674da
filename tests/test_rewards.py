"""Rewards on real example speech (flite/espeak voices): each scorer must rank the right thing higher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.audio import read_audio
from trainer.codec import Codec, tiny_codec_config
from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.rl.rewards import RewardBatch, RewardScorer, ScorerModels, build_reward_funcs
from trainer.rl.rewards.rules import duration_reward, repetition_reward
from trainer.scoring.asr import MAX_ERROR_RATE, corpus_error_rate, error_rate, load_transcriber, normalize_for_wer
from trainer.scoring.quality import DNSMOS
from trainer.scoring.speaker import EmbeddingCache, cosine_similarity, load_speaker_encoder

EXAMPLE_MANIFEST = Path(__file__).resolve().parents[1] / "example" / "configs" / "samples.jsonl"


def _records() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE_MANIFEST.read_text().splitlines() if line.strip()]


def _wave(record: dict) -> np.ndarray:
    audio = read_audio(str(EXAMPLE_MANIFEST.parent / record["wav_path"]))
    assert audio.sample_rate == 16000
    return audio.samples


@pytest.fixture(scope="module")
def short_flite() -> list[dict]:
    """Short clips of the four flite voices (pocketsphinx transcribes those well)."""
    picked: dict[str, list[dict]] = {}
    for r in sorted(_records(), key=lambda r: r["duration"]):
        if r["speaker_id"] in {"rms", "kal16", "awb", "slt"} and 1.5 <= r["duration"] <= 4.0:
            picked.setdefault(r["speaker_id"], []).append(r)
    assert len(picked) == 4 and all(len(v) >= 2 for v in picked.values())
    return [v[i] for v in picked.values() for i in range(2)]


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_error_rate_normalises_and_uses_cer_for_cjk():
    assert error_rate("hello, WORLD!", "Hello world.") == 0.0
    assert error_rate("", "two words") == 1.0
    assert error_rate("a b c d e f g h i j k l", "one") == 5.0  # clipped
    assert error_rate("你好世界", "你好，世界。", "zh") == 0.0
    assert math.isclose(error_rate("你好世", "你好世界", "zh"), 0.25)
    assert normalize_for_wer("It's  fine, OK?") == "its fine ok"
    assert corpus_error_rate(["a b", "c"], ["a b", "c d"]) == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        error_rate("x", " ,. ")


def test_pocketsphinx_ground_truth_beats_wrong_sentence_and_noise(short_flite):
    asr = load_transcriber("pocketsphinx")
    record = short_flite[0]
    other = next(r for r in short_flite if r["transcript"] != record["transcript"])
    texts = asr.transcribe([_wave(record), _wave(other), _noise(2.0), np.zeros(0, np.float32)], 16000)
    truth = error_rate(texts[0], record["transcript"])
    assert truth < 0.5, texts[0]
    assert truth < error_rate(texts[1], record["transcript"])
    assert truth < error_rate(texts[2], record["transcript"])
    assert texts[3] == ""


def test_pocketsphinx_transcript_of_a_clip_does_not_depend_on_the_clips_before_it(short_flite):
    """Eval rows and a GRPO group's rewards must not depend on their neighbours in a batch."""
    waves = [_wave(r) for r in short_flite]
    alone = [load_transcriber("pocketsphinx").transcribe([w], 16000)[0] for w in waves]  # a new one each
    asr = load_transcriber("pocketsphinx")
    after_noise = asr.transcribe([x for i, w in enumerate(waves) for x in (_noise(1.0, seed=i) * 5, w)], 16000)[1::2]
    assert after_noise == alone
    assert asr.transcribe(waves[::-1], 16000)[::-1] == alone


def test_speaker_similarity_same_voice_above_different_voice(short_flite):
    encoder = load_speaker_encoder("resemblyzer")
    emb = encoder.embed([_wave(r) for r in short_flite] + [np.zeros(0, np.float32)], 16000)
    assert np.isnan(emb[-1]).all()
    emb = emb[:-1]
    speakers = [r["speaker_id"] for r in short_flite]
    same, different = [], []
    for i in range(len(speakers)):
        for j in range(i + 1, len(speakers)):
            cos = float(cosine_similarity(emb[i], emb[j])[0])
            (same if speakers[i] == speakers[j] else different).append(cos)
    assert min(same) > np.mean(different)
    assert np.mean(same) > max(different) - 0.05


def test_dnsmos_speech_above_noise_and_matches_speechmos_on_long_clip(short_flite):
    from speechmos import dnsmos as speechmos_dnsmos

    model = DNSMOS()
    speech = _wave(short_flite[0])
    long_clip = np.concatenate([_wave(r) for r in short_flite[:4]])  # > 9 s: same windows as speechmos
    scores = model.score([speech, _noise(3.0), long_clip, np.zeros(0, np.float32)], 16000)
    assert scores[0]["ovrl"] > scores[1]["ovrl"] + 0.8
    assert math.isnan(scores[3]["ovrl"])
    reference = speechmos_dnsmos.run(np.clip(long_clip, -1, 1), 16000)
    assert scores[2]["ovrl"] == pytest.approx(reference["ovrl_mos"], abs=1e-4)
    assert scores[2]["sig"] == pytest.approx(reference["sig_mos"], abs=1e-4)
    # Personalised DNSMOS (the seed's reward: torchmetrics personalized=True) is speechmos's pDNSMOS.
    personal = DNSMOS(personalized=True).score([long_clip], 16000)[0]
    reference = speechmos_dnsmos.run(np.clip(long_clip, -1, 1), 16000, model_type="dnsmos_personalized")
    assert personal["ovrl"] == pytest.approx(reference["ovrl_mos"], abs=1e-4)
    assert personal["ovrl"] != pytest.approx(scores[2]["ovrl"], abs=1e-3)


def test_reference_reward_names_build_and_dnsmos_reward_is_personalised_by_default():
    # Every reward class of the seed's tts/training/rlhf/rewards.py (tts/core/constants.py names).
    names = ["WERRewardFunc", "DNSMOSRewardFunc", "SimilarityRewardFunc"]
    config = load_config(overrides=[f"rlhf_training.reward_funcs={json.dumps(names)}"])
    funcs = build_reward_funcs(config.rlhf_training.reward_funcs, ScorerModels())
    assert [f.name for f in funcs] == names
    assert funcs[1].dnsmos.personalized
    plain = build_reward_funcs(["DNSMOSRewardFunc"], ScorerModels(dnsmos_personalized=False))
    assert not plain[0].dnsmos.personalized


def test_nothing_recognised_scores_the_max_error_rate_as_in_the_seed(short_flite):
    wer = build_reward_funcs(["WERRewardFunc"], ScorerModels())[0]
    record = short_flite[0]
    hiss = (np.random.default_rng(0).standard_normal(16000) * 0.001).astype(np.float32)
    batch = RewardBatch(
        waves=[_wave(record), hiss], references=[np.zeros(0, np.float32)] * 2, reference_keys=["a", "a"],
        reference_texts=["x", "x"], target_texts=[record["transcript"]] * 2, languages=["en", "en"],
        codes=[np.zeros(0, np.int64)] * 2, truncated=[False, False],
    )
    rates = wer.measure(batch)
    assert wer.last_transcripts[1] == ""  # pocketsphinx hears nothing in a faint hiss
    assert rates[1] == MAX_ERROR_RATE and rates[0] < 0.5
    assert wer.reward(rates)[1] == pytest.approx(math.exp(-2.5 * MAX_ERROR_RATE))


def test_reference_embeddings_are_computed_once_per_key(short_flite):
    class Counting:
        def __init__(self, encoder):
            self.encoder, self.clips = encoder, 0

        def embed(self, waves, sample_rate):
            self.clips += len(waves)
            return self.encoder.embed(waves, sample_rate)

    encoder = Counting(load_speaker_encoder("resemblyzer"))
    cache = EmbeddingCache(encoder, size=2)
    waves = [_wave(r) for r in short_flite[:3]]
    first = cache.embed(["a", "b", "a"], [waves[0], waves[1], waves[0]], 16000)
    assert encoder.clips == 2 and np.allclose(first[0], first[2])
    again = cache.embed(["b", "a"], [waves[1], waves[0]], 16000)
    assert encoder.clips == 2 and np.allclose(again, first[[1, 0]])
    cache.embed(["c"], [waves[2]], 16000)  # over size 2: "b", used least recently, is dropped
    cache.embed(["b"], [waves[1]], 16000)
    assert encoder.clips == 4


def test_rule_rewards():
    # 10 chars of reference in 1 s -> 10 chars/s; 20-char target -> expects 2 s.
    assert duration_reward(2.0, "abcdefghij klmnopqrst", "abcdefghij", 1.0, "en") == pytest.approx(1.0)
    assert duration_reward(4.0, "abcdefghij klmnopqrst", "abcdefghij", 1.0, "en") == pytest.approx(0.5)
    assert duration_reward(0.0, "abc", "abc", 1.0, "en") == 0.0
    loop = np.tile(np.arange(10), 20)
    varied = np.random.default_rng(0).integers(0, 65536, 200)
    assert repetition_reward(loop) < 0.1 < 0.99 < repetition_reward(varied)
    assert repetition_reward(np.zeros(3, dtype=np.int64)) == 1.0


def test_unknown_or_duplicate_reward_is_config_error():
    with pytest.raises(ConfigError, match="known"):
        build_reward_funcs(["NoSuchReward"], ScorerModels())
    with pytest.raises(ConfigError, match="twice"):
        build_reward_funcs(["TruncationRewardFunc", "TruncationRewardFunc"], ScorerModels())
    with pytest.raises(ConfigError, match="whisper"):
        build_reward_funcs(["WERRewardFunc"], ScorerModels(asr_backend="whisper"))


class CountingCodec:
    """Wraps a codec and counts decode calls (the scorer must decode each completion once)."""

    def __init__(self, codec: Codec, fail_on: int | None = None):
        self.codec = codec
        self.output_sample_rate = codec.output_sample_rate
        self.calls: list[int] = []
        self.fail_on = fail_on

    def decode(self, codes, prompt_codes=None):
        self.calls.append(len(codes))
        if self.fail_on is not None and any(len(c) == self.fail_on for c in codes):
            raise RuntimeError("decoder blew up")
        return self.codec.decode(codes, prompt_codes=prompt_codes)


def test_scorer_decodes_once_and_gives_failed_audio_the_lowest_reward():
    codec = CountingCodec(Codec.from_config(tiny_codec_config(24000)), fail_on=13)
    funcs = build_reward_funcs(
        ["WERRewardFunc", "SimilarityRewardFunc", "DNSMOSRewardFunc", "DurationRewardFunc", "TruncationRewardFunc",
         "RepetitionRewardFunc"],
        ScorerModels(),
    )
    scorer = RewardScorer(codec, funcs, weights=[1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, 40)
    codes = [rng.integers(0, 256, 30), np.zeros(0, np.int64), rng.integers(0, 256, 13), np.tile([1, 2], 20)]
    result = scorer.score(
        codes, [prompt] * 4, ["hello there"] * 4, ["a reference text"] * 4, ["en"] * 4,
        reference_keys=["p0"] * 4, truncated=[False, False, False, True],
    )
    # One batched decode of the completions (it fails on item 2, so one retry per item), one of the prompt.
    assert codec.calls[0] == 4 - 1
    assert sorted(codec.calls[1:]) == [1, 1, 1, 1]
    assert set(result.rewards) == {f.name for f in funcs}
    for name, values in result.rewards.items():
        assert values.shape == (4,) and np.isfinite(values).all() and (values >= 0).all(), name
        assert values[1] == 0.0 and values[2] == 0.0, name  # empty and failed decodes: lowest reward
    assert result.batch.waves[0].size == 30 * 16000 // 50  # resampled to 16 kHz, prompt trimmed
    assert result.rewards["TruncationRewardFunc"][3] == 0.0 and result.rewards["TruncationRewardFunc"][0] == 1.0
    assert result.rewards["RepetitionRewardFunc"][3] < result.rewards["RepetitionRewardFunc"][0]
    expected = sum(w * result.rewards[f.name] for w, f in zip(scorer.weights, funcs, strict=True))
    np.testing.assert_allclose(result.total, expected)
    # The reference is decoded once and its embedding cached across calls.
    before = len(codec.calls)
    scorer.score([codes[0]], [prompt], ["hello"], ["a reference text"], ["en"], reference_keys=["p0"])
    assert len(codec.calls) == before + 1
