"""The X-codec2-compatible audio codec: model, X-codec2 import, GAN training (`codec-train`)."""

from trainer.codec.model import Codec
from trainer.codec.presets import full_codec_config, small_codec_config, tiny_codec_config

__all__ = ["Codec", "full_codec_config", "small_codec_config", "tiny_codec_config"]
