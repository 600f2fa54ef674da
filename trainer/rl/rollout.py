"""How completions are sampled: the token constraints that keep them decodable, and where vLLM runs.

Constraints, enforced inside the samplers with stock options (no custom logits processor to ship to a
vLLM server):
- only audio tokens and speech-end may be generated: `suppress_tokens` (HF generate) /
  `allowed_token_ids` (vLLM);
- speech-end is suppressed until `min_completion_length` tokens: `min_new_tokens` (HF, via the
  generation config's eos = speech-end) / `min_tokens` with `stop_token_ids` (vLLM). Stock TRL has no
  `min_completion_length` (the seed passed one that no TRL release accepts); this is how we honour it.
The upper bound is TRL's `max_completion_length`; completions cut there are masked from the loss
(`mask_truncated_completions`) and score 0 in TruncationRewardFunc.

With `use_vllm`, `weight_sync: storage` (the default) samples from a stock vLLM server through the
policy's `generate` (trainer/rl/server_rollouts.py: the same constraints as vLLM sampling parameters,
phone forcing as stop-and-continue rounds). `weight_sync: nccl` is TRL's own server mode (generation over
HTTP + an NCCL weight sync after every optimiser step), whose protocol depends on the TRL release:
- trl 0.x: the `trl vllm-serve` server (TRL's routes; the NCCL group hosted by the server on the group
  port), sent prompt TEXT through `SpeechVLLMClient` below;
- trl 1.x: a stock `vllm serve` (vLLM 0.22-0.31, VLLM_SERVER_DEV_MODE=1, `--weight-transfer-config
  '{"backend": "nccl"}'`; `trl vllm-serve` now only execs that), sent TRL's prompt token ids, the NCCL
  group hosted by the trainer on the group port. The two do not interoperate: the rollout server must
  come with the trainer's TRL.
Host and ports come from `rlhf_training.vllm_server_*`, overridden by
TTS_VLLM_HOST / TTS_VLLM_PORT / TTS_VLLM_GROUP_PORT (set by the controller on the trainer pods).

Prompt text and BOS: trl 0.x tokenises a dataset prompt without special tokens (the rendered prompt
holds its own `<|begin_of_text|>`), but its `trl vllm-serve` client sends the TEXT, which the server
tokenises with special tokens added (vLLM's default): with a tokenizer that adds BOS (LLaMA-3) the prompt
would be sampled after two BOS tokens (cf. TRL issue #3853), so `SpeechVLLMClient` sends the text without
its leading BOS. trl 1.x tokenises the prompt itself WITH special tokens (and sends those ids to the
server), so it is given the text without the leading BOS (`trl_prompt_text`) in every rollout mode.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import trl
from packaging.version import Version
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from trl.import_utils import is_vllm_available

from trainer.config import RlhfConfig
from trainer.errors import ConfigError
from trainer.model.phone_forcing import PhoneForcing
from trainer.model.vocab import AudioVocab

# trl 1.x tokenises dataset prompts with special tokens added and speaks vLLM's own server protocol; trl 0.x
# tokenises them without and speaks `trl vllm-serve`'s (see the module docstring).
TRL_1 = Version(trl.__version__).major >= 1


def hf_generation_kwargs(vocab: AudioVocab, model_vocab_size: int, min_new_tokens: int) -> dict:
    """Extra `GenerationConfig` fields for local rollouts (TRL merges them into its own)."""
    allowed = set(vocab.completion_ids())
    kwargs: dict = {"suppress_tokens": [i for i in range(model_vocab_size) if i not in allowed]}
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    return kwargs


def force_phones(model: PreTrainedModel, forcing: PhoneForcing) -> None:
    """Phone-aligned rollouts: TRL calls `model.generate(**inputs, generation_config=...)`, with no way to
    pass a logits processor, so the policy's own `generate` gets the phone forcing (an instance attribute:
    TRL's rollouts and the guard rails both sample through it)."""
    generate = model.generate

    def forced(*args, **kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), forcing])
        return generate(*args, **kwargs)

    model.generate = forced


def vllm_sampling_kwargs(vocab: AudioVocab, min_tokens: int) -> dict:
    """Extra `SamplingParams` fields sent to the vLLM server with every generate request."""
    return {
        "allowed_token_ids": vocab.completion_ids(),
        "stop_token_ids": [vocab.speech_end_id],
        "min_tokens": min_tokens,
    }


@dataclass(frozen=True)
class VllmServer:
    host: str
    port: int
    group_port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _port(value: str, name: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={port} is outside 1..65535")
    return port


def vllm_server(config: RlhfConfig, environ: Mapping[str, str] = os.environ) -> VllmServer:
    """The rollout server to use: config values, overridden by the TTS_VLLM_* environment."""
    host = environ.get("TTS_VLLM_HOST") or config.vllm_server_host
    port = _port(environ["TTS_VLLM_PORT"], "TTS_VLLM_PORT") if environ.get("TTS_VLLM_PORT") else config.vllm_server_port
    group = (
        _port(environ["TTS_VLLM_GROUP_PORT"], "TTS_VLLM_GROUP_PORT")
        if environ.get("TTS_VLLM_GROUP_PORT")
        else config.vllm_group_port
    )
    if port == group:
        raise ConfigError(f"the vLLM HTTP port and the weight-sync group port are both {port}")
    return VllmServer(host=host, port=port, group_port=group)


def check_weight_sync() -> None:
    """TRL's client syncs weights over an NCCL communicator it imports from vllm: both must be there."""
    if not torch.cuda.is_available() or not is_vllm_available():
        raise ConfigError(
            "rlhf_training.use_vllm needs a CUDA trainer with vllm installed (the weight sync to the "
            "rollout server is an NCCL broadcast); set use_vllm=false for local rollouts"
        )


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenising with special tokens (what vLLM does to a text prompt) prepends BOS."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]


def server_prompt_text(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text that tokenises with special tokens added to the ids of `prompt` (which starts with BOS when the
    tokenizer has one): `prompt` without its leading BOS when the tokenizer adds one."""
    if adds_bos(tokenizer) and prompt.startswith(tokenizer.bos_token):
        return prompt[len(tokenizer.bos_token) :]
    return prompt


def trl_prompt_text(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The dataset prompt to give TRL, so that TRL's tokenisation of it is the policy's prompt ids."""
    return server_prompt_text(prompt, tokenizer) if TRL_1 else prompt


def trl_prompt_ids(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids TRL gives the policy for `prompt` (its text as `trl_prompt_text` makes it)."""
    return tokenizer(trl_prompt_text(prompt, tokenizer), add_special_tokens=TRL_1)["input_ids"]


if TRL_1:
    @contextlib.contextmanager
    def speech_vllm_client(tokenizer: PreTrainedTokenizerBase, group_port: int) -> Iterator[None]:
        """Nothing to replace on trl 1.x: its client sends TRL's prompt ids and takes the group port from
        `GRPOConfig.vllm_group_port` (grpo.grpo_args)."""
        yield
else:
    import trl.trainer.grpo_trainer as grpo_module
    from trl.extras.vllm_client import VLLMClient

    class SpeechVLLMClient(VLLMClient):
        """TRL 0.x's `trl vllm-serve` client, sending each prompt as text the server tokenises to the policy's ids."""

        def __init__(self, *args, tokenizer: PreTrainedTokenizerBase, **kwargs):
            self.tokenizer = tokenizer
            super().__init__(*args, **kwargs)

        def generate(self, prompts: list[str], *args, **kwargs) -> list[list[int]]:
            return super().generate([server_prompt_text(p, self.tokenizer) for p in prompts], *args, **kwargs)

    @contextlib.contextmanager
    def speech_vllm_client(tokenizer: PreTrainedTokenizerBase, group_port: int) -> Iterator[None]:
        """While GRPOTrainer is built, its `VLLMClient` is ours, bound to our group port (TRL 0.21 builds it
        with neither: plain prompt text, always port 51216)."""
        original = grpo_module.VLLMClient
        grpo_module.VLLMClient = functools.partial(SpeechVLLMClient, tokenizer=tokenizer, group_port=group_port)
        try:
            yield
        finally:
            grpo_module.VLLMClient = original
