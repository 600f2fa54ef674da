"""Importing original X-codec2 Lightning checkpoints (e.g. HKUST's `epoch=4-step=1400000.ckpt`).

The checkpoint's top-level `state_dict` holds the codec under five prefixes; our module names were
chosen so the mapping is a prefix swap plus the weight-norm rename:

    X-codec2 key prefix            our Codec attribute          part of
    -----------------------------  ---------------------------  --------------------
    CodecEnc.                      acoustic_encoder.            encoder
    SemanticEncoder_module.        semantic_adapter.            encoder (semantic on)
    fc_prior.                      fc_prior.                    encoder
    generator.quantizer.           quantizer.                   encoder and decoder
    fc_post_a.                     fc_post_a.                   decoder
    generator.backbone.            backbone.                    decoder
    generator.head.                head.                        decoder

    suffix  .weight_g  ->  .parametrizations.weight.original0   (torch.nn.utils.weight_norm, old API)
    suffix  .weight_v  ->  .parametrizations.weight.original1   (our parametrizations.weight_norm)

Inside the prefixes the names are identical, e.g. `CodecEnc.conv_blocks.1.block.0.block.1.weight_v`
-> `acoustic_encoder.conv_blocks.1.block.0.block.1.parametrizations.weight.original1`, and
`generator.backbone.transformers.11.att.c_attn.weight` -> `backbone.transformers.11.att.c_attn.weight`.
Quantiser buffers some vector-quantize-pytorch releases saved (`scales`, `layers.0._levels`,
`layers.0._basis`, `layers.0.implicit_codebook`, `soft_clamp_input_value`) are derived from the
levels and skipped. Keys under other prefixes (discriminators, `fc_post_s.`, `SemanticDecoder_module.`:
X-codec2's semantic-reconstruction training branch) are not part of the inference codec and are ignored.
The Wav2Vec2-BERT (w2v-bert-2.0) weights are not in the checkpoint: encode loads them from a local
directory (`semantic_model_path`). Every key under the five prefixes must map onto a parameter of the
same shape, and every parameter of the loaded components must be present, or loading fails listing
the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import re

import torch

from trainer.config import CodecModelConfig

PREFIXES: dict[str, str] = {
    "CodecEnc.": "acoustic_encoder.",
    "SemanticEncoder_module.": "semantic_adapter.",
    "fc_prior.": "fc_prior.",
    "generator.quantizer.": "quantizer.",
    "fc_post_a.": "fc_post_a.",
    "generator.backbone.": "backbone.",
    "generator.head.": "head.",
}
SUFFIXES: dict[str, str] = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}
_DERIVED_QUANTIZER_BUFFERS = re.compile(
    r"^quantizer\.(scales|soft_clamp_input_value|layers\.\d+\.(_levels|_basis|implicit_codebook))$"
)
# The default semantic model name, recorded in the config of an imported checkpoint; encoding needs
# a LOCAL directory (Codec.load(..., semantic_model_path=...)).
DEFAULT_SEMANTIC_MODEL = "w2v-bert-2.0"


def is_xcodec2_checkpoint(obj: object) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    return any(k.startswith(tuple(PREFIXES)) for k in obj["state_dict"])


def xcodec2_config(semantic_model_path: str | None) -> CodecModelConfig:
    """The full-size configuration every released X-codec2 checkpoint uses."""
    return CodecModelConfig(semantic=semantic_model_path or DEFAULT_SEMANTIC_MODEL)


def map_key(key: str) -> str | None:
    """Our parameter name for an X-codec2 key, or None when the key is not part of the codec."""
    for theirs, ours in PREFIXES.items():
        if key.startswith(theirs):
            mapped = ours + key[len(theirs) :]
            for old, new in SUFFIXES.items():
                if mapped.endswith(old):
                    mapped = mapped[: -len(old)] + new
            return None if _DERIVED_QUANTIZER_BUFFERS.match(mapped) else mapped
    return None


def to_codec_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped = {}
    for key, value in state_dict.items():
        ours = map_key(key)
        if ours is not None:
            mapped[ours] = value
    return mapped
