"""Prompt formats: the exact token sequence, label masking, zero-shot prompts, code extraction."""

import numpy as np
import pytest

from trainer.model.build import build_speechlm
from trainer.model.prompt import IGNORE_INDEX, PromptFormat


@pytest.fixture(scope="module", params=["inworld", "llasa"])
def fmt(request):
    _, tokenizer, vocab = build_speechlm("tiny", 256, request.param)
    return PromptFormat(tokenizer, vocab)


EXPECTED_TEXT = {
    "inworld": "<|begin_of_text|>Convert the text to speech:<|text_prompt_start|>Hello world.<|text_prompt_end|>\n"
    "<|speech_start|><|s_0|><|s_7|><|s_255|><|speech_end|>",
    "llasa": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nConvert the text to speech:"
    "<|TEXT_UNDERSTANDING_START|>Hello world.<|TEXT_UNDERSTANDING_END|><|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n<|SPEECH_GENERATION_START|><|s_0|><|s_7|><|s_255|><|SPEECH_GENERATION_END|>",
}
# Pinned ids for the tiny preset (its BPE is trained deterministically): a change here is a format change.
EXPECTED_IDS = {
    "inworld": [0, 889, 270, 867, 316, 631, 31, 997, 890, 479, 19, 998, 204, 999, 1001, 1008, 1256, 1000],
    "llasa": [0, 3, 90, 88, 269, 4, 204, 204, 889, 270, 867, 316, 631, 31, 999, 890, 479, 19, 1000, 5, 3,
              299, 88, 311, 588, 89, 4, 204, 204, 1003, 1005, 1012, 1260, 1004],
}


def test_exact_token_sequence(fmt):
    name = fmt.vocab.prompt_format
    ex = fmt.training_example("Hello   world.", np.array([0, 7, 255]))
    assert fmt.render(ex.input_ids) == EXPECTED_TEXT[name]
    assert ex.input_ids.tolist() == EXPECTED_IDS[name]
    # Piecewise assembly equals tokenizing the rendered string.
    assert fmt.tokenizer.encode(EXPECTED_TEXT[name], add_special_tokens=False) == ex.input_ids.tolist()


def test_labels_start_where_the_format_says(fmt):
    ex = fmt.training_example("Hello world.", np.array([3, 4]))
    start = int(np.flatnonzero(ex.input_ids == fmt.vocab.speech_start_id)[0])
    assert (ex.labels[: start + 1] == IGNORE_INDEX).all()
    assert ex.labels[start + 1 :].tolist() == ex.input_ids[start + 1 :].tolist()
    assert ex.labels[-1] == fmt.vocab.speech_end_id
    assert ex.labels[start + 1] == fmt.vocab.audio_offset + 3
    # For the full-vocabulary objective the inworld format labels speech-start, as the seed does.
    full = PromptFormat(fmt.tokenizer, fmt.vocab, label_speech_start=True).training_example("Hello world.", [3, 4])
    first = start if fmt.vocab.prompt_format == "inworld" else start + 1
    assert (full.labels[:first] == IGNORE_INDEX).all()
    assert full.labels[first:].tolist() == full.input_ids[first:].tolist()


def test_audio_tokens_are_contiguous(fmt):
    ids = fmt.tokenizer.convert_tokens_to_ids([f"<|s_{i}|>" for i in range(256)])
    assert ids == list(range(fmt.vocab.audio_offset, fmt.vocab.audio_offset + 256))
    assert fmt.vocab.audio_head_contiguous
    assert fmt.vocab.vocab_size % 64 == 0 and fmt.vocab.vocab_size >= fmt.vocab.audio_end


def test_zero_shot_prompt_prefills_reference(fmt):
    ids = fmt.inference_prompt("second part", ref_text="First part.", ref_codes=np.array([9, 8]))
    text = fmt.render(ids)
    assert "First part. second part" in text
    assert text.endswith(f"{fmt.spec.speech_start}<|s_9|><|s_8|>")
    generated = [*ids.tolist(), fmt.vocab.audio_offset + 5, 3, fmt.vocab.audio_offset + 6, fmt.vocab.speech_end_id,
                 fmt.vocab.audio_offset + 1]
    # codes after the prompt: non-audio ids dropped, stops at speech-end
    assert fmt.codes_from_ids(generated[len(ids):]).tolist() == [5, 6]


def test_codes_out_of_range_rejected(fmt):
    with pytest.raises(ValueError, match="out of range"):
        fmt.training_example("x", np.array([256]))


def test_prompt_text_is_normalised(fmt):
    ids = fmt.prefix_ids("It\u2019s  the 3rd \u201ctest\u201d \u2014 21 items, 2.5% off.")
    assert "It's the third \"test\" - twenty one items, two point five percent off." in fmt.render(ids)


def test_normalisation_can_be_disabled():
    _, tokenizer, vocab = build_speechlm("tiny", 256)
    raw = PromptFormat(tokenizer, vocab, normalize=False)
    # Verbatim, as the seed's no-op normaliser passes it (spacing included).
    assert "<|text_prompt_start|>3   items \n<|text_prompt_end|>" in raw.render(raw.prefix_ids("3   items \n"))
