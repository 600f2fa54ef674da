"""A light English text normaliser for TTS prompts (the seed used nemo_text_processing).

It makes training and inference text agree: unicode punctuation folded to ASCII, whitespace
collapsed, small integers (0-9999), ordinals ("3rd"), simple decimals and percentages spelled out.
It is deliberately conservative: anything it does not understand is left as written.
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2013": "-", "\u2014": " - ", "\u2015": " - ", "\u2212": "-", "\u2010": "-", "\u2011": "-",
        "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u200b": "",
    }
)

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}
MAX_SPELLED = 9999


def number_to_words(n: int) -> str:
    """Cardinal words for 0 <= n <= 9999 ("one thousand two hundred five")."""
    if not 0 <= n <= MAX_SPELLED:
        raise ValueError(f"{n} is outside 0..{MAX_SPELLED}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{_ONES[thousands]} thousand" + (f" {number_to_words(rest)}" if rest else "")


def ordinal_to_words(n: int) -> str:
    words = number_to_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split(" ")[-1] else words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def _spell_decimal(match: re.Match[str]) -> str:
    whole, frac = match.group(1), match.group(2)
    return f"{number_to_words(int(whole))} point {' '.join(_ONES[int(d)] for d in frac)}"


def _spell_int(match: re.Match[str]) -> str:
    text = match.group(0).replace(",", "")
    n = int(text)
    return number_to_words(n) if n <= MAX_SPELLED else match.group(0)


def _spell_ordinal(match: re.Match[str]) -> str:
    n = int(match.group(1))
    return ordinal_to_words(n) if n <= MAX_SPELLED else match.group(0)


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", _spell_ordinal, text)
    text = re.sub(r"(\d+(?:\.\d+)?)\s?%", r"\1 percent", text)
    text = re.sub(r"\b(\d{1,4})\.(\d{1,3})\b", _spell_decimal, text)
    text = re.sub(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b", _spell_int, text)
    return re.sub(r"\s+", " ", text).strip()
