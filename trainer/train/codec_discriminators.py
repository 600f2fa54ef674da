"""GAN discriminators of the codec: multi-period (HiFi-GAN) and multi-resolution STFT.

Each returns, per sub-discriminator, its list of feature maps ending with the logits map; the feature
maps feed the feature-matching loss, the logits the least-squares adversarial loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _channels(base: int, count: int, cap: int = 512) -> list[int]:
    # Doubling (not HiFi-GAN's x4) keeps a small `base` cheap enough for CPU training; raise `base`
    # (codec.train.disc_channels, e.g. 64) for full-size GPU runs.
    return [min(base * 2**i, cap) for i in range(count)]


def conv_features(convs: nn.ModuleList, logits: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Leaky-ReLU conv stack: every hidden feature map, then the logits map."""
    features = []
    for conv in convs:
        x = nn.functional.leaky_relu(conv(x), 0.1)
        features.append(x)
    features.append(logits(x))
    return features


class PeriodDiscriminator(nn.Module):
    """Folds the waveform into (T / period, period) and convolves along time only."""

    def __init__(self, period: int, base_channels: int):
        super().__init__()
        self.period = period
        widths = _channels(base_channels, 4)
        layers, in_ch = [], 1
        for width in widths:
            layers.append(weight_norm(nn.Conv2d(in_ch, width, (5, 1), (3, 1), padding=(2, 0))))
            in_ch = width
        layers.append(weight_norm(nn.Conv2d(in_ch, in_ch, (5, 1), 1, padding=(2, 0))))
        self.convs = nn.ModuleList(layers)
        self.logits = weight_norm(nn.Conv2d(in_ch, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, audio: torch.Tensor) -> list[torch.Tensor]:
        batch, steps = audio.shape
        if steps % self.period:
            audio = nn.functional.pad(audio, (0, self.period - steps % self.period), mode="reflect")
        x = audio.view(batch, 1, -1, self.period)
        return conv_features(self.convs, self.logits, x)


class STFTDiscriminator(nn.Module):
    """2-D convolutions over the log-magnitude spectrogram at one resolution (hop = n_fft / 2)."""

    def __init__(self, n_fft: int, base_channels: int):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        width = base_channels
        # Every layer halves the frequency axis: the small FFT sizes have many frames, so the cost
        # per layer must shrink quickly.
        layers = [weight_norm(nn.Conv2d(1, width, (3, 9), stride=(1, 2), padding=(1, 4)))]
        layers += [weight_norm(nn.Conv2d(width, width, (3, 9), stride=(1, 2), padding=(1, 4))) for _ in range(2)]
        layers.append(weight_norm(nn.Conv2d(width, width, (3, 3), padding=(1, 1))))
        in_ch = width
        self.convs = nn.ModuleList(layers)
        self.logits = weight_norm(nn.Conv2d(in_ch, 1, (3, 3), padding=(1, 1)))

    def forward(self, audio: torch.Tensor) -> list[torch.Tensor]:
        spec = torch.stft(
            audio.float(), self.n_fft, self.n_fft // 2, window=self.window, return_complex=True
        ).abs()
        x = torch.log(spec.clamp(min=1e-5)).transpose(1, 2).unsqueeze(1).to(audio.dtype)
        return conv_features(self.convs, self.logits, x)


class Discriminators(nn.Module):
    def __init__(self, periods: list[int], fft_sizes: list[int], base_channels: int):
        super().__init__()
        self.period = nn.ModuleList([PeriodDiscriminator(p, base_channels) for p in periods])
        self.stft = nn.ModuleList([STFTDiscriminator(n, base_channels) for n in fft_sizes])

    def forward(self, audio: torch.Tensor) -> list[list[torch.Tensor]]:
        """audio (B, S) -> one feature list per sub-discriminator."""
        return [d(audio) for d in self.period] + [d(audio) for d in self.stft]
