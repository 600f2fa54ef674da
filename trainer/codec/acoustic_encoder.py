"""The acoustic encoder: X-codec2's BigCodec-style CNN from 16 kHz waveform to 50 Hz frames.

Module and parameter names follow the original `CodecEnc` (conv_blocks / conv_final_block, anti-aliased
SnakeBeta activations with their low-pass filters, weight-normed convolutions) so checkpoints map by
prefix only (see trainer/codec/xcodec2.py).

Batched encode pads items to a common length. Every layer that looks across time can take
`lengths` (valid samples per item at its input rate): convolutions then see zeros past each item's end
and the anti-aliasing filters see the item's last value (their replicate padding), exactly what the
item alone would see, so padding never changes an item's codes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def zero_beyond(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Zero the time steps of x (B, C, T) at or past each item's length."""
    if lengths is None:
        return x
    valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
    return x * valid[:, None, :].to(x.dtype)


def hold_last(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Repeat each item's last valid step over its padding: what replicate padding would add."""
    if lengths is None:
        return x
    steps = torch.arange(x.shape[-1], device=x.device)[None, :]
    index = torch.minimum(steps, (lengths - 1)[:, None])
    return x.gather(2, index[:, None, :].expand(x.shape[0], x.shape[1], -1))


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass, shape (1, 1, kernel_size); the alias-free activation filter."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    time = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """x + 1/b * sin^2(a x) per channel, a and b stored in log scale (BigVGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        # X-codec2's operation order (reciprocal, then product), so results agree to the last bit.
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class UpSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = nn.functional.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * nn.functional.conv_transpose1d(
            x, self.filter.expand(channels, -1, -1), stride=self.ratio, groups=channels
        )
        return x[..., self.crop_left : -self.crop_right]


class LowPassFilter1d(nn.Module):
    def __init__(self, stride: int = 2, kernel_size: int = 12):
        super().__init__()
        self.stride = stride
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / stride, 0.6 / stride, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = nn.functional.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return nn.functional.conv1d(x, self.filter.expand(channels, -1, -1), stride=self.stride, groups=channels)


class DownSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = LowPassFilter1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """SnakeBeta at twice the rate (upsample -> act -> low-pass downsample) to limit aliasing.

    `antialias=False` applies SnakeBeta at the input rate: ~3x cheaper, for small CPU codecs.
    """

    def __init__(self, channels: int, antialias: bool = True):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.antialias = antialias
        if antialias:
            self.upsample = UpSample1d(2, 12)
            self.downsample = DownSample1d(2, 12)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if not self.antialias:
            return zero_beyond(self.act(x), lengths)
        x = self.upsample(hold_last(x, lengths))
        x = self.act(x)
        x = self.downsample(hold_last(x, None if lengths is None else lengths * 2))
        return zero_beyond(x, lengths)


# Init gains (weights ~ N(0, gain^2 / fan_in), zero bias). X-codec2 calls trunc_normal_(std=0.02) on its
# convs, but after the old-style weight_norm had replaced `weight` by a recomputed tensor, so that
# call never reached the weights (they kept PyTorch's default, gain ~0.58). Either N(0, 0.02^2) or
# the default shrinks the signal at every one of the trunk's 7 convs: at init the encoder output on
# real speech was ~1e-6 (0.006 with the default), FSQ saw a constant and every frame got one code.
# SnakeBeta is ~identity near 0, so trunk convs preserve variance (gain 1); the input conv lifts
# speech at typical loudness (RMS ~0.1) towards unit scale; each residual branch adds a fraction of
# its input's variance, so 15 residual units grow the signal ~(1 + 0.3^2)^15 ~ 3.6x, not 2^15x.
# Measured on example speech: output time-std ~1.9 (tiny) and ~0.7 (full-size, anti-aliased).
TRUNK_GAIN = 1.0
INPUT_GAIN = 3.0
RESIDUAL_GAIN = 0.3


def wn_conv(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, padding: int = 0,
    gain: float = TRUNK_GAIN,
):
    conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, dilation=dilation, padding=padding)
    nn.init.normal_(conv.weight, std=gain / math.sqrt(in_ch * kernel))
    nn.init.zeros_(conv.bias)
    # weight_norm starts its magnitude at ||weight||, so the effective weight is the one drawn above.
    return weight_norm(conv)


def run_layers(layers: nn.Sequential, x: torch.Tensor, lengths: torch.Tensor | None):
    """Apply layers in order, keeping padding inert; returns (x, lengths at the output rate)."""
    for layer in layers:
        if isinstance(layer, nn.Conv1d):
            x = layer(zero_beyond(x, lengths))
            if lengths is not None:
                lengths = lengths // layer.stride[0]
            x = zero_beyond(x, lengths)
        else:
            x, lengths = layer(x, lengths) if isinstance(layer, EncoderBlock) else (layer(x, lengths), lengths)
    return x, lengths


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int, antialias: bool):
        super().__init__()
        self.block = nn.Sequential(
            Activation1d(dim, antialias),
            wn_conv(dim, dim, 7, dilation=dilation, padding=3 * dilation),
            Activation1d(dim, antialias),
            wn_conv(dim, dim, 1, gain=RESIDUAL_GAIN),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return x + run_layers(self.block, x, lengths)[0]


class EncoderBlock(nn.Module):
    """Three dilated residual units at dim/2 channels, then a strided conv to dim channels."""

    def __init__(self, dim: int, stride: int, antialias: bool, dilations: tuple[int, ...] = (1, 3, 9)):
        super().__init__()
        self.block = nn.Sequential(
            *[ResidualUnit(dim // 2, d, antialias) for d in dilations],
            Activation1d(dim // 2, antialias),
            wn_conv(dim // 2, dim, 2 * stride, stride=stride, padding=stride // 2 + stride % 2),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        return run_layers(self.block, x, lengths)


class AcousticEncoder(nn.Module):
    def __init__(self, channels: int, strides: list[int], output_dim: int, antialias: bool = True):
        super().__init__()
        dim = channels
        blocks: list[nn.Module] = [wn_conv(1, dim, 7, padding=3, gain=INPUT_GAIN)]
        for stride in strides:
            dim *= 2
            blocks.append(EncoderBlock(dim, stride, antialias))
        self.conv_blocks = nn.Sequential(*blocks)
        self.conv_final_block = nn.Sequential(Activation1d(dim, antialias), wn_conv(dim, output_dim, 3, padding=1))

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, 1, S) with S a multiple of the total stride -> (B, S / stride, output_dim)."""
        x, lengths = run_layers(self.conv_blocks, wav, lengths)
        x, _ = run_layers(self.conv_final_block, x, lengths)
        return x.transpose(1, 2)

