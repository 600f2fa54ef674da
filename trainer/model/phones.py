"""The phone front end of the `phones` prompt format: English text -> phones (and their timings).

It is Debian's `flite` (CMU lexicon + letter-to-sound rules for any English word, its own number and
abbreviation expansion), called as a program: it reads any text offline, and the same front end
serves vectorize (timings), training and inference, so the phones a model learned are the phones it is
asked for. A G2P from PyPI would need a second front end for the timings of our flite corpus; flite
gives both. Needs `apt-get install flite` (the images install it).

Timings: `flite -psdur` prints each phone with its end time. For audio flite itself spoke (our corpus)
they match the WAV within ~30 ms when the clip is not trimmed; the corpus writes them into the manifest
(`phone_times`). For other audio, `approximate_times` stretches flite's predicted durations to the
clip's length: a rough alignment (pauses and speaking rate differ), good enough to prefill a voice
prompt, weaker than real timings for training (vectorize counts such samples).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from trainer.errors import ConfigError

# flite's US English phone set (cmu_us lexicon + `pau` for silence).
PHONES = (
    "pau", "aa", "ae", "ah", "ao", "aw", "ax", "axr", "ay", "b", "ch", "d", "dh", "eh", "el", "em", "en", "er",
    "ey", "f", "g", "hh", "ih", "iy", "jh", "k", "l", "m", "n", "nx", "ng", "ow", "oy", "p", "r", "s", "sh",
    "t", "th", "uh", "uw", "v", "w", "y", "z", "zh",
)
# The voice whose lexicon and duration model the front end uses: the corpus voice. (flite's voices do not
# all agree on phones: kal's older lexicon reads some vowels differently.) Its ~25 ms per call is why the
# GRPO prompts take phones from the vectorized records.
FRONT_END_VOICE = "rms"
FLITE = "flite"


def phone_token(phone: str) -> str:
    return f"<|ph_{phone}|>"


def token_ids(special_tokens: dict[str, int], phones: Sequence[str] = PHONES) -> list[int]:
    """The vocabulary ids of `phones` (a phone-aligned vocabulary's special tokens)."""
    return [special_tokens[phone_token(p)] for p in phones]


PhoneTimes = list[tuple[str, float]]  # (phone, end time in seconds), in order


def _flite(args: Sequence[str]) -> str:
    if shutil.which(FLITE) is None:
        raise ConfigError("the phones prompt format needs flite (apt-get install flite) for its phone front end")
    done = subprocess.run([FLITE, *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ConfigError(f"flite failed ({done.returncode}): {done.stderr.strip()[:200]}")
    return done.stdout


def parse_psdur(output: str) -> PhoneTimes:
    """`flite -psdur` output ("pau:0.119 hh:0.212 ...") as (phone, end seconds) pairs."""
    times: PhoneTimes = []
    for item in output.split():
        phone, _, end = item.rpartition(":")
        if phone not in PHONES:
            raise ConfigError(f"flite printed a phone outside the phone set: {item!r}")
        times.append((phone, float(end)))
    return times


def phone_times(text: str, voice: str = FRONT_END_VOICE, stretch: float = 1.0, wav_out: str = "none") -> PhoneTimes:
    """flite's phones and end times for `text` (spoken into `wav_out` when given: the same timings)."""
    if not text.strip():
        raise ConfigError("no text to turn into phones")
    args = ["-voice", voice, "-psdur", "--setf", f"duration_stretch={stretch}", "-t", text, "-o", wav_out]
    return parse_psdur(_flite(args))


def phonemize(text: str) -> list[str]:
    """The phones of `text`, silence (`pau`) at both ends and at flite's phrase breaks."""
    return [phone for phone, _ in phone_times(text)]


def approximate_times(text: str, seconds: float) -> PhoneTimes:
    """flite's predicted timings for `text`, stretched to last `seconds`."""
    times = phone_times(text)
    scale = seconds / max(times[-1][1], 1e-6)
    return [(phone, end * scale) for phone, end in times]


def frames_per_phone(times: PhoneTimes, num_frames: int, frame_rate: float) -> list[tuple[str, int]]:
    """Each codec frame goes to the phone whose interval holds the frame's centre; frames past the last
    end time go to the last phone. Phones may get no frame (shorter than a frame)."""
    if not times:
        raise ValueError("no phones")
    counts = [0] * len(times)
    at = 0
    for frame in range(num_frames):
        centre = (frame + 0.5) / frame_rate
        while at < len(times) - 1 and centre >= times[at][1]:
            at += 1
        counts[at] += 1
    return [(phone, n) for (phone, _), n in zip(times, counts, strict=True)]
