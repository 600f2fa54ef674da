"""The decoder: X-codec2's Vocos-style backbone (conv + ResNet + Transformer), an optional
super-resolution upsampler for 24/48 kHz output (ours at full width, or the Inworld reference's), and
the iSTFT head.

Names follow X-codec2's `generator.backbone.*` / `generator.head.*` so checkpoints map by prefix.
Batched decode passes `lengths` (valid frames per item): convolutions see zeros, GroupNorm statistics
and attention keys cover only valid frames, and the iSTFT normalises each item by its own window
envelope, so an item decodes the same alone or in a batch (up to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from trainer.codec.acoustic_encoder import zero_beyond


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, lengths: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm whose statistics cover only each item's valid frames."""
    if lengths is None:
        return norm(x)
    batch, channels, steps = x.shape
    groups = norm.num_groups
    valid = (torch.arange(steps, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    valid = valid[:, None, None, :]
    xg = x.reshape(batch, groups, channels // groups, steps)
    count = (lengths * (channels // groups)).to(x.dtype)[:, None, None, None]
    mean = (xg * valid).sum(dim=(2, 3), keepdim=True) / count
    var = (((xg - mean) ** 2) * valid).sum(dim=(2, 3), keepdim=True) / count
    xn = ((xg - mean) * torch.rsqrt(var + norm.eps)).reshape(batch, channels, steps)
    return zero_beyond(xn * norm.weight[None, :, None] + norm.bias[None, :, None], lengths)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = zero_beyond(_swish(group_norm(x, self.norm1, lengths)), lengths)
        h = self.conv1(h)
        h = zero_beyond(_swish(group_norm(h, self.norm2, lengths)), lengths)
        h = self.conv2(self.dropout(h))
        return zero_beyond(x + h, lengths)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim, bias=False)
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)))


def rotate_by_head(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over x (B, H, T, D) whose position is the HEAD index, not time.

    X-codec2 calls torchtune's RotaryPositionalEmbeddings (which expects (B, T, H, D)) on (B, H, T, D)
    tensors, so its pretrained attention was trained with this rotation; we reproduce it to stay
    weight-compatible. Time order reaches the Transformer through the convolutions around it.
    """
    heads, dim = x.shape[1], x.shape[-1]
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = torch.arange(heads, device=x.device, dtype=torch.float32)[:, None] * theta[None, :]
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    pairs = x.float().reshape(*x.shape[:-1], dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, steps, dim = x.shape
        qkv = self.c_attn(x).view(batch, steps, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = rotate_by_head(qkv[0]), rotate_by_head(qkv[1]), qkv[2]
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.c_proj(y.transpose(1, 2).reshape(batch, steps, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.att_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.att = Attention(dim, heads)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.att(self.att_norm(x), key_mask)
        return x + self.mlp(self.ffn_norm(x))


class VocosBackbone(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Conv1d(dim, dim, kernel_size=7, padding=3)
        self.prior_net = nn.Sequential(ResnetBlock(dim), ResnetBlock(dim))
        self.transformers = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.post_net = nn.Sequential(ResnetBlock(dim), ResnetBlock(dim))
        self.apply(_init_conv)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        h = self.embed(zero_beyond(x.transpose(1, 2), lengths))
        h = zero_beyond(h, lengths)
        for block in self.prior_net:
            h = block(h, lengths)
        h = h.transpose(1, 2)
        key_mask = None
        if lengths is not None:
            key_mask = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None])[:, None, None, :]
        for block in self.transformers:
            h = block(h, key_mask)
        h = zero_beyond(h.transpose(1, 2), lengths)
        for block in self.post_net:
            h = block(h, lengths)
        return self.final_layer_norm(h.transpose(1, 2))


class UpsampleStage(nn.Module):
    """Transposed conv (x factor in time) then a ResNet block: the super-resolution step."""

    def __init__(self, dim: int, factor: int, kernel_size: int):
        super().__init__()
        if kernel_size < factor:
            raise ValueError(f"upsample kernel size {kernel_size} is smaller than its factor {factor}")
        self.factor = factor
        self.crop = (kernel_size - factor) // 2
        self.upsample = nn.ConvTranspose1d(dim, dim, kernel_size, stride=factor)
        self.resblock = ResnetBlock(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        steps = x.shape[-1] * self.factor
        x = self.upsample(zero_beyond(x, lengths))[..., self.crop : self.crop + steps]
        lengths = None if lengths is None else lengths * self.factor
        return self.resblock(zero_beyond(x, lengths), lengths), lengths


class Upsampler(nn.Module):
    def __init__(self, dim: int, factors: list[int], kernel_sizes: list[int]):
        super().__init__()
        kernels = kernel_sizes or [2 * f for f in factors]
        self.stages = nn.ModuleList([UpsampleStage(dim, f, k) for f, k in zip(factors, kernels, strict=False)])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        """x (B, T, dim) -> (B, T * prod(factors), dim) and the lengths at that rate."""
        h = x.transpose(1, 2)
        for stage in self.stages:
            h, lengths = stage(h, lengths)
        return h.transpose(1, 2), lengths


class InworldUpsampler(nn.Module):
    """The Inworld reference trainer's super-resolution upsampler (its `UpSamplerBlock`), so the 24/48 kHz
    decoders it trains load and decode here: stage i is a weight-normed transposed conv from
    dim / 2^i to dim / 2^(i+1) channels (kernel k, stride u, padding (k - u) // 2) and a ResNet block
    (no dropout); then a linear from dim / 2^n back to dim and swish.

    With an odd k - u a stage emits u x T + 1 frames, as the reference does; the surplus tail frames
    are carried through the later stages (so every other frame matches the reference) and cut at the
    end, so audio stays exactly len(codes) x samples-per-token long.
    """

    def __init__(self, dim: int, factors: list[int], kernel_sizes: list[int]):
        super().__init__()
        self.factors = factors
        self.upsample_layers = nn.ModuleList()
        self.resnet_blocks = nn.ModuleList()
        for i, (factor, kernel) in enumerate(zip(factors, kernel_sizes, strict=True)):
            conv = nn.ConvTranspose1d(dim >> i, dim >> (i + 1), kernel, factor, padding=(kernel - factor) // 2)
            self.upsample_layers.append(weight_norm(conv))
            self.resnet_blocks.append(ResnetBlock(dim >> (i + 1), dropout=0.0))
        self.out_proj = nn.Linear(dim >> len(factors), dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        """x (B, T, dim) -> (B, T * prod(factors), dim) and the lengths at that rate."""
        h = x.transpose(1, 2)
        steps, valid = x.shape[1], lengths
        for up, block, factor in zip(self.upsample_layers, self.resnet_blocks, self.factors, strict=True):
            h = up(zero_beyond(h, valid))
            surplus = up.kernel_size[0] - factor - 2 * up.padding[0]  # 1 where k - u is odd
            valid = None if valid is None else valid * factor + surplus
            h = block(zero_beyond(h, valid), valid)
            steps *= factor
        out_lengths = None if lengths is None else lengths * (steps // x.shape[1])
        return _swish(self.out_proj(h[..., :steps].transpose(1, 2))), out_lengths


class ISTFT(nn.Module):
    """Inverse STFT with "same" padding (torch.istft only supports centre padding with a NOLA check
    that fails at the trimmed edges): irfft, window, overlap-add, divide by the window envelope."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.pad = (n_fft - hop_length) // 2
        self.register_buffer("window", torch.hann_window(n_fft))

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, n_fft, T) -> (B, T * hop), trimmed by `pad` at both ends."""
        steps = frames.shape[-1]
        size = (steps - 1) * self.hop_length + self.n_fft
        out = nn.functional.fold(
            frames, output_size=(1, size), kernel_size=(1, self.n_fft), stride=(1, self.hop_length)
        )
        return out[:, 0, 0, self.pad : size - self.pad]

    def envelope(self, steps: int) -> torch.Tensor:
        window_sq = self.window.square()[None, :, None].expand(1, -1, steps)
        return self._overlap_add(window_sq)[0]

    def forward(self, spec: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """spec (B, n_fft/2+1, T) complex -> (B, T * hop)."""
        frames = torch.fft.irfft(spec, self.n_fft, dim=1) * self.window[None, :, None]
        audio = self._overlap_add(frames)
        if lengths is None:
            return audio / self.envelope(spec.shape[-1])
        envelopes = torch.ones_like(audio)
        for i, n in enumerate(lengths.tolist()):
            envelopes[i, : n * self.hop_length] = self.envelope(n)
        return audio / envelopes


class ISTFTHead(nn.Module):
    """Linear to log-magnitude and phase per frame, then iSTFT (n_fft = 4 x hop)."""

    def __init__(self, dim: int, hop_length: int):
        super().__init__()
        n_fft = 4 * hop_length
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) -> audio (B, T * hop)."""
        pred = self.out(x).transpose(1, 2).float()
        log_mag, phase = pred.chunk(2, dim=1)
        # exp is clipped so an untrained or diverging head cannot emit inf.
        mag = torch.exp(log_mag).clip(max=1e2)
        if lengths is not None:
            mag = zero_beyond(mag, lengths)
        spec = torch.polar(mag, phase)
        return self.istft(spec, lengths)


def _init_conv(module: nn.Module) -> None:
    if isinstance(module, nn.Conv1d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
