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
from transformers import PreTrainedTokenizerBase

from trainer.config import DatasetConfig
from trainer.data.filters import check_sample
from trainer.data.mixing import epoch_picks
from trainer.data.shards import read_shard, record_phones, shard_ids
from trainer.errors import ConfigError, StageError
from trainer.model.prompt import PromptFormat
from trainer.rl.rollout import TRL_1, server_prompt_text, trl_prompt_ids, trl_prompt_text
from trainer.scoring.asr import normalize_for_wer

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
    phones: list[tuple[str, int]] | None = None  # the phone format's timings (vectorize.phone_alignment)


def _read_shards(
    dataset_url: str, split: str, dataset_filter: DatasetConfig | None, rejected: dict[str, int]
) -> list[list[_Sample]]:
    """Samples of `split` that pass the `dataset` filters, grouped by shard (the merged split is one
    group); rejections are counted into `rejected` by reason."""
    shards = shard_ids(dataset_url, split) or [None]
    groups = []
    for shard in shards:
        try:
            data = read_shard(dataset_url, split, shard)
        except FileNotFoundError as err:
            raise ConfigError(f"{dataset_url}: no {split} split ({err})") from None
        name = f"{dataset_url}/{split}" + ("" if shard is None else f"_{shard}")
        group = []
        for k, r in enumerate(data.records):
            rejection = check_sample(r, dataset_filter) if dataset_filter is not None else None
            if rejection:
                rejected[rejection.reason] = rejected.get(rejection.reason, 0) + 1
                continue
            group.append(_Sample(f"{name}#{k}", str(r.get("transcript", "")), str(r.get("language", "en")),
                                 data.sample(k), record_phones(r)))
        groups.append(group)
    return groups


def build_prompts(
    datasets: dict[str, float],
    split: str,
    prompt_format: PromptFormat,
    max_prompt_length: int,
    dataset_filter: DatasetConfig | None,
    seed: int,
    limit: int | None = None,
    vllm_server: bool = False,
) -> list[RlPrompt]:
    if not datasets:
        raise ConfigError(f"{split}_weighted_datasets is empty: GRPO needs vectorized data for its prompts")
    pools: list[list[RlPrompt]] = []
    first_ids: np.ndarray | None = None
    skipped = {"single_sample_shard": 0, "empty": 0, "too_long": 0}
    rejected: dict[str, int] = {}
    for url in datasets:
        pool = []
        for group in _read_shards(url, split, dataset_filter, rejected):
            if len(group) < 2:  # no other sample to take the text from
                skipped["single_sample_shard"] += len(group)
                continue
            for i, reference in enumerate(group):
                target = group[(i + 1) % len(group)]
                if not len(reference.codes) or not normalize_for_wer(target.text, target.language):
                    skipped["empty"] += 1
                    continue
                ids = prompt_format.inference_prompt(
                    target.text, reference.text, reference.codes, target.language, reference.language,
                    reference.phones, [p for p, _ in target.phones] if target.phones else None,
                )
                if len(ids) > max_prompt_length:
                    skipped["too_long"] += 1
                    continue
                first_ids = ids if first_ids is None else first_ids
                pool.append(
                    RlPrompt(
                        prompt=prompt_format.render(ids), prompt_codes=[int(c) for c in reference.codes],
                        reference_key=reference.key, reference_text=reference.text, target_text=target.text,
                        language=target.language, reference_language=reference.language,
                    )
                )
        pools.append(pool)
    picks = epoch_picks([len(p) for p in pools], list(datasets.values()), seed, 0)
    first = next((pool[0] for pool in pools if pool), None)
    prompts = [pools[d][k] for d, k in picks]
    if limit is not None:
        prompts = prompts[:limit]
    log.info("GRPO %s prompts: %d (skipped %s, rejected by the dataset filters %s)", split, len(prompts), skipped,
             rejected)
    if not prompts:
        raise StageError(
            f"no usable GRPO prompts in {list(datasets)} ({split}); skipped {skipped}, rejected by the dataset "
            f"filters {rejected} (max_prompt_length={max_prompt_length})"
        )
    check_round_trip(first, first_ids, prompt_format, vllm_server)
    return prompts


def check_round_trip(prompt: RlPrompt, ids: np.ndarray, prompt_format: PromptFormat, vllm_server: bool = False
                     ) -> None:
    """The prompt text must tokenise back to exactly its ids, as TRL tokenises it (what the policy is scored
    on, and on trl 1.x also what every rollout samples from) and, for trl 0.x's server rollouts, as a vLLM
    server does (special tokens added, to the text `SpeechVLLMClient` sends: what rollouts are sampled from)."""
    tokenizer = prompt_format.tokenizer
    seen = {"TRL": trl_prompt_ids(prompt.prompt, tokenizer)}
    if vllm_server and not TRL_1:  # trl 1.x sends the server TRL's ids
        seen["the vLLM server"] = tokenizer(server_prompt_text(prompt.prompt, tokenizer),
                                            add_special_tokens=True)["input_ids"]
    for who, again in seen.items():
        if list(again) != ids.tolist():
            raise StageError(
                f"the tokenizer does not turn the rendered prompt back into the model's prompt ids as {who} "
                f"tokenises it ({len(again)} vs {len(ids)} tokens, first {list(again[:3])} vs {ids[:3].tolist()}); "
                "GRPO sends text prompts, so it cannot use this tokenizer"
            )


def as_rows(prompts: list[RlPrompt], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """TRL's dataset rows: the prompt as TRL must be given it (`trl_prompt_text`), the rest for the rewards."""
    return [{**asdict(p), "prompt": trl_prompt_text(p.prompt, tokenizer)} for p in prompts]
