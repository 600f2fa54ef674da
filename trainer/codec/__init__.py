"""The X-codec2-compatible audio codec: model, checkpoints, X-codec2 import. Its GAN training (`codec-train`)
is `trainer.train.codec`."""

from trainer.codec.model import Codec
from trainer.codec.presets import full_codec_config, small_codec_config, tiny_codec_config

__all__ = ["Codec", "full_codec_config", "small_codec_config", "tiny_codec_config"]
