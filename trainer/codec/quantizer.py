"""Finite scalar quantisation (FSQ, Mentzer et al. 2023) exactly as X-codec2 computes it.

X-codec2 (and the Inworld reference) quantise with vector-quantize-pytorch 1.17.8's
`ResidualFSQ(dim, levels, num_quantizers=1)`. Its only weights are `project_in` (dim -> len(levels))
and `project_out` (len(levels) -> dim); what that release computes, and so what every X-codec2 code
means, is:

    z        = project_in(x)                     in x's dtype (bf16 under autocast)
    residual = bound(z)                          ResidualFSQ bounds once itself (in fp32: the
                                                 bound's fp32 constants promote a bf16 z) ...
    level    = round(bound(residual / 1.0))      ... and its single FSQ layer bounds again
    vector   = level / (levels // 2)             in [-1, 1); straight-through round
    code     = sum((vector * half + half) * basis)   half = levels // 2, basis = cumprod([1, *levels[:-1]])
    output   = project_out(vector)

    bound(z) = tanh(z + atanh(offset / half_l)) * half_l - offset,
               half_l = (levels - 1) * 1.001 / 2, offset = 0.5 for even levels else 0

The double bound is a quirk of that release (later ones dropped it and then forced
`preserve_symmetry=True`); codes depend on it, so we own the quantiser rather than depend on a
library whose formula moved: datasets vectorised with X-codec2 keep their meaning here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    def __init__(self, dim: int, levels: list[int]):
        super().__init__()
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level must be >= 2, got {levels}")
        self.codebook_size = math.prod(levels)
        self.project_in = nn.Linear(dim, len(levels))
        # Unit gain (PyTorch's default is ~0.58): FSQ cells are ~0.8 wide in z, so z needs a spread of
        # ~1 for every level to be reached; a smaller z rounds to the centre cell.
        nn.init.normal_(self.project_in.weight, std=dim**-0.5)
        nn.init.zeros_(self.project_in.bias)
        self.project_out = nn.Linear(len(levels), dim)
        levels_t = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)
        # Derived from `levels` (stored in the model config), so kept out of the state dict.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Bound twice (see the module docstring), round (straight-through), scale to [-1, 1)."""
        bounded = self._bound(self._bound(z))
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (self.levels // 2).to(z.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (quantised (B, T, dim), codes (B, T) int64 in [0, codebook_size))."""
        return self.quantize_latent(self.project_in(x), x.dtype)

    def quantize_latent(self, z: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """z = project_in(x) (B, T, len(levels)) -> (quantised (B, T, dim) in `dtype`, codes (B, T))."""
        # Quantise in fp32: rounding in bf16 would merge neighbouring codes.
        z = z.float()
        codes_vec = self._quantize(z)
        half_width = self.levels // 2
        level_index = (codes_vec * half_width + half_width).round().long()
        codes = (level_index * self.basis).sum(dim=-1)
        return self.project_out(codes_vec.to(dtype)), codes

    def saturation_loss(self, z: torch.Tensor, limit: float = 2.0) -> torch.Tensor:
        """Squared excess of |z| over `limit`: zero while tanh still responds (tanh(2) = 0.96).

        Past it the bound's gradient vanishes, but Adam rescales even a vanishing gradient to a full
        step, so a latent that drifts out keeps drifting: measured on the CPU demo codec, z reached
        |mean| 60-95 within 200 steps and every frame rounded to one code. This restoring force
        keeps the latent where rounding can still move between cells; it adds no parameters, so
        the forward pass (and X-codec2 checkpoints) are unchanged.
        """
        return (z.float().abs() - limit).clamp(min=0).pow(2).mean()

    def indices_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) int64 -> normalised code vectors (B, T, len(levels))."""
        level_index = (codes.unsqueeze(-1) // self.basis) % self.levels
        half_width = self.levels // 2
        return (level_index - half_width).float() / half_width.float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) -> (B, T, dim): the decoder input X-codec2 calls `get_output_from_indices`."""
        vectors = self.indices_to_vectors(codes).to(self.project_out.weight.dtype)
        return self.project_out(vectors)
