"""A decoder trained by the Inworld reference trainer loads strictly and decodes.

The codec directory is synthetic but written as the reference writes it (tts/training/codec/
train_codec.py + tts/training/checkpointing.py): its `model_config.json` keys, and a Fabric
checkpoint whose "model" is the TrainableDecoder state dict, with the key names and shapes of the
reference's modules (decoder_modules.Generator / upsampler.UpSamplerBlock / the discriminators),
spelled out here from that source rather than from our module names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.codec import Codec, tiny_codec_config
from trainer.codec.inworld import codec_config
from trainer.config import CodecModelConfig
from trainer.errors import ConfigError

DIM, VQ_DIM, DEPTH = 1024, 2048, 12  # the reference's Generator / Decoder hard-code these


def _resnet_keys(prefix: str, channels: int, temb: bool) -> dict[str, tuple[int, ...]]:
    keys = {
        f"{prefix}norm1.weight": (channels,), f"{prefix}norm1.bias": (channels,),
        f"{prefix}conv1.weight": (channels, channels, 3), f"{prefix}conv1.bias": (channels,),
        f"{prefix}norm2.weight": (channels,), f"{prefix}norm2.bias": (channels,),
        f"{prefix}conv2.weight": (channels, channels, 3), f"{prefix}conv2.bias": (channels,),
    }
    if temb:  # decoder_modules.ResnetBlock's default temb_channels=512 (the upsampler keeps it)
        keys |= {f"{prefix}temb_proj.weight": (channels, 512), f"{prefix}temb_proj.bias": (channels,)}
    return keys


def reference_decoder_keys(hop: int, factors: list[int], kernels: list[int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference TrainableDecoder's generator (decoder.Decoder)."""
    keys: dict[str, tuple[int, ...]] = {
        "generator.decoder.quantizer.project_in.weight": (8, VQ_DIM),
        "generator.decoder.quantizer.project_in.bias": (8,),
        "generator.decoder.quantizer.project_out.weight": (VQ_DIM, 8),
        "generator.decoder.quantizer.project_out.bias": (VQ_DIM,),
        "generator.decoder.backbone.embed.weight": (DIM, DIM, 7),
        "generator.decoder.backbone.embed.bias": (DIM,),
        "generator.decoder.backbone.final_layer_norm.weight": (DIM,),
        "generator.decoder.backbone.final_layer_norm.bias": (DIM,),
        "generator.decoder.head.out.weight": (4 * hop + 2, DIM),
        "generator.decoder.head.out.bias": (4 * hop + 2,),
        "generator.decoder.head.istft.window": (4 * hop,),
        "generator.fc_post_a.weight": (DIM, VQ_DIM),
        "generator.fc_post_a.bias": (DIM,),
    }
    for net in ("prior_net", "post_net"):
        for i in range(2):
            keys |= _resnet_keys(f"generator.decoder.backbone.{net}.{i}.", DIM, temb=False)
    for i in range(DEPTH):
        p = f"generator.decoder.backbone.transformers.{i}."
        keys |= {
            f"{p}att_norm.weight": (DIM,), f"{p}ffn_norm.weight": (DIM,),
            f"{p}att.c_attn.weight": (3 * DIM, DIM), f"{p}att.c_proj.weight": (DIM, DIM),
            f"{p}mlp.fc1.weight": (4 * DIM, DIM), f"{p}mlp.fc2.weight": (DIM, 4 * DIM),
        }
    for i, k in enumerate(kernels):
        c_in, c_out = DIM // 2**i, DIM // 2 ** (i + 1)
        p = f"generator.upsampler.upsample_layers.{i}."
        keys |= {f"{p}weight_g": (c_in, 1, 1), f"{p}weight_v": (c_in, c_out, k), f"{p}bias": (c_out,)}
        keys |= _resnet_keys(f"generator.upsampler.resnet_blocks.{i}.", c_out, temb=True)
    if factors:
        keys |= {
            "generator.upsampler.out_proj.weight": (DIM, DIM // 2 ** len(factors)),
            "generator.upsampler.out_proj.bias": (DIM,),
        }
    return keys


def _random_state(keys: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("istft.window"):
            state[key] = torch.hann_window(shape[0])
        elif len(shape) == 1 or key.endswith("weight_g"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def write_reference_codec(directory: Path, sample_rate: int, hop: int, factors, kernels, name: str) -> dict:
    """A reference checkpoint directory: model_config.json + config.json + the Fabric checkpoint."""
    directory.mkdir(parents=True)
    state = _random_state(reference_decoder_keys(hop, factors or [], kernels or []), seed=7)
    discriminators = {"mpd.discriminators.0.layers.0.0.weight": torch.zeros(16, 1, 5, 1),
                      "msd.discriminators.0.layers.0.weight_v": torch.zeros(32, 1, 5, 3)}
    torch.save(
        {"model": {**state, **discriminators}, "loss_statistics": {"step": 1000},
         "optimizer": {"gen_optimizer": {"state": {}, "param_groups": []}}, "config": {"seed": 777}},
        directory / name,
    )
    total_ups = math.prod(factors) if factors else 1
    model_config = {
        "model_type": "decoder_48k_run", "sample_rate": sample_rate,
        "token_rate": sample_rate // (hop * total_ups), "hop_length": hop,
        "upsample_factors": factors, "kernel_sizes": kernels,
    }
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=4))
    (directory / "config.json").write_text("ExperimentConfig(...)")  # the reference's str(config)
    return state


def reference_upsampler(state: dict[str, torch.Tensor], x: torch.Tensor, factors, kernels) -> torch.Tensor:
    """UpSamplerBlock.forward, written out functionally from the reference-named weights.
    x (B, DIM, T) -> (B, T', DIM)."""

    def resnet(h: torch.Tensor, p: str) -> torch.Tensor:
        out = F.group_norm(h, 32, state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        out = F.conv1d(F.silu(out), state[p + "conv1.weight"], state[p + "conv1.bias"], padding=1)
        out = F.group_norm(out, 32, state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        return h + F.conv1d(F.silu(out), state[p + "conv2.weight"], state[p + "conv2.bias"], padding=1)

    for i, (u, k) in enumerate(zip(factors, kernels, strict=True)):
        p = f"generator.upsampler.upsample_layers.{i}."
        weight = torch._weight_norm(state[p + "weight_v"], state[p + "weight_g"], 0)
        x = F.conv_transpose1d(x, weight, state[p + "bias"], stride=u, padding=(k - u) // 2)
        x = resnet(x, f"generator.upsampler.resnet_blocks.{i}.")
    proj = "generator.upsampler.out_proj."
    return F.silu(F.linear(x.transpose(1, 2), state[proj + "weight"], state[proj + "bias"]))


def test_reference_48k_decoder_directory_loads_strictly_and_decodes(tmp_path) -> None:
    factors, kernels = [3, 2], [6, 4]  # k - u: 3 (odd, one surplus frame) and 2
    directory = tmp_path / "decoder_48k"
    state = write_reference_codec(directory, 48000, 160, factors, kernels, "final_model.pt")

    codec = Codec.load(str(directory), components=("decoder",))
    assert codec.output_sample_rate == 48000 and codec.config.upsampler == "inworld"
    assert codec.config.upsample_kernel_sizes == kernels
    torch.testing.assert_close(codec.upsampler.out_proj.weight, state["generator.upsampler.out_proj.weight"])

    # The upsampler computes what the reference's does (k - u odd: one more frame per stage, cut at the end).
    hidden = torch.randn(1, 9, DIM)
    with torch.no_grad():
        ours, _ = codec.upsampler(hidden)
        theirs = reference_upsampler(state, hidden.transpose(1, 2), factors, kernels)
    assert theirs.shape[1] >= ours.shape[1] == 9 * 6
    torch.testing.assert_close(ours, theirs[:, : ours.shape[1]], atol=1e-4, rtol=1e-4)

    codes = np.random.default_rng(0).integers(0, 65536, 20)
    audio = codec.decode([codes, codes[:7]])
    assert [len(a) for a in audio] == [20 * 960, 7 * 960] and all(np.isfinite(a).all() for a in audio)
    np.testing.assert_allclose(audio[1], codec.decode([codes[:7]])[0], atol=1e-4)

    with pytest.raises(ConfigError, match="holds only the codec"):
        Codec.load(str(directory))  # the reference trains no encoder


def test_reference_checkpoint_names_and_config_errors(tmp_path) -> None:
    # 16 kHz without upsampler (null factors / kernels): the newest checkpoint_<step>.pt is the codec.
    directory = tmp_path / "decoder_16k"
    write_reference_codec(directory, 16000, 320, None, None, "checkpoint_2000.pt")
    (directory / "checkpoint_500.pt").write_bytes(b"older and broken")
    codec = Codec.load(str(directory), components=("decoder",))
    assert codec.upsampler is None and codec.output_sample_rate == 16000
    assert len(codec.decode([np.arange(5)])[0]) == 5 * 320

    assert codec_config({"model_type": "x", "sample_rate": 24000, "token_rate": 50, "hop_length": 480,
                         "upsample_factors": None, "kernel_sizes": None}, "m").upsample_factors == []
    bad = json.loads((directory / "model_config.json").read_text()) | {"kernel_size": [4]}
    (directory / "model_config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"model_config\.json \(Inworld reference codec config\): kernel_size"):
        Codec.load(str(directory), components=("decoder",))


def test_inworld_upsampler_batched_decode_matches_each_item_alone() -> None:
    config = tiny_codec_config(48000).model_copy(
        update={"decoder_dim": 128, "upsampler": "inworld", "upsample_kernel_sizes": [6, 4]}
    )
    torch.manual_seed(2)
    codec = Codec.from_config(config, components=("decoder",))
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, 256, n) for n in (11, 4, 8)]
    for c, audio in zip(codes, codec.decode(codes), strict=True):
        assert len(audio) == len(c) * 960
        np.testing.assert_allclose(audio, codec.decode([c])[0], atol=1e-4)
    with pytest.raises(ValueError, match="whole multiple of 32"):
        CodecModelConfig.model_validate(config.model_dump() | {"decoder_dim": 64})
