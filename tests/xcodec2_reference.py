"""X-codec2's encoder, run from X-codec2's own code: the independent side of the parity tests.

Runs in a separate interpreter whose path holds only `.tools/xcodec2-ref` (the PyPI packages
`xcodec2==0.1.5` and `vector-quantize-pytorch==1.17.8`, the release xcodec2 pins, installed by
`make install`) in front of the venv; it never imports `trainer`. It builds X-codec2's encoder from
the xcodec2 package's modules (SemanticEncoder with its in-place ReLU, the alias-free SnakeBeta
blocks) and the library's real `ResidualFSQ`, loads a Lightning-layout checkpoint strictly, encodes
each wav exactly as `XCodec2Model.encode_code` does, and writes the codes. It also re-saves its own
state dict in the Lightning layout, so the other side can load what X-codec2's modules produce.

    python xcodec2_reference.py SPEC.json     (keys: see `main`)
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoFeatureExtractor, Wav2Vec2BertModel
from vector_quantize_pytorch import ResidualFSQ
from xcodec2.vq.activations import SnakeBeta
from xcodec2.vq.alias_free_torch import Activation1d
from xcodec2.vq.module import EncoderBlock, SemanticEncoder, WNConv1d

# The released Lightning checkpoint was written with torch.nn.utils.weight_norm (weight_g/weight_v)
# and a SnakeBeta whose magnitude is `beta`; xcodec2 0.1.5's modules use parametrized weight norm and
# call it `bias` (transformers' from_pretrained renames `beta` keys to `bias`).
RELEASED_TO_PACKAGE = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
    ".act.beta": ".act.bias",
}
PREFIXES = ("CodecEnc.", "SemanticEncoder_module.", "fc_prior.", "generator.quantizer.")


class CodecEnc(nn.Module):
    """xcodec2.vq.codec_encoder.CodecEncoder_Transformer, built from the same xcodec2 blocks (that
    module itself imports torchtune and torchaudio at import time, which cannot load here)."""

    def __init__(self, ngf: int, up_ratios: list[int], hidden_dim: int, dilations=(1, 3, 9)):
        super().__init__()
        d_model = ngf
        blocks: list[nn.Module] = [WNConv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in up_ratios:
            d_model *= 2
            blocks.append(EncoderBlock(d_model, stride=stride, dilations=dilations))
        self.conv_blocks = nn.Sequential(*blocks)
        self.conv_final_block = nn.Sequential(
            Activation1d(activation=SnakeBeta(d_model, alpha_logscale=True)),
            WNConv1d(d_model, hidden_dim, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_final_block(self.conv_blocks(x)).permute(0, 2, 1)


class XCodec2Encoder(nn.Module):
    def __init__(self, shape: dict):
        super().__init__()
        sem = shape["semantic_dim"]
        self.SemanticEncoder_module = SemanticEncoder(sem, sem, sem)
        self.CodecEnc = CodecEnc(shape["encoder_channels"], shape["encoder_strides"], shape["encoder_dim"])
        self.fc_prior = nn.Linear(sem + shape["encoder_dim"], shape["quantizer_dim"])
        self.generator = nn.Module()
        self.generator.quantizer = ResidualFSQ(
            dim=shape["quantizer_dim"], levels=shape["fsq_levels"], num_quantizers=1
        )


def to_package_names(key: str) -> str:
    for old, new in RELEASED_TO_PACKAGE.items():
        key = key.replace(old, new)
    return key


def to_released_names(key: str) -> str:
    for old, new in RELEASED_TO_PACKAGE.items():
        key = key.replace(new, old)
    return key


@torch.no_grad()
def encode_code(model: XCodec2Encoder, extractor, w2v, layer: int, wav: torch.Tensor) -> torch.Tensor:
    """XCodec2Model.encode_code for one [1, n] waveform -> codes [frames]."""
    wav = F.pad(wav, (0, 320 - wav.shape[1] % 320))
    feats = extractor(F.pad(wav[0, :], (160, 160)), sampling_rate=16000, return_tensors="pt").input_features
    semantic = w2v(feats).hidden_states[layer].transpose(1, 2)
    semantic = model.SemanticEncoder_module(semantic)
    acoustic = model.CodecEnc(wav.unsqueeze(1)).transpose(1, 2)
    concat = torch.cat([semantic, acoustic], dim=1)
    concat = model.fc_prior(concat.transpose(1, 2)).transpose(1, 2)
    _, codes = model.generator.quantizer(concat.permute(0, 2, 1))  # CodecDecoderVocos(vq=True)
    return codes[0, :, 0]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    assert version("vector-quantize-pytorch") == "1.17.8", version("vector-quantize-pytorch")
    model = XCodec2Encoder(spec["shape"]).eval()
    ckpt = torch.load(spec["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    state = {to_package_names(k): v for k, v in ckpt.items() if k.startswith(PREFIXES)}
    model.load_state_dict(state, strict=True)
    extractor = AutoFeatureExtractor.from_pretrained(spec["w2v"])
    w2v = Wav2Vec2BertModel.from_pretrained(spec["w2v"], output_hidden_states=True).eval()

    out = {}
    for i, path in enumerate(spec["wavs"]):
        samples, rate = sf.read(path, dtype="float32")
        assert rate == 16000, (path, rate)
        codes = encode_code(model, extractor, w2v, spec["layer"], torch.from_numpy(samples).unsqueeze(0))
        out[f"codes_{i}"] = codes.numpy().astype(np.int64)
    # The library's own decode of every code: vectors project_out would see.
    probe = torch.arange(model.generator.quantizer.codebook_size)[None, :, None]
    out["decoded_probe"] = model.generator.quantizer.get_output_from_indices(probe)[0].detach().numpy()
    np.savez(spec["out"], **out)

    released = {to_released_names(k): v for k, v in model.state_dict().items()}
    torch.save({"epoch": 0, "global_step": 0, "state_dict": released}, spec["resave"])


if __name__ == "__main__":
    main()
