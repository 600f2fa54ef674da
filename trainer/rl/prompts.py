"""GRPO prompts from vectorized datasets, built the seed's way.

Prompt k pairs two samples of the same shard: the voice reference is sample i (its transcript and codes
prefilled after speech-start), the text to speak is the transcript of sample i+1 (wrapping inside the
shard), and that transcript is the WER ground truth. `train_weighted_datasets` weights count how often a
dataset's samples are used (as in SFT: 2.0 twice, 0.5 a random half).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from trainer.data.filters import language_allowed
from trainer.data.mixing import epoch_picks
from trainer.data.shards import read_shard, shard_ids
from trainer.errors import ConfigError, StageError
from trainer.model.prompt import PromptFormat
from trainer.rl.rewards.asr import normalize_for_wer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RlPrompt:
    prompt: str  # the prompt text TRL tokenizes (audio tokens spelled <|s_N|>)
    prompt_codes: list[int]  # the reference codes (decoded before the completion for SIM and the decoder)
    reference_key: str  # identifies the reference across steps (caches its audio and embedding)
    reference_text: str
    target_text: str
    language: str  # of the target text (what is spoken and scored)
    reference_language: str


@dataclass(frozen=True)
class _Sample:
    key: str
    text: str
    language: str
    codes: np.ndarray


def _read_shards(dataset_url: str, split: str) -> list[list[_Sample]]:
    """Samples of `split`, grouped by shard (the merged split is one group)."""
    shards = shard_ids(dataset_url, split) or [None]
    groups = []
    for shard in shards:
        try:
            data = read_shard(dataset_url, split, shard)
        except FileNotFoundError as err:
            raise ConfigError(f"{dataset_url}: no {split} split ({err})") from None
        name = f"{dataset_url}/{split}" + ("" if shard is None else f"_{shard}")
        groups.append(
            [
                _Sample(f"{name}#{k}", str(r.get("transcript", "")), str(r.get("language", "en")), data.sample(k))
                for k, r in enumerate(data.records)
            ]
        )
    return groups


def build_prompts(
    datasets: dict[str, float],
    split: str,
    prompt_format: PromptFormat,
    max_prompt_length: int,
    allowed_languages: list[str] | None,
    seed: int,
    limit: int | None = None,
) -> list[RlPrompt]:
    if not datasets:
        raise ConfigError(f"{split}_weighted_datasets is empty: GRPO needs vectorized data for its prompts")
    pools: list[list[RlPrompt]] = []
    skipped = {"single_sample_shard": 0, "language": 0, "empty": 0, "too_long": 0}
    for url in datasets:
        pool = []
        for group in _read_shards(url, split):
            if len(group) < 2:  # no other sample to take the text from
                skipped["single_sample_shard"] += len(group)
                continue
            for i, reference in enumerate(group):
                target = group[(i + 1) % len(group)]
                if not language_allowed(reference.language, allowed_languages):
                    skipped["language"] += 1
                    continue
                if not len(reference.codes) or not normalize_for_wer(target.text, target.language):
                    skipped["empty"] += 1
                    continue
                ids = prompt_format.inference_prompt(
                    target.text, reference.text, reference.codes, target.language, reference.language
                )
                if len(ids) > max_prompt_length:
                    skipped["too_long"] += 1
                    continue
                pool.append(
                    RlPrompt(
                        prompt=prompt_format.render(ids), prompt_codes=[int(c) for c in reference.codes],
                        reference_key=reference.key, reference_text=reference.text, target_text=target.text,
                        language=target.language, reference_language=reference.language,
                    )
                )
        pools.append(pool)
    picks = epoch_picks([len(p) for p in pools], list(datasets.values()), seed, 0)
    prompts = [pools[d][k] for d, k in picks]
    if limit is not None:
        prompts = prompts[:limit]
    log.info("GRPO %s prompts: %d (skipped %s)", split, len(prompts), skipped)
    if not prompts:
        raise StageError(
            f"no usable GRPO prompts in {list(datasets)} ({split}); skipped {skipped} "
            f"(max_prompt_length={max_prompt_length}, allowed_languages={allowed_languages})"
        )
    check_round_trip(prompts[0], prompt_format)
    return prompts


def check_round_trip(prompt: RlPrompt, prompt_format: PromptFormat) -> None:
    """TRL re-tokenizes the prompt text; it must give back exactly the ids the model was trained on."""
    ids = prompt_format.inference_prompt(
        prompt.target_text, prompt.reference_text, np.asarray(prompt.prompt_codes), prompt.language,
        prompt.reference_language,
    )
    again = prompt_format.tokenizer(prompt.prompt, add_special_tokens=False)["input_ids"]
    if list(again) != ids.tolist():
        raise StageError(
            "the tokenizer does not turn the rendered prompt back into the model's prompt ids "
            f"({len(again)} vs {len(ids)} tokens); TRL tokenizes text prompts, so GRPO cannot use this tokenizer"
        )


def as_rows(prompts: list[RlPrompt]) -> list[dict]:
    return [asdict(p) for p in prompts]
