"""TTS input normalisation, chosen by the sample's language (the seed used NeMo per language).

Training and inference must agree on the text the model reads, and the model should read words,
not digits. `normalize_text(text, language)` dispatches on the primary language subtag
("en-GB" -> "en"):

- every language: Unicode canonical composition (NFC), invisible characters dropped, whitespace
  collapsed. Nothing that changes what a reader of that language sees.
- "en": what the seed does for English (ASCII folding: accents and typographic punctuation), then
  numbers spoken the way NeMo's English grammar reads them: currency ("$3.50" -> "three dollars and
  fifty cents"), clock times ("10:30" -> "ten thirty"), ordinals ("21st"), years ("1999" -> "nineteen
  ninety nine"), percentages, decimals, negatives, digit grouping ("1,234").
- de, fr, es, it, pt, nl, ja: numbers in that language's own conventions (decimal comma in the
  European ones, "1.234" = 1234 in German), words from num2words in that language.
- anything else (zh, ko, unknown, ...): only the language-neutral cleanup, as the seed leaves text it
  has no grammar for unchanged. English rules are never applied to another language.

Numbers come from num2words (pure Python, 0.5.14: ~50 languages, one small dependency). NeMo, the
seed's normaliser, needs pynini (a 166 MB native OpenFst wheel for cp311) and builds its grammars at
start-up; its "$3.50" reading is "three dollars fifty cents", ours adds the "and". A numeric token this
module does not understand (e.g. "1.2.3", "3.5" in German) is left as written rather than guessed.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from num2words import num2words

# Invisible or space-like characters, folded in every language.
_SPACES = str.maketrans({"\u200b": "", "\u200c": "", "\u200d": "", "\ufeff": "", "\u00ad": ""})
# English only: typographic punctuation to ASCII (NFKD cannot fold these).
_EN_PUNCT = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2013": "-", "\u2014": " - ", "\u2015": " - ", "\u2212": "-", "\u2010": "-", "\u2011": "-",
        "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    }
)
# More digits than this are read digit by digit (phone numbers, ids), not as one quantity.
MAX_CARDINAL_DIGITS = 9


@dataclass(frozen=True)
class NumberStyle:
    """How one language writes and says numbers."""

    lang: str  # num2words language code
    decimal: str  # decimal separator as written
    groups: str  # thousands separators as written (any of these characters)
    point: str  # the word for the decimal separator
    minus: str
    percent: str
    joiner: str = " "  # between spoken parts ("" for Japanese)
    # Characters a number must not touch to be one ("5kg" is left alone). Japanese writes counters
    # and units right after the digits ("3個"), so only Latin letters and digits count there.
    glued: str = r"\w"


STYLES: dict[str, NumberStyle] = {
    "en": NumberStyle("en", ".", ",", "point", "minus", "percent"),
    "de": NumberStyle("de", ",", ".", "Komma", "minus", "Prozent"),
    # French groups with (narrow) no-break spaces; a plain space is too ambiguous ("1 234" vs "1, 234").
    "fr": NumberStyle("fr", ",", "\u00a0\u202f.", "virgule", "moins", "pour cent"),
    "es": NumberStyle("es", ",", ".", "coma", "menos", "por ciento"),
    "it": NumberStyle("it", ",", ".", "virgola", "meno", "per cento"),
    "pt": NumberStyle("pt", ",", ".", "vírgula", "menos", "por cento"),
    "nl": NumberStyle("nl", ",", ".", "komma", "min", "procent"),
    "ja": NumberStyle("ja", ".", ",", "点", "マイナス", "パーセント", joiner="", glued=r"[A-Za-z0-9]"),
}


def primary_language(language: str | None) -> str:
    """"en-US" / "EN_gb" -> "en"; None or "" -> ""."""
    return re.split(r"[-_]", (language or "").strip().lower())[0]


def normalize_text(text: str, language: str | None) -> str:
    """The text as the TTS model reads it, for a sample in `language` (BCP-47-like tag)."""
    text = unicodedata.normalize("NFC", text).translate(_SPACES)
    lang = primary_language(language)
    if lang == "en":
        text = _english(text)
    elif lang in STYLES:
        text = _numbers(text, STYLES[lang])
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------- numbers, any style
@functools.cache
def _number_token(style: NumberStyle) -> re.Pattern[str]:
    """A numeric token in `style`, not glued to letters or to another digit group; a minus sign only
    where it cannot be a hyphen ("-5", "(-5", not "COVID-19" or "1-2")."""
    group = "[" + re.escape(style.groups) + "]"
    return re.compile(
        rf"(?<!{style.glued})(?<![.,])(?P<sign>-)?(?P<int>\d+(?:{group}\d{{3}})*)"
        rf"(?:{re.escape(style.decimal)}(?P<frac>\d+))?(?!{style.glued}|[.,]\d)"
    )


def _join(style: NumberStyle, *parts: str) -> str:
    return style.joiner.join(p for p in parts if p)


def _cardinal(n: int, style: NumberStyle) -> str:
    words = num2words(n, lang=style.lang)
    return _english_words(words) if style.lang == "en" else words


def _digits(digits: str, style: NumberStyle) -> str:
    return _join(style, *(_cardinal(int(d), style) for d in digits))


def _integer(digits: str, style: NumberStyle) -> str:
    """Cardinal words; leading zeros and very long runs are read digit by digit."""
    if (len(digits) > 1 and digits.startswith("0")) or len(digits) > MAX_CARDINAL_DIGITS:
        return _digits(digits, style)
    return _cardinal(int(digits), style)


def _parse(match: re.Match[str], style: NumberStyle) -> tuple[bool, str, str | None] | None:
    """(negative, integer digits, fraction digits), or None when the grouping is not this style's."""
    whole = match.group("int")
    if any(c in style.groups for c in whole) and not re.fullmatch(r"\d{1,3}(?:\D\d{3})+", whole):
        return None
    return bool(match.groupdict().get("sign")), re.sub(r"\D", "", whole), match.group("frac")


def _say_number(negative: bool, whole: str, frac: str | None, style: NumberStyle) -> str:
    spoken = _integer(whole, style)
    if frac is not None:
        spoken = _join(style, spoken, style.point, _digits(frac, style))
    return _join(style, style.minus if negative else "", spoken)


def _numbers(text: str, style: NumberStyle) -> str:
    """Percentages, then plain numbers, in `style`; unparsable tokens stay as written."""
    token = _number_token(style)

    def percent(m: re.Match[str]) -> str:
        parsed = _parse(m, style)
        return m.group(0) if parsed is None else _join(style, _say_number(*parsed, style), style.percent)

    def plain(m: re.Match[str]) -> str:
        parsed = _parse(m, style)
        return m.group(0) if parsed is None else _say_number(*parsed, style)

    text = re.sub(token.pattern + r"\s?[%％]", percent, text)
    return token.sub(plain, text)


# ---------------------------------------------------------------------------------------- English
_EN = STYLES["en"]
_CURRENCIES = {  # symbol: (unit, units, subunit, subunits)
    "$": ("dollar", "dollars", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "€": ("euro", "euros", "cent", "cents"),
    "¥": ("yen", "yen", "sen", "sen"),
}
_CURRENCY = re.compile(
    r"(?<![\w.,])(?P<neg>-)?(?P<cur>[$£€¥])\s?(?P<int>\d+(?:,\d{3})*)(?:\.(?P<frac>\d+))?"
    r"(?![\w]|[.,]\d)(?:\s?(?P<scale>thousand|million|billion|trillion)\b)?"
)
_AMPM = r"\s?(?P<ampm>[AaPp])\.?\s?[Mm]\b"
_TIME = re.compile(rf"(?<![\w:.,])(?P<h>\d{{1,2}}):(?P<m>\d{{2}})(?:{_AMPM}|(?![\w:]|[.,]\d))")
_HOUR_AMPM = re.compile(rf"(?<![\w:.,])(?P<h>\d{{1,2}}){_AMPM}")
_ORDINAL = re.compile(r"(?<![\w.,])(?P<n>\d{1,3}(?:,\d{3})+|\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
# A bare four-digit number from 1100 to 2099 is read as a year ("in 1999", "2024"): the usual TTS
# reading, and still natural for quantities ("1500 metres" -> "fifteen hundred metres").
_YEAR = re.compile(r"(?<![\w.,-])(?P<y>1[1-9]\d\d|20\d\d)(?![\w%]|[.,:]\d)")


def _english_words(words: str) -> str:
    """num2words' English ("one thousand, two hundred and thirty-four") in NeMo's spoken form without
    the British "and" ("one thousand two hundred thirty four")."""
    return " ".join(w for w in words.replace(",", " ").replace("-", " ").split() if w != "and")


def _currency(m: re.Match[str]) -> str:
    unit, units, sub, subs = _CURRENCIES[m.group("cur")]
    parsed = _parse(m, _EN)
    if parsed is None:
        return m.group(0)
    _, whole, frac = parsed
    minus = "minus " if m.group("neg") else ""
    if m.group("scale") or (frac is not None and len(frac) > 2):  # "$3.5 million": a quantity of dollars
        scale = f" {m.group('scale')}" if m.group("scale") else ""
        return f"{minus}{_say_number(False, whole, frac, _EN)}{scale} {units}"
    amount, cents = int(whole), int((frac or "0").ljust(2, "0"))
    parts = []
    if amount or not cents:
        parts.append(f"{_integer(whole, _EN)} {unit if amount == 1 else units}")
    if cents:
        parts.append(f"{_cardinal(cents, _EN)} {sub if cents == 1 else subs}")
    return minus + " and ".join(parts)


def _ampm(m: re.Match[str]) -> str:
    return f" {m.group('ampm').lower()} m" if m.group("ampm") else ""


def _time(m: re.Match[str]) -> str:
    hour, minute = int(m.group("h")), int(m.group("m"))
    if hour > 23 or minute > 59 or (m.group("ampm") and not 1 <= hour <= 12):
        return m.group(0)
    if minute == 0:
        spoken = _cardinal(hour, _EN) + ("" if m.group("ampm") else " o'clock")
    elif minute < 10:
        spoken = f"{_cardinal(hour, _EN)} oh {_cardinal(minute, _EN)}"
    else:
        spoken = f"{_cardinal(hour, _EN)} {_cardinal(minute, _EN)}"
    return spoken + _ampm(m)


def _hour_ampm(m: re.Match[str]) -> str:
    hour = int(m.group("h"))
    return _cardinal(hour, _EN) + _ampm(m) if 1 <= hour <= 12 else m.group(0)


def _ordinal(m: re.Match[str]) -> str:
    return _english_words(num2words(int(m.group("n").replace(",", "")), lang="en", to="ordinal"))


def _year(m: re.Match[str]) -> str:
    return _english_words(num2words(int(m.group("y")), lang="en", to="year"))


def _ascii_fold(text: str) -> str:
    """The seed ASCII-folds English (unidecode): accents dropped, typographic punctuation to ASCII.
    Non-Latin letters stay (unidecode's transliterations would be read as English words)."""
    text = unicodedata.normalize("NFKD", text.translate(_EN_PUNCT))
    return unicodedata.normalize("NFC", "".join(c for c in text if not unicodedata.combining(c)))


def _english(text: str) -> str:
    text = _ascii_fold(text)
    text = re.sub(r"(?<=\s)&(?=\s)", "and", text)
    text = _CURRENCY.sub(_currency, text)
    text = _TIME.sub(_time, text)
    text = _HOUR_AMPM.sub(_hour_ampm, text)
    text = _ORDINAL.sub(_ordinal, text)
    text = _YEAR.sub(_year, text)
    return _numbers(text, _EN)
