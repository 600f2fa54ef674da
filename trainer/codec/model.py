"""`Codec`: the X-codec2-compatible single-codebook speech codec (16 kHz in, 50 tokens/s).

    encoder: waveform -> acoustic CNN (+ Wav2Vec2-BERT layer -> conv adapter) -> concat -> fc_prior
             -> FSQ project_in -> codes
    decoder: codes -> FSQ project_out -> fc_post_a -> Vocos backbone -> [upsampler] -> iSTFT head

Public API (a shared contract, see the module docstrings of encode/decode): `from_config`, `load`,
`save`, `encode`, `decode`, and the attributes `config`, `codebook_size`, `token_rate`,
`input_sample_rate`, `output_sample_rate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from trainer import io
from trainer.audio import resample
from trainer.codec import checkpoint
from trainer.codec.acoustic_encoder import AcousticEncoder
from trainer.codec.checkpoint import CONFIG_FILE, MODEL_FILE
from trainer.codec.decoder import InworldUpsampler, ISTFTHead, Upsampler, VocosBackbone
from trainer.codec.quantizer import FSQ
from trainer.codec.semantic import SemanticAdapter, SemanticFeatures
from trainer.config import CodecModelConfig
from trainer.errors import ConfigError

COMPONENTS = ("encoder", "decoder")
# Parameters of the frozen Wav2Vec2-BERT live in its own directory, not in our checkpoints.
SEMANTIC_MODEL_PREFIX = "semantic_model."


# Padding a batch may add to its real samples: beyond this, split the bucket (padded frames are
# computed and masked, so on CPU they cost as much as real ones).
MAX_PADDING_FRACTION = 0.1


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length: sorted, at most `batch_size` per bucket, and a bucket is closed
    early when its padding would exceed MAX_PADDING_FRACTION of its real samples."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest of the bucket
        if current and (
            len(current) == batch_size
            or longest * (len(current) + 1) > (1 + MAX_PADDING_FRACTION) * (real + lengths[i])
        ):
            buckets.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        buckets.append(current)
    return buckets


class Codec(nn.Module):
    def __init__(self, config: CodecModelConfig, components: Sequence[str] = COMPONENTS):
        super().__init__()
        unknown = set(components) - set(COMPONENTS)
        if unknown or not components:
            raise ConfigError(f"codec components must be a non-empty subset of {COMPONENTS}, got {components}")
        self.config = config
        self.components = tuple(c for c in COMPONENTS if c in components)
        self.codebook_size = config.codebook_size
        self.token_rate = config.token_rate
        self.input_sample_rate = config.input_sample_rate
        self.output_sample_rate = config.sample_rate
        self.hop = math.prod(config.encoder_strides)
        self.uses_semantic = config.semantic != "none"
        # The quantiser is shared: project_in encodes, project_out decodes.
        self.quantizer = FSQ(config.quantizer_dim, config.fsq_levels)
        if "encoder" in self.components:
            self.acoustic_encoder = AcousticEncoder(
                config.encoder_channels, config.encoder_strides, config.encoder_dim, config.encoder_antialias
            )
            prior_in = config.encoder_dim
            if self.uses_semantic:
                # The Wav2Vec2-BERT itself is loaded on the first encode (see `semantic_features`), so
                # a codec loads, saves and trains its own weights without that directory at hand.
                self.semantic_model: SemanticFeatures | None = None
                self.semantic_adapter = SemanticAdapter(config.semantic_dim)
                prior_in += config.semantic_dim
            self.fc_prior = nn.Linear(prior_in, config.quantizer_dim)
            # Unit gain, so the encoder's O(1) features reach FSQ at O(1) (see quantizer.FSQ).
            nn.init.normal_(self.fc_prior.weight, std=prior_in**-0.5)
            nn.init.zeros_(self.fc_prior.bias)
        if "decoder" in self.components:
            self.fc_post_a = nn.Linear(config.quantizer_dim, config.decoder_dim)
            self.backbone = VocosBackbone(config.decoder_dim, config.decoder_layers, config.decoder_heads)
            upsampler = InworldUpsampler if config.upsampler == "inworld" else Upsampler
            self.upsampler = (
                upsampler(config.decoder_dim, config.upsample_factors, config.upsample_kernel_sizes)
                if config.upsample_factors
                else None
            )
            self.head = ISTFTHead(config.decoder_dim, config.hop_length)

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_config(cls, config: CodecModelConfig, components: Sequence[str] = COMPONENTS) -> Codec:
        """A randomly initialised codec (eval mode)."""
        return cls(config, components).eval()

    @classmethod
    def load(
        cls,
        path: str,
        device: str | torch.device = "cpu",
        components: Sequence[str] = COMPONENTS,
        semantic_model_path: str | None = None,
    ) -> Codec:
        """Load our codec directory (or its model.safetensors / model.pt) or an original X-codec2 `.ckpt`.

        `semantic_model_path` (a local Wav2Vec2-BERT directory) overrides the one recorded in the
        config; X-codec2 checkpoints record none, so encoding with one needs it.
        """
        return checkpoint.load_codec(cls, str(path), torch.device(device), components, semantic_model_path)

    def codec_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights, without the frozen Wav2Vec2-BERT (stored in its own directory)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(SEMANTIC_MODEL_PREFIX)}

    def save(self, dir_url: str) -> None:
        """Write `model.safetensors` (components in its metadata) and `model_config.json`, atomically.

        safetensors, not a pickle: a codec shipped in a repository or downloaded runs no code on load."""
        with io.staged_dir(dir_url) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.codec_state_dict().items()}
            save_file(state, str(Path(tmp) / MODEL_FILE), metadata={"components": json.dumps(list(self.components))})
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")

    @property
    def device(self) -> torch.device:
        return self.quantizer.project_in.weight.device

    # ----------------------------------------------------------------------------- tensor paths
    def encode_tensor(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None, semantic: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wav (B, S) at 16 kHz, S a multiple of the hop -> (quantised (B, T, q_dim), codes (B, T)).

        `lengths` (valid samples per item, hop multiples) keeps padding from reaching other frames;
        `semantic` is the Wav2Vec2-BERT hidden state (B, semantic_dim, T) when the branch is on.
        """
        latent, dtype = self.encode_latent(wav, lengths, semantic)
        return self.quantizer.quantize_latent(latent, dtype)

    def encode_latent(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None, semantic: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.dtype]:
        """The FSQ input z = project_in(fc_prior(features)) (B, T, len(fsq_levels)) and the features' dtype."""
        self._require("encoder")
        hidden = self.acoustic_encoder(wav.unsqueeze(1), lengths)
        if self.uses_semantic:
            if semantic is None:
                raise ValueError("this codec has a semantic branch: pass the Wav2Vec2-BERT features")
            frames = None if lengths is None else lengths // self.hop
            adapted = self.semantic_adapter(semantic[..., : hidden.shape[1]], frames).transpose(1, 2)
            hidden = torch.cat([adapted, hidden], dim=-1)
        prior = self.fc_prior(hidden)
        return self.quantizer.project_in(prior), prior.dtype

    def decode_tensor(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, T) -> audio (B, T * samples_per_token) at the output rate."""
        return self.decode_quantized(self.quantizer.decode(codes), lengths)

    def decode_quantized(self, quantized: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        self._require("decoder")
        hidden = self.backbone(self.fc_post_a(quantized), lengths)
        if self.upsampler is not None:
            hidden, lengths = self.upsampler(hidden, lengths)
        return self.head(hidden, lengths)

    def semantic_features(self, waves: list[np.ndarray]) -> torch.Tensor | None:
        """Wav2Vec2-BERT features for hop-aligned 16 kHz waveforms (None without the branch)."""
        if not self.uses_semantic:
            return None
        if self.semantic_model is None:
            self.semantic_model = SemanticFeatures(
                self.config.semantic, self.config.semantic_layer, self.config.semantic_dim
            ).to(self.device)
        return self.semantic_model(waves, [len(w) // self.hop for w in waves]).to(self.device)

    # ---------------------------------------------------------------------------------- public API
    @torch.inference_mode()
    def encode(
        self, waves: Sequence[np.ndarray], sample_rates: Sequence[int] | int, batch_size: int = 16
    ) -> list[np.ndarray]:
        """Waveforms (any rate, mono float) -> int64 codes, one per 20 ms: samples // 320 + 1 each.

        Items are resampled to 16 kHz and zero-padded by 1 to 320 samples to a whole number of hops
        (X-codec2 and the reference vectorizer pad by `320 - n % 320`, a full hop when n is already a
        multiple, and codes depend on it), sorted by length and encoded in batches of similar length;
        padding is masked so an item's codes do not depend on its batch.
        """
        self._require("encoder")
        rates = [sample_rates] * len(waves) if isinstance(sample_rates, int) else list(sample_rates)
        if len(rates) != len(waves):
            raise ValueError(f"{len(waves)} waveforms but {len(rates)} sample rates")
        prepared = []
        for wave, rate in zip(waves, rates, strict=False):
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"each waveform must be a non-empty 1-D array, got shape {wave.shape}")
            wave = resample(wave, int(rate), self.input_sample_rate)
            padded = (len(wave) // self.hop + 1) * self.hop
            prepared.append(np.pad(wave, (0, padded - len(wave))))
        results: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(prepared)
        for ids in length_buckets([len(w) for w in prepared], batch_size):
            items = [prepared[i] for i in ids]
            lengths = torch.tensor([len(w) for w in items])
            batch = torch.zeros(len(items), int(lengths.max()))
            for row, w in enumerate(items):
                batch[row, : len(w)] = torch.from_numpy(w)
            _, codes = self.encode_tensor(
                batch.to(self.device), lengths.to(self.device), self.semantic_features(items)
            )
            for row, i in enumerate(ids):
                results[i] = codes[row, : lengths[row] // self.hop].cpu().numpy().astype(np.int64)
        return results

    @torch.inference_mode()
    def decode(
        self,
        codes: Sequence[np.ndarray],
        prompt_codes: Sequence[np.ndarray] | None = None,
        batch_size: int = 16,
    ) -> list[np.ndarray]:
        """Codes -> float32 waveforms at `output_sample_rate`.

        With `prompt_codes`, item i is decoded as prompt_codes[i] + codes[i] (the decoder then hears
        the speaker it continues, which raises speaker similarity) and only the audio after the prompt
        is returned.
        """
        self._require("decoder")
        if prompt_codes is not None and len(prompt_codes) != len(codes):
            raise ValueError(f"{len(codes)} code arrays but {len(prompt_codes)} prompt code arrays")
        sequences, skips = [], []
        for i, item in enumerate(codes):
            prompt = np.asarray(prompt_codes[i], dtype=np.int64) if prompt_codes is not None else np.empty(0, np.int64)
            full = np.concatenate([prompt, np.asarray(item, dtype=np.int64).reshape(-1)])
            if full.size and (full.min() < 0 or full.max() >= self.codebook_size):
                raise ValueError(f"codes of item {i} fall outside [0, {self.codebook_size})")
            sequences.append(full)
            skips.append(len(prompt))
        samples_per_token = self.output_sample_rate // self.token_rate
        results: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(sequences)
        order = sorted((i for i in range(len(sequences)) if len(sequences[i])), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            lengths = torch.tensor([len(sequences[i]) for i in ids])
            batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(ids):
                batch[row, : lengths[row]] = torch.from_numpy(sequences[i])
            masked = None if bool((lengths == lengths.max()).all()) else lengths.to(self.device)
            audio = self.decode_tensor(batch.to(self.device), masked).float().cpu().numpy()
            for row, i in enumerate(ids):
                begin, end = skips[i] * samples_per_token, int(lengths[row]) * samples_per_token
                results[i] = audio[row, begin:end].astype(np.float32)
        return results

    def _require(self, component: str) -> None:
        if component not in self.components:
            raise RuntimeError(f"this codec was loaded without its {component} (components={self.components})")
