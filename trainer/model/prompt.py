"""Prompt formats: how (text, audio codes) become token ids, for training and for zero-shot inference.

"inworld" (the seed's format, no chat template):
    <bos>Convert the text to speech:<|text_prompt_start|>{text}<|text_prompt_end|>\\n
    <|speech_start|><|s_..|>...<|speech_end|>
"llasa" (Llasa's LLaMA-3 chat-template-like format, without the dated system header):
    <bos><|start_header_id|>user<|end_header_id|>\\n\\nConvert the text to speech:
    <|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|><|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n<|SPEECH_GENERATION_START|><|s_..|>...<|SPEECH_GENERATION_END|>

Labels: the codes and speech-end are labelled. With `label_speech_start` (SFT under loss_vocab=full,
the seed's objective) "inworld" labels speech-start too, as the seed's datasets do (labels from the
speech-start position on); otherwise, and always in "llasa", -100 runs through speech-start (the
audio-head objective cannot score it). Text is
normalised, or passed verbatim when normalisation is off (the seed's no-op normaliser). Zero-shot
cloning: the text is "reference transcript + target text" and the reference codes are prefilled
after speech-start. Ids are assembled piece by piece (specials by id, text by the tokenizer), which
equals tokenizing the whole string because BPE never merges across an added special token; <bos> is
the tokenizer's, which is what the seed's `tokenizer(prompt, add_special_tokens=True)` adds for LLaMA-3.

"phones" (phone-aligned, ELLA-V style; text read by the phone front end, `trainer.model.phones`):
    <bos><|ph_pau|><|ph_hh|>...<|ph_pau|><|speech_start|>
    <|ph_pau|><|s_..|>...<|end_of_phone|><|ph_hh|><|s_..|>...<|end_of_phone|>...<|speech_end|>
Every phone of the text is repeated before the codes spoken during it, and each phone's codes end with
end-of-phone. Labels: codes, end-of-phone and speech-end; the phones in the speech part are given, never
predicted: at inference the next phone is appended after each end-of-phone, so the model chooses
durations and the alignment cannot drift, skip or repeat words (`phone_forcing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.model import phones as front_end
from trainer.model.text_normalization import normalize_text
from trainer.model.vocab import AudioVocab

IGNORE_INDEX = -100
INSTRUCTION = "Convert the text to speech:"
TEXT = object()  # marks where the (normalised) text goes in a template
PHONES = object()  # marks where the text's phone tokens go in a template
IntOrArray = int | np.ndarray
# Language of text that comes without a tag (the manifest default of the GRPO prompts and eval lists).
DEFAULT_LANGUAGE = "en"


@dataclass(frozen=True)
class FormatSpec:
    # Tags added to the vocabulary; the LAST one is speech-end (it sits right before <|s_0|>).
    tags: tuple[str, ...]
    # Tokens the format needs that a LLaMA-3 tokenizer already has (added only when missing).
    chat_tokens: tuple[str, ...]
    speech_start: str
    speech_end: str
    # Pieces before the codes: strings (tokenized, or by id when they are tags/chat tokens) and TEXT.
    template: tuple[object, ...]
    # Whether speech-start (the last prompt token) is itself a training target.
    speech_start_target: bool = False
    # Phone-aligned formats: the tag ending each phone's codes (it sits right before speech-end).
    end_of_phone: str = ""

    def __post_init__(self) -> None:
        assert self.tags[-1] == self.speech_end and self.template[-1] == self.speech_start
        assert not self.end_of_phone or self.tags[-2] == self.end_of_phone


FORMATS: dict[str, FormatSpec] = {
    "inworld": FormatSpec(
        tags=("<|text_prompt_start|>", "<|text_prompt_end|>", "<|speech_start|>", "<|speech_end|>"),
        chat_tokens=(),
        speech_start="<|speech_start|>",
        speech_end="<|speech_end|>",
        template=(INSTRUCTION, "<|text_prompt_start|>", TEXT, "<|text_prompt_end|>", "\n", "<|speech_start|>"),
        speech_start_target=True,
    ),
    "llasa": FormatSpec(
        tags=(
            "<|TEXT_GENERATION_START|>", "<|TEXT_GENERATION_END|>", "<|TEXT_UNDERSTANDING_START|>",
            "<|TEXT_UNDERSTANDING_END|>", "<|SPEECH_UNDERSTANDING_START|>", "<|SPEECH_UNDERSTANDING_END|>",
            "<|SPEECH_GENERATION_START|>", "<|SPEECH_GENERATION_END|>",
        ),
        chat_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        speech_start="<|SPEECH_GENERATION_START|>",
        speech_end="<|SPEECH_GENERATION_END|>",
        template=(
            "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", INSTRUCTION,
            "<|TEXT_UNDERSTANDING_START|>", TEXT, "<|TEXT_UNDERSTANDING_END|>", "<|eot_id|>",
            "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", "<|SPEECH_GENERATION_START|>",
        ),
    ),
    "phones": FormatSpec(
        tags=(*(front_end.phone_token(p) for p in front_end.PHONES), "<|speech_start|>", "<|end_of_phone|>",
              "<|speech_end|>"),
        chat_tokens=(),
        speech_start="<|speech_start|>",
        speech_end="<|speech_end|>",
        template=(PHONES, "<|speech_start|>"),
        end_of_phone="<|end_of_phone|>",
    ),
}
PhoneFrames = list[tuple[str, int]]  # (phone, codec frames spoken during it), in order


@dataclass(frozen=True)
class TrainingExample:
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L], IGNORE_INDEX over the prompt


class PromptFormat:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab: AudioVocab, normalize: bool = True,
                 label_speech_start: bool = False, frame_rate: float = 50.0):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.spec = FORMATS[vocab.prompt_format]
        self.normalize = normalize
        # Speech-start is a target only for the full-vocabulary objective, and only in formats that train it.
        self.label_speech_start = label_speech_start and self.spec.speech_start_target
        self._piece_cache: dict[str, list[int]] = {}
        # Codec frames per second: the phone format aligns a voice prompt's codes to its phones.
        self.frame_rate = frame_rate
        self._all_phone_ids = np.asarray(self.phone_ids(list(front_end.PHONES))) if self.phone_aligned else None

    def _piece(self, piece: str) -> list[int]:
        if piece in self.vocab.special_tokens:
            return [self.vocab.special_tokens[piece]]
        if piece not in self._piece_cache:
            self._piece_cache[piece] = self.tokenizer.encode(piece, add_special_tokens=False)
        return self._piece_cache[piece]

    @property
    def phone_aligned(self) -> bool:
        return bool(self.spec.end_of_phone)

    def phone_ids(self, phones: list[str]) -> list[int]:
        return front_end.token_ids(self.vocab.special_tokens, phones)

    def clean_text(self, text: str, language: str | None = DEFAULT_LANGUAGE) -> str:
        """The text the model reads: normalised by the sample's language, or verbatim (as the reference's
        no-op normaliser feeds it, so `inworld` prompts match it token for token)."""
        return normalize_text(text, language) if self.normalize else text

    def prefix_ids(self, text: str, language: str | None = DEFAULT_LANGUAGE) -> list[int]:
        """Ids up to and including speech-start for `text` (already the full text to speak). The phone
        format reads the text as given: flite does its own normalisation."""
        if self.phone_aligned:
            return self._prefix("", front_end.phonemize(text) if text.strip() else [])
        return self._prefix(self.clean_text(text, language))

    def _prefix(self, clean: str, phones: list[str] | None = None) -> list[int]:
        ids: list[int] = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        for piece in self.spec.template:
            if piece is TEXT:
                ids.extend(self.tokenizer.encode(clean, add_special_tokens=False))
            elif piece is PHONES:
                ids.extend(self.phone_ids(phones or []))
            else:
                ids.extend(self._piece(piece))
        return ids

    def phone_body(self, frames: PhoneFrames, codes: np.ndarray) -> list[int]:
        """The speech part of the phone format: each phone, its codes, end-of-phone."""
        if sum(n for _, n in frames) != len(codes):
            raise ValueError(f"phone frames add up to {sum(n for _, n in frames)}, the clip has {len(codes)} codes")
        eop = self.vocab.end_of_phone_id
        ids, at = [], 0
        code_ids = self.vocab.code_ids(codes).tolist()
        for (_, n), phone_id in zip(frames, self.phone_ids([p for p, _ in frames]), strict=True):
            ids += [phone_id, *code_ids[at : at + n], eop]
            at += n
        return ids

    def example_length(self, text_tokens: IntOrArray, num_codes: IntOrArray, num_phones: IntOrArray = 0
                       ) -> IntOrArray:
        """Tokens of a training example (or an array of them): BOS + template + text tokens, codes,
        speech-end; in the phone format each phone counts three times (in the prefix, before its codes,
        its end-of-phone)."""
        return len(self.prefix_ids("")) + text_tokens + 3 * num_phones + num_codes + 1

    def training_example(self, text: str, codes: np.ndarray, language: str | None = DEFAULT_LANGUAGE,
                         phones: PhoneFrames | None = None) -> TrainingExample:
        if len(codes) == 0:
            raise ValueError("a training example needs at least one audio code")
        if self.phone_aligned:
            if not phones:
                raise ValueError("the phones format needs the sample's phone timings (vectorize.phone_alignment)")
            prefix = self._prefix("", [p for p, _ in phones])
            input_ids = np.asarray([*prefix, *self.phone_body(phones, codes), self.vocab.speech_end_id], np.int64)
            labels = input_ids.copy()
            labels[: len(prefix)] = IGNORE_INDEX
            labels[np.isin(input_ids, self._all_phone_ids)] = IGNORE_INDEX
            return TrainingExample(input_ids, labels)
        prefix = self.prefix_ids(text, language)
        speech = [*self.vocab.code_ids(codes).tolist(), self.vocab.speech_end_id]
        input_ids = np.asarray(prefix + speech, dtype=np.int64)
        labels = input_ids.copy()
        labels[: len(prefix) - 1 if self.label_speech_start else len(prefix)] = IGNORE_INDEX
        return TrainingExample(input_ids, labels)

    def inference_prompt(
        self, target_text: str, ref_text: str | None = None, ref_codes: np.ndarray | None = None,
        language: str | None = DEFAULT_LANGUAGE, ref_language: str | None = None,
        ref_phones: PhoneFrames | None = None, target_phones: list[str] | None = None,
    ) -> np.ndarray:
        """Zero-shot prompt: text = reference transcript + target text, reference codes prefilled. Each
        text is normalised by its own language (`ref_language` defaults to `language`). The phone format
        prefills the reference phone by phone (`ref_phones`: its vectorized timings, if known) and reads
        the target's phones from `target_phones` when known (else from the front end)."""
        if self.phone_aligned:
            return self._phone_prompt(target_text, ref_text, ref_codes, ref_phones, target_phones)
        text = self.clean_text(target_text, language)
        if ref_text:
            text = f"{self.clean_text(ref_text, language if ref_language is None else ref_language)} {text}"
        ids = self._prefix(text)
        if ref_codes is not None and len(ref_codes):
            ids += self.vocab.code_ids(ref_codes).tolist()
        return np.asarray(ids, dtype=np.int64)

    def _phone_prompt(self, target_text: str, ref_text: str | None, ref_codes: np.ndarray | None,
                      ref_phones: PhoneFrames | None, target_phones: list[str] | None) -> np.ndarray:
        """The phones of reference transcript + target text, the reference's codes phone by phone (its
        own timings, else flite's durations stretched to it: `phones.approximate_times`), then the first
        target phone; `phone_forcing` feeds the rest."""
        target = target_phones or front_end.phonemize(target_text)
        ref_frames: PhoneFrames = []
        if ref_codes is not None and len(ref_codes):
            if ref_phones is None:
                if not (ref_text and ref_text.strip()):
                    raise ValueError("a voice prompt needs its transcript")
                times = front_end.approximate_times(ref_text, len(ref_codes) / self.frame_rate)
                ref_phones = front_end.frames_per_phone(times, len(ref_codes), self.frame_rate)
            ref_frames = ref_phones
        ids = self._prefix("", [p for p, _ in ref_frames] + target)
        if ref_frames:
            ids += self.phone_body(ref_frames, np.asarray(ref_codes))
        return np.asarray(ids + self.phone_ids(target[:1]), dtype=np.int64)

    def codes_from_ids(self, generated_ids: np.ndarray | list[int]) -> np.ndarray:
        return self.vocab.codes_from_ids(generated_ids)

    def render(self, ids: np.ndarray | list[int]) -> str:
        """The prompt as a string (audio tokens spelled `<|s_N|>`), for logs and tests."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
