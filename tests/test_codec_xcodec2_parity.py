"""With the same weights our encoder gives X-codec2's codes, checked against X-codec2's own code.

The other side (tests/xcodec2_reference.py) runs in its own interpreter on the xcodec2 0.1.5 package
and vector-quantize-pytorch 1.17.8 (installed by `make install` into .tools/xcodec2-ref, apart from
the venv), so its quirks are the real ones: the in-place ReLU of the semantic adapter's residual and
ResidualFSQ's double bound. Weights go both ways: ours are written in the released checkpoint's key
layout and loaded strictly by X-codec2's modules, which write their state back in that layout for
our loader. Audio: the example speech.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_codec_xcodec2 import as_xcodec2_name

from trainer.audio import read_audio
from trainer.codec import Codec, full_codec_config, tiny_codec_config, xcodec2
from trainer.codec.checkpoint import load_strict

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / ".tools" / "xcodec2-ref"
WAVS = sorted((REPO / "example" / "wavs").glob("*.flac"))


def _reference_dir() -> Path:
    if (REFERENCE_DIR / "xcodec2").is_dir() and (REFERENCE_DIR / "vector_quantize_pytorch").is_dir():
        return REFERENCE_DIR
    message = f"X-codec2 reference packages not found in {REFERENCE_DIR}: run `make install`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _tiny_w2v(directory: Path, hidden: int, layers: int) -> Path:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(11)
    config = Wav2Vec2BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        output_hidden_size=hidden, conv_depthwise_kernel_size=3,
    )
    Wav2Vec2BertModel(config).save_pretrained(directory)
    SeamlessM4TFeatureExtractor().save_pretrained(directory)
    return directory


def _run_reference(tmp_path: Path, codec: Codec, wavs: list[Path]) -> tuple[list[np.ndarray], np.ndarray, Path]:
    """Our weights -> released layout -> X-codec2's encoder: (codes per wav, decoded code book,
    the checkpoint X-codec2's modules wrote back)."""
    ckpt = tmp_path / "ours_as_xcodec2.ckpt"
    encoder_keys = ("CodecEnc.", "SemanticEncoder_module.", "fc_prior.", "generator.quantizer.")
    state = {as_xcodec2_name(k): v for k, v in codec.codec_state_dict().items()}
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith(encoder_keys)}}, ckpt)
    cfg = codec.config
    spec = {
        "checkpoint": str(ckpt), "w2v": cfg.semantic, "layer": cfg.semantic_layer,
        "shape": {
            "semantic_dim": cfg.semantic_dim, "encoder_channels": cfg.encoder_channels,
            "encoder_strides": cfg.encoder_strides, "encoder_dim": cfg.encoder_dim,
            "quantizer_dim": cfg.quantizer_dim, "fsq_levels": cfg.fsq_levels,
        },
        "wavs": [str(w) for w in wavs], "out": str(tmp_path / "reference.npz"),
        "resave": str(tmp_path / "xcodec2_resaved.ckpt"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(_reference_dir())}
    script = Path(__file__).with_name("xcodec2_reference.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "spec.json")], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = np.load(spec["out"])
    return [out[f"codes_{i}"] for i in range(len(wavs))], out["decoded_probe"], Path(spec["resave"])


def _compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[int, int, list[tuple[int, int]]]:
    assert [len(c) for c in ours] == [len(c) for c in theirs]
    differing = [(i, int(t)) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for t in np.flatnonzero(a != b)]
    return sum(len(c) for c in theirs) - len(differing), sum(len(c) for c in theirs), differing


def _parity(tmp_path: Path, config, wavs: list[Path], batch_size: int) -> None:
    torch.manual_seed(3)
    source = Codec.from_config(config, components=("encoder",))
    theirs, decoded_probe, resaved = _run_reference(tmp_path, source, wavs)
    waves = [read_audio(str(w)).samples for w in wavs]
    joined = np.concatenate(theirs)
    assert len(np.unique(joined)) > 0.05 * len(joined), "degenerate weights: too few distinct codes to compare"

    # Theirs -> ours: what X-codec2's modules saved, through our X-codec2 key mapping, loaded strictly
    # (Codec.load itself assumes the released full-size shape).
    loaded = Codec.from_config(config, components=("encoder",))
    released = torch.load(resaved, weights_only=True)["state_dict"]
    load_strict(loaded, xcodec2.to_codec_state_dict(released), str(resaved))
    same, total, differing = _compare(loaded.encode(waves, 16000, batch_size=batch_size), theirs)
    assert same >= 0.999 * total, f"{total - same} of {total} frames differ: {differing[:20]}"
    # Ours, as built: the same codes.
    np.testing.assert_array_equal(
        np.concatenate(source.encode(waves, 16000, batch_size=batch_size)),
        np.concatenate(loaded.encode(waves, 16000, batch_size=batch_size)),
    )
    # The library's decode of the whole code book is our quantiser's decode.
    probe = torch.arange(source.codebook_size)[None, :]
    with torch.no_grad():
        np.testing.assert_allclose(source.quantizer.decode(probe)[0].numpy(), decoded_probe, atol=1e-6)


def test_tiny_encoder_gives_xcodec2_codes_on_the_example_speech(tmp_path) -> None:
    w2v = _tiny_w2v(tmp_path / "w2v", hidden=32, layers=2)
    config = tiny_codec_config().model_copy(update={
        "encoder_antialias": True,  # X-codec2's blocks are always anti-aliased
        "fsq_levels": [4] * 8,  # X-codec2's 65,536 codes
        "semantic": str(w2v), "semantic_dim": 32, "semantic_layer": 2,
    })
    # An exact multiple of the hop, where X-codec2 pads a whole extra hop (and so adds a frame).
    exact = tmp_path / "exact_hops.wav"
    sf.write(exact, read_audio(str(WAVS[0])).samples[: 320 * 60], 16000, subtype="PCM_16")
    _parity(tmp_path, config, [*WAVS[::8], exact], batch_size=16)  # 17 clips, ~4,000 frames


@pytest.mark.slow
def test_full_size_encoder_gives_xcodec2_codes(tmp_path) -> None:
    """Full-size acoustic encoder, adapter, fc_prior and quantiser (a 1-layer Wav2Vec2-BERT of width
    1024 stands in for w2v-bert-2.0); ~2 CPU-minutes for 12 clips."""
    w2v = _tiny_w2v(tmp_path / "w2v", hidden=1024, layers=1)
    config = full_codec_config().model_copy(update={"semantic": str(w2v), "semantic_layer": 1})
    _parity(tmp_path, config, WAVS[:12], batch_size=4)
