"""Packed-row attention with no attention across sample boundaries, owned by us (not by HF's mask code).

A packed row holds several samples; each token carries a document id (-> which sample). We register
one attention function with transformers' `AttentionInterface` under `PACKED_ATTENTION`; because
that name has no mask builder, transformers passes our own mask object straight through (a 4-D mask
or BlockMask is returned as is) and never builds a dense mask from position ids. Backends:

- "flash_attention_2": flash-attn varlen over `cu_seqlens` (GPU images; import guarded).
- "flex": FlexAttention with a BlockMask built from our document ids (GPU: sparse, fused kernel;
  skips transformers' slow compiled mask builder).
- "sdpa": causal SDPA run on each document's slice of the row. Used on CPU: flex attention needs
  Inductor code generation there (long compiles on small CPUs, eager flex materialises scores). Per
  document costs sum(s_i^2) instead of L^2 and takes SDPA's causal fast path; a dense block-diagonal
  [L x L] mask measured 0.87x the padded baseline on CPU (bench/sft_throughput.py), mostly masked work.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_ATTENTION = "speechlm_packed"


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type == "cuda":
            return "flash_attention_2" if flash_attn_available() else "flex"
        return "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError("attn_implementation=flash_attention_2 needs CUDA and the flash-attn package")
    if requested == "flex" and device.type != "cuda":
        raise RuntimeError("attn_implementation=flex is only supported on CUDA here; use sdpa on CPU")
    return requested


@functools.cache
def _compiled_flex():
    # lazy: flex attention compiles on first use; SDPA runs never load it
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def build_attention_inputs(doc_ids: torch.Tensor, backend: str) -> dict[str, Any]:
    """Model-forward kwargs for rows whose tokens belong to documents `doc_ids` [B, L].

    Every token (padding included: padding is one document of its own) has a document, so every
    query row attends to at least itself.
    """
    batch, length = doc_ids.shape
    if backend == "flash_attention_2":
        flat = doc_ids + torch.arange(batch, device=doc_ids.device)[:, None] * (int(doc_ids.max()) + 1)
        flat = flat.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        bounds = torch.nonzero(starts).reshape(-1)
        cu = torch.cat([bounds, bounds.new_tensor([flat.numel()])]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    if backend == "flex":
        # lazy: flex attention compiles on first use; SDPA runs never load it
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q, kv):
            return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

        mask = create_block_mask(same_doc_causal, batch, None, length, length, device=doc_ids.device)
        return {"attention_mask": mask}
    # Document spans as one CPU tensor [documents, 3] of (row, start, end), row-major (one host sync
    # per batch, not per layer). A tensor, not a Python list: a compiled layer treats its size as
    # dynamic, where it would guard on a list's length and recompile for every new span count.
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    row, begin = torch.nonzero(starts.cpu(), as_tuple=True)
    end = torch.full_like(begin, length)
    end[:-1] = torch.where(row[1:] == row[:-1], begin[1:], length)
    return {"doc_spans": torch.stack([row, begin, end], dim=1)}


@torch.compiler.disable
def _per_document_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: torch.Tensor, dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal SDPA on each document's slice -> [B, L, Hq, D]. Eager even inside a compiled layer: the
    number of SDPA calls depends on the data, so tracing it would give one graph per span layout."""
    batch, heads, length, dim = query.shape
    gqa = key.shape[1] != heads
    pieces = [
        F.scaled_dot_product_attention(
            query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
            dropout_p=dropout, is_causal=e - s > 1, scale=scaling, enable_gqa=gqa,
        )
        for b, s, e in spans.tolist()
    ]
    # Spans tile every row in order, so their concatenation is the rows back to back.
    return torch.cat(pieces, dim=2).transpose(1, 2).reshape(batch, length, heads, dim)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, L, D], key/value [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        # lazy: optional GPU dependency
        from flash_attn import flash_attn_varlen_func

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(-1, x.shape[1], dim)

        out = flash_attn_varlen_func(
            flat(query), flat(key), flat(value), cu, kwargs["cu_seq_lens_k"],
            kwargs["max_length_q"], kwargs["max_length_k"], dropout_p=dropout, softmax_scale=scaling, causal=True,
        )
        return out.reshape(batch, length, heads, dim), None
    spans = kwargs.get("doc_spans")
    if spans is not None:
        return _per_document_sdpa(query, key, value, spans, dropout, scaling), None
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        out = _compiled_flex()(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    # No mask given (a plain forward outside the trainer): ordinary causal attention.
    is_causal = attention_mask is None and length == key.shape[2] and length > 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=key.shape[1] != heads,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Route every attention layer of an HF model through `packed_attention`."""
    model.config._attn_implementation = PACKED_ATTENTION
