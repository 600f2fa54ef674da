"""A deterministic byte-level BPE text tokenizer for the random-init presets.

No LLaMA tokenizer can be downloaded here, so presets train a small BPE (seconds, same merges every
time: fixed corpus, fixed settings) on a built-in English text. Byte-level means every string
encodes. The LLaMA-3-shaped preset pads the text vocabulary with unreachable reserved entries up to
128,256 rows, as LLaMA-3 does with its reserved specials, so the embedding matrix has the real shape.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# LLaMA-3 chat-template tokens, present in the base vocabulary like in LLaMA-3 (the Llasa format uses them).
CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BASE_SPECIALS = [BOS, EOS, PAD, *CHAT_TOKENS]
BPE_VOCAB_SIZE = 2048

_CORPUS = """
Convert the text to speech. The quick brown fox jumps over the lazy dog. A journey of a thousand miles
begins with a single step. She sells sea shells by the sea shore, and the shells she sells are surely
sea shells. It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness. Call me Ishmael. Some years ago, never mind how long precisely, having little or no
money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little
and see the watery part of the world. The ship sailed out of the harbour at dawn. We walked along the
beach and collected shells. The lamp on the desk gives a soft light. Please call Stella and ask her to
bring these things with her from the store: six spoons of fresh snow peas, five thick slabs of blue
cheese, and maybe a snack for her brother Bob. When the sunlight strikes raindrops in the air, they act
as a prism and form a rainbow. Then they would swiftly dart at their prey and bear it to the ground.
Hello, how are you today? I am fine, thank you. What time is it? It is half past seven in the evening.
Where are you going? I'm going home. Why did you do that? Because I wanted to! Yes. No. Maybe.
"""
_WORDS = """
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
million first second third point percent Monday Tuesday Wednesday Thursday Friday Saturday Sunday
January February March April May June July August September October November December morning
afternoon evening night today tomorrow yesterday house water school world country people family
government company system program question number point government story young small large great
little important public different between another because through during without against around
however although should would could might about after before under always never often sometimes
speech voice sound music language word sentence letter paper book table window door garden river
mountain forest city street road car train plane boat bird tree flower animal child woman man
friend teacher doctor student mother father sister brother happy sad angry quiet loud slowly quickly
"""


def _train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in (_CORPUS + _WORDS).splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _pad_vocab(tok: Tokenizer, size: int) -> Tokenizer:
    """Grow the BPE vocabulary to `size` with reserved entries no merge can produce."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for i in range(size - next_id):
        vocab[f"<|reserved_{i}|>"] = next_id + i
    return Tokenizer.from_str(json.dumps(data))


def preset_tokenizer(text_vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """The preset text tokenizer; `text_vocab_size` pads the vocabulary (e.g. 128,256 for LLaMA-3)."""
    tok = _train()
    if text_vocab_size is not None:
        if text_vocab_size < tok.get_vocab_size():
            raise ValueError(f"text_vocab_size {text_vocab_size} < trained size {tok.get_vocab_size()}")
        tok = _pad_vocab(tok, text_vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        # Causal LMs take no token_type_ids; generate() rejects them.
        model_input_names=["input_ids", "attention_mask"],
    )
