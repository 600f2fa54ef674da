"""The SFT objective: next-token cross-entropy on the audio positions only, without ever building the
full [tokens x vocabulary] logits tensor.

Only labelled positions (codes and speech-end; a few % of a packed row is text) go through the head,
in chunks of `loss_chunk_size` rows, each chunk recomputed in backward (activation checkpointing) so at
most one chunk of logits is alive. `loss_vocab`:
- "full": softmax over the whole vocabulary (the seed's objective).
- "audio": softmax over the audio rows of the head (codes + speech-end), a contiguous slice of the
  head. The objective changes: text tokens are never competitors in the normaliser, so the model is not
  trained to push their probability down; samplers must then restrict generation to those rows (the
  audio head), which is what a TTS decoder wants anyway. ~3x fewer head FLOPs at LLaMA-3 scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.data.dataset import Batch
from trainer.model.attention import build_attention_inputs
from trainer.model.prompt import IGNORE_INDEX
from trainer.model.vocab import AudioVocab


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T, targets) over rows, `chunk_size` rows of logits at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t)
    return total


def corrupt_audio_inputs(input_ids: torch.Tensor, vocab: AudioVocab, fraction: float) -> torch.Tensor:
    """`input_ids` with each audio code replaced, with probability `fraction`, by a uniformly random code."""
    hit = vocab.is_audio(input_ids) & (torch.rand(input_ids.shape, device=input_ids.device) < fraction)
    return torch.where(hit, torch.randint_like(input_ids, vocab.audio_offset, vocab.audio_end), input_ids)


class SpeechLMObjective(nn.Module):
    """Wraps the causal LM so DDP/FSDP/DeepSpeed see one module whose forward returns the loss sum."""

    def __init__(
        self, lm: nn.Module, vocab: AudioVocab, attention: str, loss_vocab: str = "audio", chunk_size: int = 4096,
        audio_input_noise: float = 0.0,
    ):
        super().__init__()
        self.lm = lm
        self.vocab = vocab
        self.attention = attention
        self.loss_vocab = loss_vocab
        self.chunk_size = chunk_size
        self.audio_input_noise = audio_input_noise

    def _causal_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE over labelled tokens, number of labelled tokens) for one micro-batch."""
        lm = self._causal_lm()
        input_ids = batch.input_ids
        if self.training and self.audio_input_noise:
            input_ids = corrupt_audio_inputs(input_ids, self.vocab, self.audio_input_noise)
        hidden = lm.model(
            input_ids=input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            **build_attention_inputs(batch.doc_ids, self.attention),
        ).last_hidden_state
        targets = batch.targets.reshape(-1)
        picked = torch.nonzero(targets != IGNORE_INDEX).reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked)
        targets = targets.index_select(0, picked)
        weight = lm.lm_head.weight
        if self.loss_vocab == "audio":
            weight, targets = self._audio_head(weight, targets)
        return chunked_cross_entropy(hidden, weight, targets, self.chunk_size), picked.new_tensor(picked.numel())

    def _audio_head(self, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head rows [end-of-phone (phone formats), speech-end, <|s_0|>..<|s_K-1|>] and the targets
        renumbered into them."""
        v = self.vocab
        if v.audio_head_contiguous:
            return weight[v.head_start : v.audio_end], targets - v.head_start
        # Only a seed model converted in place can have speech-end elsewhere; no phone format there.
        rows = torch.cat([weight[v.speech_end_id : v.speech_end_id + 1], weight[v.audio_offset : v.audio_end]])
        local = torch.where(targets == v.speech_end_id, torch.zeros_like(targets), targets - v.audio_offset + 1)
        return rows, local
