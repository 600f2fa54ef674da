"""The semantic branch: Wav2Vec2-BERT hidden states (one layer) and X-codec2's conv adapter on top.

The Wav2Vec2-BERT model (w2v-bert-2.0 for the full-size codec) is loaded with transformers from a
LOCAL directory, never from a hub, and is not part of the codec's state dict (X-codec2 checkpoints do
not contain it either); `model_config.json` records its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.codec.acoustic_encoder import zero_beyond
from trainer.errors import ConfigError


class SemanticAdapter(nn.Module):
    """X-codec2's `SemanticEncoder`: conv, residual (ReLU, conv, ReLU, conv), conv; kernel 3.

    X-codec2 writes the residual as `residual_blocks(x) + x` with a first `ReLU(inplace=True)`: the
    in-place ReLU overwrites x before the addition reads it, so its skip path carries relu(x), not
    x. Pretrained weights (and their codes) depend on that, so the skip here is relu(x) too.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.initial_conv = nn.Conv1d(dim, dim, kernel_size, padding=pad, bias=False)
        self.residual_blocks = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(dim, dim, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv1d(dim, dim, kernel_size, padding=pad),
        )
        self.final_conv = nn.Conv1d(dim, dim, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, dim, T) -> (B, dim, T); `lengths` keeps padded frames at zero between convs."""
        x = self.initial_conv(zero_beyond(x, lengths))
        skip = self.residual_blocks[0](x)  # relu(x): see the class docstring
        h = zero_beyond(skip, lengths)
        for layer in self.residual_blocks[1:]:
            h = zero_beyond(layer(h), lengths)
        return self.final_conv(zero_beyond(h + skip, lengths))


class SemanticFeatures(nn.Module):
    """Frozen Wav2Vec2-BERT: 16 kHz waveforms -> hidden state of `layer` at 50 frames/s."""

    def __init__(self, model_dir: str, layer: int, expected_dim: int):
        super().__init__()
        # lazy: transformers takes seconds to import; only codecs with the semantic branch need it
        from transformers import AutoFeatureExtractor, Wav2Vec2BertModel

        if not Path(model_dir).is_dir():
            raise ConfigError(
                f"codec.model.semantic: {model_dir!r} is not a local directory holding a Wav2Vec2-BERT "
                "model (use 'none' to disable the semantic branch)"
            )
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
        self.model = Wav2Vec2BertModel.from_pretrained(model_dir).eval().requires_grad_(False)
        if self.model.config.hidden_size != expected_dim:
            raise ConfigError(
                f"codec.model.semantic_dim is {expected_dim} but the model in {model_dir} has hidden_size "
                f"{self.model.config.hidden_size}"
            )
        if layer > self.model.config.num_hidden_layers:
            raise ConfigError(
                f"codec.model.semantic_layer {layer} exceeds the {self.model.config.num_hidden_layers} "
                f"layers of {model_dir}"
            )
        self.layer = layer

    @torch.no_grad()
    def forward(self, waves: list[np.ndarray], frames: list[int]) -> torch.Tensor:
        """Hop-aligned 16 kHz waveforms -> (B, hidden, max(frames)), item i valid for frames[i]."""
        device = next(self.model.parameters()).device
        # Per-item features (the extractor normalises each utterance), padded by half a hop each side
        # as X-codec2 does so the 100 Hz filterbank stacked by 2 lines up with the 50 Hz acoustic frames.
        feats = [
            self.feature_extractor(
                np.pad(w, (160, 160)), sampling_rate=16000, return_tensors="pt"
            )["input_features"][0]
            for w in waves
        ]
        longest = max(frames)
        batch = torch.zeros(len(waves), longest, feats[0].shape[-1])
        mask = torch.zeros(len(waves), longest, dtype=torch.long)
        for i, (feat, n) in enumerate(zip(feats, frames, strict=False)):
            n_used = min(n, feat.shape[0])
            batch[i, :n_used] = feat[:n_used]
            mask[i, :n_used] = 1
        out = self.model(
            input_features=batch.to(device), attention_mask=mask.to(device), output_hidden_states=True
        )
        return out.hidden_states[self.layer].transpose(1, 2)
