"""Phone-forced decoding of the `phones` prompt format, as a logits processor for HF `generate`.

The model samples codes and end-of-phone; the phones are given. After each end-of-phone the next phone
of the prompt's phone list is forced (after the last one, speech-end), and a phone that runs past
MAX_PHONE_SECONDS of codes is ended. Everything is read from the row's own ids (the phone list sits
between BOS and speech-start, and the k-th end-of-phone ends its k-th phone), so the processor has no
state: it works inside stock `generate` with its KV cache and batching, for inference, the GRPO
rollouts (TRL calls `generate`) and the guard rails alike. `forced_completions` is the same decoding
for a server that only constrains and stops (vLLM's OpenAI API): stop at end-of-phone, feed the next
phone, continue.
"""

from __future__ import annotations

from typing import Protocol

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


class Completer(Protocol):
    """One completion per prompt from a server that can only constrain and stop (vLLM's OpenAI API):
    at most `max_tokens` tokens drawn from `allowed`, ending early after any of `stop` (kept in the
    returned ids when the server generated it)."""

    def __call__(self, prompts: list[list[int]], max_tokens: int, allowed: list[int], stop: list[int]
                 ) -> list[list[int]]: ...


def forced_completions(prompts: list[list[int]], vocab: AudioVocab, frame_rate: float, max_new_tokens: int,
                       complete: Completer) -> list[list[int]]:
    """PhoneForcing's decoding through a server that stops and continues: each round asks for one
    phone's codes (stop at end-of-phone, at most MAX_PHONE_SECONDS of codes, then end-of-phone is put
    in), then feeds the next phone, or speech-end after the last, exactly where the processor forces
    them; forced tokens count against `max_new_tokens` as in `generate`. Greedy completions equal
    `generate(logits_processor=[PhoneForcing])`'s token for token."""
    forcing = PhoneForcing(vocab, frame_rate)
    phone_ids = set(forcing.phone_ids.tolist())
    eop, end = vocab.end_of_phone_id, vocab.speech_end_id
    allowed = [i for i in vocab.completion_ids() if i != end]  # a row ends after its last phone only
    listed, spoken = [], []  # per row: the phone list; phones begun (the prompt ends inside one)
    for ids in prompts:
        sep = ids.index(vocab.speech_start_id)
        listed.append([i for i in ids[:sep] if i in phone_ids])
        spoken.append(sum(i in phone_ids for i in ids[sep:]))
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        budget = {r: min(forcing.max_phone_frames, max_new_tokens - len(generated[r])) for r in active}
        for max_tokens in sorted(set(budget.values())):
            rows = [r for r in active if budget[r] == max_tokens]
            outs = complete([prompts[r] + generated[r] for r in rows], max_tokens, allowed, [eop])
            for r, out in zip(rows, outs, strict=True):
                generated[r] += out
        still = []
        for r in active:
            ids = generated[r]
            if ids[-1:] != [eop]:  # the phone's frame budget ran out: ended, as the processor ends it
                if len(ids) == max_new_tokens:
                    continue
                ids.append(eop)
            if len(ids) == max_new_tokens:
                continue
            if spoken[r] < len(listed[r]):
                ids.append(listed[r][spoken[r]])
                spoken[r] += 1
                still.append(r)
            else:
                ids.append(end)
        active = [r for r in still if len(generated[r]) < max_new_tokens]
    return generated
