"""Named codec shapes: the full-size X-codec2 codec, the `small` one shipped in example/models, and a
tiny one for tests."""

from __future__ import annotations

from trainer.config import CodecModelConfig


def full_codec_config(sample_rate: int = 16000) -> CodecModelConfig:
    """X-codec2's shape; 24 and 48 kHz select the Inworld reference's decoder layouts (48 kHz: its
    super-resolution upsampler; kernels with an even k - factor, so no stage emits a surplus frame)."""
    decoders = {16000: (320, [], []), 24000: (480, [], []), 48000: (160, [3, 2], [7, 4])}
    hop, factors, kernels = decoders[sample_rate]
    return CodecModelConfig(
        sample_rate=sample_rate, hop_length=hop, upsample_factors=factors, upsample_kernel_sizes=kernels,
        upsampler="inworld",
    )


def tiny_codec_config(sample_rate: int = 16000) -> CodecModelConfig:
    """256 codes, ~0.5M parameters: encodes ~30 min of audio per CPU-minute and trains on CPU."""
    decoders = {16000: (320, []), 24000: (240, [2]), 48000: (160, [3, 2])}
    hop, factors = decoders[sample_rate]
    return CodecModelConfig(
        sample_rate=sample_rate,
        hop_length=hop,
        upsample_factors=factors,
        fsq_levels=[4, 4, 4, 4],
        encoder_channels=4,
        encoder_dim=64,
        encoder_antialias=False,
        quantizer_dim=64,
        decoder_dim=64,
        decoder_layers=2,
        decoder_heads=4,
    )


def small_codec_config() -> CodecModelConfig:
    """4,096 codes, ~17M parameters (15M of them the 50 Hz decoder): the example codec trained on 2 CPU
    cores (example/configs/models/codec-small.yaml). The encoder's convolutions run at the sample rate
    and dominate the step on CPU, so it is kept narrow (8 channels: 1.5x the speed of 16 at equal
    decoder); the decoder runs at 50 frames/s and is cheap to widen."""
    return CodecModelConfig(
        fsq_levels=[8, 8, 8, 8],
        encoder_channels=8,
        encoder_dim=256,
        encoder_antialias=False,
        quantizer_dim=256,
        decoder_dim=384,
        decoder_layers=6,
        decoder_heads=6,
    )


PRESETS = {"tiny": tiny_codec_config, "small": small_codec_config, "full": full_codec_config}
