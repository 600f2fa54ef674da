"""Phone-forced decoding of the `phones` prompt format, as a logits processor for HF `generate`.

The model samples codes and end-of-phone; the phones are given. After each end-of-phone the next phone
of the prompt's phone list is forced (after the last one, speech-end), and a phone that runs past
MAX_PHONE_SECONDS of codes is ended. Everything is read from the row's own ids (the phone list sits
between BOS and speech-start, and the k-th end-of-phone ends its k-th phone), so the processor has no
state: it works inside stock `generate` with its KV cache and batching, for inference, the GRPO
rollouts (TRL calls `generate`) and the guard rails alike.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from trainer.model import phones as front_end
from trainer.model.vocab import AudioVocab

# A phone is ended after this long: a model that holds a sound (a babbling loop) cannot run on to
# max_new_tokens. flite's longest phones (phrase-break pauses) are well under it.
MAX_PHONE_SECONDS = 1.5


class PhoneForcing(LogitsProcessor):
    def __init__(self, vocab: AudioVocab, frame_rate: float):
        """`frame_rate`: the codec's codes per second."""
        if not vocab.end_of_phone:
            raise ValueError(f"prompt format {vocab.prompt_format!r} is not phone-aligned")
        self.vocab = vocab
        self.max_phone_frames = round(MAX_PHONE_SECONDS * frame_rate)
        self.phone_ids = torch.tensor(front_end.token_ids(vocab.special_tokens))

    def is_phone(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, self.phone_ids.to(ids.device))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        v = self.vocab
        length = input_ids.shape[1]
        pos = torch.arange(length, device=input_ids.device).expand_as(input_ids)
        # The first speech-start ends the phone list (rows without one get no forcing: not phone prompts).
        has_sep = (input_ids == v.speech_start_id).any(-1)
        sep = torch.where(input_ids == v.speech_start_id, pos, length).min(-1).values
        listed = self.is_phone(input_ids) & (pos < sep[:, None])
        first = torch.where(listed, pos, length).min(-1).values
        ended = ((input_ids == v.end_of_phone_id) & (pos > sep[:, None])).sum(-1)
        last = input_ids[:, -1]
        frames = length - 1 - torch.where(v.is_audio(input_ids), -1, pos).max(-1).values
        upcoming = input_ids.gather(1, (first + ended).clamp(max=length - 1)[:, None]).squeeze(1)
        after_eop = last == v.end_of_phone_id
        force = torch.full_like(last, -1)
        force = torch.where(after_eop & (ended < listed.sum(-1)), upcoming, force)
        force = torch.where(after_eop & (ended >= listed.sum(-1)), torch.full_like(last, v.speech_end_id), force)
        force = torch.where(~after_eop & (frames >= self.max_phone_frames),
                            torch.full_like(last, v.end_of_phone_id), force)
        force = torch.where(has_sep, force, -1)
        scores = scores.clone()
        scores[has_sep, v.speech_end_id] = float("-inf")  # a row ends after its last phone, never by choice
        rows = torch.nonzero(force >= 0).reshape(-1)
        if rows.numel():
            scores[rows] = float("-inf")
            scores[rows, force[rows]] = 0.0
        return scores
