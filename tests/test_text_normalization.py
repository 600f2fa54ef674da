"""TTS text normalisation by the sample's language: English numbers/currency/time, other languages in
their own conventions, English rules never applied elsewhere; and the language reaching the prompts."""

import json

import numpy as np
import pytest
from speechlm_fixtures import write_vectorized

from trainer.data.dataset import PackedData
from trainer.model.build import build_speechlm
from trainer.model.prompt import PromptFormat
from trainer.model.text_normalization import normalize_text, primary_language
from trainer.scoring.asr import error_rate, normalize_for_wer

ENGLISH = [
    ("$3.50", "three dollars and fifty cents"),
    ("It costs $1.", "It costs one dollar."),
    ("$0.99 each", "ninety nine cents each"),
    ("£2.01", "two pounds and one penny"),
    ("€20", "twenty euros"),
    ("$3.5 million", "three point five million dollars"),
    ("-$5", "minus five dollars"),
    ("$1,000,000", "one million dollars"),
    ("10:30", "ten thirty"),
    ("at 10:05 pm.", "at ten oh five p m."),
    ("10:00", "ten o'clock"),
    ("7am", "seven a m"),
    ("23:59", "twenty three fifty nine"),
    ("25:61", "twenty five:sixty one"),  # not a time: each number read as written
    ("1,234", "one thousand two hundred thirty four"),
    ("1,234,567.89", "one million two hundred thirty four thousand five hundred sixty seven point eight nine"),
    ("123456", "one hundred twenty three thousand four hundred fifty six"),
    ("21st", "twenty first"),
    ("the 1st, 2nd, 3rd and 100th", "the first, second, third and one hundredth"),
    ("1999", "nineteen ninety nine"),
    ("in 2005", "in two thousand five"),
    ("2024", "twenty twenty four"),
    ("1900", "nineteen hundred"),
    ("50%", "fifty percent"),
    ("2.5 %", "two point five percent"),
    ("-3%", "minus three percent"),
    ("3.14", "three point one four"),
    ("0.05", "zero point zero five"),
    ("-5 degrees", "minus five degrees"),
    ("(-5)", "(minus five)"),
    ("COVID-19", "COVID-nineteen"),  # a hyphen, not a minus
    ("007", "zero zero seven"),
    ("call 5551234567", "call five five five one two three four five six seven"),
    ("v1.2.3 and 5kg", "v1.2.3 and 5kg"),  # not understood: left as written
    ("A & B", "A and B"),
    ("caf\u00e9 na\u00efve", "cafe naive"),
    ("It\u2019s  the 3rd \u201ctest\u201d \u2014 21 items, 2.5% off.",
     "It's the third \"test\" - twenty one items, two point five percent off."),
]


@pytest.mark.parametrize(("text", "spoken"), ENGLISH)
def test_english_numbers_currency_time(text, spoken):
    assert normalize_text(text, "en") == spoken
    assert normalize_text(spoken, "en") == spoken  # idempotent: prompts may be cleaned twice


OTHER_LANGUAGES = [
    # German: decimal comma, "." groups thousands; "3.5" is no German number and stays as written.
    ("de", "Es kostet 1.234,50 Euro, 3,5 % mehr, -7 Grad, 21 Leute, 3.5",
     "Es kostet eintausendzweihundertvierunddreißig Komma fünf null Euro, drei Komma fünf Prozent mehr, "
     "minus sieben Grad, einundzwanzig Leute, 3.5"),
    ("de-AT", "Ich habe 3 Katzen.", "Ich habe drei Katzen."),
    ("fr", "Il a 1\u202f234 euros, 3,5 % et 80 ans", "Il a mille deux cent trente-quatre euros, trois virgule cinq "
     "pour cent et quatre-vingts ans"),
    ("es", "Tengo 21 años y 3,5 % más", "Tengo veintiuno años y tres coma cinco por ciento más"),
    ("it", "ho 21 anni", "ho ventuno anni"),
    ("pt_BR", "tenho 1.000 reais", "tenho mil reais"),
    ("nl", "ik ben 21", "ik ben eenentwintig"),
    # Japanese: counters follow the digits directly; full-width digits are digits.
    ("ja", "\uff11\uff12\uff13円と3.5パーセント、-5度、50%",
     "百二十三円と三点五パーセント、マイナス五度、五十パーセント"),
    # No grammar here (as in the seed): numbers stay, typographic punctuation stays.
    ("zh", "我有3个苹果\u3002", "我有3个苹果\u3002"),
    ("ko", "사과 3개", "사과 3개"),
    (None, "\u201c21\u201d  items", "\u201c21\u201d items"),
    ("unknown", "$3.50 at 10:30", "$3.50 at 10:30"),
]


@pytest.mark.parametrize(("language", "text", "spoken"), OTHER_LANGUAGES)
def test_other_languages_use_their_own_rules(language, text, spoken):
    assert normalize_text(text, language) == spoken


@pytest.mark.parametrize("language", ["de", "fr", "es", "it", "pt", "nl", "ja", "zh", "ko", "ru", None])
def test_english_rules_never_applied_to_other_languages(language):
    out = normalize_text("Caf\u00e9 \u201c21\u201d: $3.50, 10:30, 1999, 21st, 50%", language)
    english = {"twenty", "one", "dollars", "cents", "ten", "thirty", "nineteen", "first", "percent", "point"}
    assert not english & set(out.replace(",", " ").split())
    assert "\u00e9" in out and "\u201c" in out  # no ASCII folding outside English


def test_language_tags():
    assert [primary_language(t) for t in ("en-US", "EN_gb", " de ", None, "")] == ["en", "en", "de", "", ""]


@pytest.fixture(scope="module")
def fmt():
    _, tokenizer, vocab = build_speechlm("tiny", 64)
    return PromptFormat(tokenizer, vocab)


def test_zero_shot_prompt_normalises_each_text_by_its_language(fmt):
    ids = fmt.inference_prompt("Ich habe 3 Katzen.", "I have 3 cats.", np.array([1, 2]), language="de",
                               ref_language="en")
    assert "I have three cats. Ich habe drei Katzen." in fmt.render(ids)


def test_sft_samples_are_normalised_by_their_own_language(tmp_path, fmt):
    data = write_vectorized(tmp_path / "vec", n_train=4, n_val=2, codebook_size=64)
    samples = data / "train_samples.jsonl"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    records[0].update(transcript="Ich habe 21 Katzen.", language="de")
    records[1].update(transcript="I have 21 cats.", language="en-GB")
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    packed = PackedData({str(data): 1.0}, "train", fmt, max_seq_len=512, pack_length=512, batch_size=1,
                        packing=False, codebook_size=64)
    texts = [fmt.render(packed.collate([[(0, k)]]).input_ids[0].tolist()) for k in (0, 1)]
    assert "Ich habe einundzwanzig Katzen." in texts[0] and "twenty" not in texts[0]
    assert "I have twenty one cats." in texts[1]


def test_wer_compares_spoken_forms():
    # The model was asked to say "three dollars and fifty cents"; an ASR that writes it in words is right.
    assert error_rate("it costs three dollars and fifty cents", "It costs $3.50.", "en") == 0.0
    assert error_rate("es kostet drei euro", "Es kostet 3 Euro.", "de") == 0.0
    assert normalize_for_wer("It's 10:30, OK?", "en") == "its ten thirty ok"
