"""Importing an original X-codec2 Lightning checkpoint (full-size config, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.codec import Codec, full_codec_config
from trainer.errors import ConfigError

# The documented mapping (trainer/codec/xcodec2.py), written out independently of the loader.
OURS_TO_XCODEC2 = {
    "acoustic_encoder.": "CodecEnc.",
    "semantic_adapter.": "SemanticEncoder_module.",
    "fc_prior.": "fc_prior.",
    "quantizer.": "generator.quantizer.",
    "fc_post_a.": "fc_post_a.",
    "backbone.": "generator.backbone.",
    "head.": "generator.head.",
}
# Keys and shapes of the released checkpoint that the layout must reproduce.
KNOWN_XCODEC2_KEYS = {
    "CodecEnc.conv_blocks.0.weight_g": (48, 1, 1),
    "CodecEnc.conv_blocks.0.weight_v": (48, 1, 7),
    "CodecEnc.conv_blocks.1.block.0.block.0.act.alpha": (48,),
    "CodecEnc.conv_blocks.1.block.0.block.0.upsample.filter": (1, 1, 12),
    "CodecEnc.conv_blocks.1.block.0.block.0.downsample.lowpass.filter": (1, 1, 12),
    "CodecEnc.conv_blocks.5.block.4.weight_v": (1536, 768, 10),
    "CodecEnc.conv_final_block.1.weight_v": (1024, 1536, 3),
    "SemanticEncoder_module.initial_conv.weight": (1024, 1024, 3),
    "SemanticEncoder_module.residual_blocks.1.bias": (1024,),
    "fc_prior.weight": (2048, 2048),
    "generator.quantizer.project_in.weight": (8, 2048),
    "generator.quantizer.project_out.weight": (2048, 8),
    "fc_post_a.weight": (1024, 2048),
    "generator.backbone.embed.weight": (1024, 1024, 7),
    "generator.backbone.prior_net.0.norm1.weight": (1024,),
    "generator.backbone.transformers.11.att.c_attn.weight": (3072, 1024),
    "generator.backbone.transformers.0.mlp.fc1.weight": (4096, 1024),
    "generator.backbone.final_layer_norm.bias": (1024,),
    "generator.head.out.weight": (1282, 1024),
    "generator.head.istft.window": (1280,),
}


def as_xcodec2_name(name: str) -> str:
    for ours, theirs in OURS_TO_XCODEC2.items():
        if name.startswith(ours):
            name = theirs + name[len(ours) :]
            break
    return name.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v"
    )


def write_xcodec2_checkpoint(codec: Codec, path, drop: str | None = None, decoder_only: bool = False) -> None:
    """A Lightning-style checkpoint in X-codec2's key layout, with the extras such files carry."""
    state = {as_xcodec2_name(k): v for k, v in codec.codec_state_dict().items()}
    if decoder_only:  # smaller file for the failure case; a decoder load never reads encoder keys
        state = {k: v for k, v in state.items() if k.startswith(("generator.", "fc_post_a."))}
    state["generator.quantizer.layers.0._levels"] = torch.tensor([4] * 8)  # older library buffers
    state["generator.quantizer.scales"] = torch.ones(1, 8)
    state["discriminator.discriminators.0.convs.0.weight"] = torch.zeros(2, 1, 5, 1)
    state["fc_post_s.weight"] = torch.zeros(4, 4)
    if drop:
        del state[drop]
    torch.save({"epoch": 4, "global_step": 1400000, "state_dict": state}, path)


def test_xcodec2_checkpoint_loads_strictly_and_missing_keys_fail(tmp_path) -> None:
    torch.manual_seed(0)
    source = Codec(full_codec_config().model_copy(update={"semantic": "w2v-bert-2.0"}))
    ckpt = tmp_path / "epoch=4-step=1400000.ckpt"
    write_xcodec2_checkpoint(source, ckpt)
    written = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, shape in KNOWN_XCODEC2_KEYS.items():
        assert tuple(written[key].shape) == shape, key

    decoder = Codec.load(str(ckpt), components=("decoder",))
    codes = np.arange(0, 65536, 4099, dtype=np.int64)
    expected = source.eval().decode([codes])[0]
    np.testing.assert_allclose(decoder.decode([codes])[0], expected, atol=1e-5)
    assert decoder.codebook_size == 65536 and decoder.output_sample_rate == 16000

    full = Codec.load(str(ckpt))  # encoder (with the semantic adapter) + decoder, strictly
    assert torch.equal(full.acoustic_encoder.conv_blocks[0].parametrizations.weight.original1,
                       source.acoustic_encoder.conv_blocks[0].parametrizations.weight.original1)
    assert torch.equal(full.semantic_adapter.final_conv.weight, source.semantic_adapter.final_conv.weight)
    del full

    broken = tmp_path / "broken.ckpt"
    dropped = "generator.backbone.transformers.3.att.c_proj.weight"
    write_xcodec2_checkpoint(source, broken, drop=dropped, decoder_only=True)
    with pytest.raises(ConfigError, match=r"missing keys \(1\):\n\s+backbone\.transformers\.3\.att\.c_proj\.weight"):
        Codec.load(str(broken), components=("decoder",))
