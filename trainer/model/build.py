"""Build, save and load the SpeechLM: a Hugging Face causal LM whose vocabulary carries audio tokens.

`build_speechlm` takes a LOCAL Hugging Face directory (a text LLM to extend, or an existing SpeechLM
with `speechlm.json`) or a preset name ("tiny" for CPU tests, "small" for the shipped example model,
"small-wide" for its GPU run, "llama-3.2-1b" for the LLaMA-3.2-1B shape), both random-init for presets.
Saved directories are plain HF directories (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) plus `speechlm.json`, loadable by
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and vLLM as they are.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainer import io
from trainer.errors import ConfigError
from trainer.model.preset_tokenizer import PAD, preset_tokenizer
from trainer.model.prompt import FORMATS
from trainer.model.vocab import SPEECHLM_FILE, AudioVocab, audio_token

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64
LLAMA3_TEXT_VOCAB = 128_256
# Above this width the full covariance (d x d, Cholesky O(d^3)) is replaced by its diagonal: it keeps
# building an 8B-class model to seconds on CPU, and new rows are trained from the first steps anyway.
FULL_COVARIANCE_MAX_DIM = 4096


def _tiny_config(vocab_size: int) -> LlamaConfig:
    # 2 heads of 32: vLLM serves no head_dim below 32 (VLLM_HEAD_DIMS).
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def _small_config(vocab_size: int) -> LlamaConfig:
    """~8M parameters: the shipped example SpeechLM (example/models), trained on 2 CPU cores."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192, rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def _small_wide_config(vocab_size: int) -> LlamaConfig:
    """~20M parameters (10 layers x 384): sized for a GPU run (example/gpu_models.sh), whose models come back
    as float16 parts rather than travelling in the checkout; slow on 2 CPU cores."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=384, intermediate_size=1152, num_hidden_layers=10,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def _llama_3_2_1b_config(vocab_size: int) -> LlamaConfig:
    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters` (4.x keeps them as they are); both
    # build the same frequencies (tests/test_model.py).
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


# Head sizes vLLM (0.32) serves on CPU and on GPU alike: its CPU attention's list, all of which
# FlashAttention (multiples of 8 up to 256) and Triton (>= 32) take on GPUs. Every preset uses one.
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def vllm_servable(config: PretrainedConfig) -> str | None:
    """Why vLLM cannot serve a model of this config, or None when it can."""
    size = head_dim(config)
    if size not in VLLM_HEAD_DIMS:
        return (f"its head_dim is {size} (hidden_size {config.hidden_size} / {config.num_attention_heads} heads); "
                f"vLLM serves head_dim {', '.join(map(str, VLLM_HEAD_DIMS))} only")
    return None


# preset -> (text vocabulary rows or None for the trained BPE size, config factory)
PRESETS = {
    "tiny": (None, _tiny_config),
    "small": (None, _small_config),
    "small-wide": (None, _small_wide_config),
    "llama-3.2-1b": (LLAMA3_TEXT_VOCAB, _llama_3_2_1b_config),
}


def padded(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, codebook_size: int, prompt_format: str) -> AudioVocab:
    """Add the pad token (if missing), the format's tags (speech-end last) and `<|s_0|>`...`<|s_{K-1}|>`.

    A tokenizer that already holds a contiguous `<|s_N|>` block (e.g. a Llasa checkpoint) is reused.
    """
    spec = FORMATS[prompt_format]
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    missing_chat = [t for t in spec.chat_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing_chat:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing_chat], special_tokens=True)
    vocab = tokenizer.get_vocab()
    new_tags = [t for t in spec.tags if t not in vocab]
    if new_tags:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new_tags], special_tokens=True)
    if audio_token(0) not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(audio_token(i), special=False, normalized=False) for i in range(codebook_size)]
        )
    vocab = tokenizer.get_vocab()
    offset = vocab[audio_token(0)]
    last = vocab.get(audio_token(codebook_size - 1))
    if last != offset + codebook_size - 1 or audio_token(codebook_size) in vocab:
        raise ConfigError(
            f"the tokenizer's audio tokens are not a contiguous block of {codebook_size} "
            f"(<|s_0|>={offset}, <|s_{codebook_size - 1}|>={last}); codebook_size does not match the model, "
            "or it is an Inworld-trainer model (audio tokens in sorted string order): convert it (`tts-train import`)"
        )
    return AudioVocab(
        audio_offset=offset,
        codebook_size=codebook_size,
        prompt_format=prompt_format,
        special_tokens={t: vocab[t] for t in (*spec.tags, *spec.chat_tokens)},
        speech_start=spec.speech_start,
        speech_end=spec.speech_end,
        end_of_phone=spec.end_of_phone,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=padded(len(tokenizer)),
    )


def sample_like(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` new rows drawn from a normal with the mean and covariance of `rows` (Inworld report §2.2)."""
    old = rows.detach().float().cpu()
    mean = old.mean(0)
    centered = old - mean
    noise = torch.randn(n, old.shape[1], generator=generator)
    if old.shape[1] <= FULL_COVARIANCE_MAX_DIM:
        cov = centered.T @ centered / max(old.shape[0] - 1, 1)
        eye = torch.eye(cov.shape[0])
        chol, info = torch.linalg.cholesky_ex(cov + 1e-6 * cov.diagonal().mean() * eye)
        if info == 0:
            return (mean + noise @ chol.T).to(rows.dtype)
    return (mean + noise * centered.std(0)).to(rows.dtype)


def resize_embeddings(model: PreTrainedModel, vocab: AudioVocab, seed: int) -> None:
    """Grow the input (and untied output) embeddings to `vocab.vocab_size`; new rows ~ N(mean, cov)."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows >= vocab.vocab_size:
        return
    generator = torch.Generator().manual_seed(seed)
    model.resize_token_embeddings(vocab.vocab_size, mean_resizing=False)
    n_new = vocab.vocab_size - old_rows
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old_rows:] = sample_like(emb[:old_rows], n_new, generator).to(emb.device)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[old_rows:] = sample_like(head.weight[:old_rows], n_new, generator).to(head.weight.device)


def set_generation_ids(model: PreTrainedModel, vocab: AudioVocab) -> None:
    """Generation stops at speech-end; pad is the tokenizer's pad."""
    model.config.pad_token_id = vocab.pad_token_id
    model.config.eos_token_id = vocab.speech_end_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = vocab.pad_token_id
        model.generation_config.eos_token_id = vocab.speech_end_id


def preset(
    name: str, codebook_size: int, prompt_format: str = "inworld"
) -> tuple[LlamaConfig, PreTrainedTokenizerBase, AudioVocab]:
    """The model config, extended tokenizer and vocabulary of a preset (no weights allocated)."""
    text_rows, make_config = PRESETS[name]
    tokenizer = preset_tokenizer(text_rows)
    vocab = extend_tokenizer(tokenizer, codebook_size, prompt_format)
    return make_config(vocab.vocab_size), tokenizer, vocab


def build_speechlm(
    model_name: str,
    codebook_size: int,
    prompt_format: str = "inworld",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, AudioVocab]:
    """A SpeechLM from a preset (random init) or a local HF directory (extended unless already one)."""
    if model_name in PRESETS:
        config, tokenizer, vocab = preset(model_name, codebook_size, prompt_format)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        if not io.exists(model_name):
            raise ConfigError(
                f"modeling.parameters.model_name: {model_name!r} is neither a preset "
                f"({', '.join(PRESETS)}) nor an existing local model directory (hub ids are not downloaded)"
            )
        if io.exists(io.join(model_name, SPEECHLM_FILE)):
            model, tokenizer, vocab = load_speechlm(model_name, dtype=dtype)
            if vocab.codebook_size != codebook_size:
                raise ConfigError(
                    f"modeling.parameters.codebook_size is {codebook_size} but {model_name} was built "
                    f"for {vocab.codebook_size} codes"
                )
            return model, tokenizer, vocab
        local = io.download_dir(model_name, tempfile.mkdtemp(prefix="base-model-"))
        tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, torch_dtype=dtype)
        vocab = extend_tokenizer(tokenizer, codebook_size, prompt_format)
        resize_embeddings(model, vocab, seed)
    set_generation_ids(model, vocab)
    return model, tokenizer, vocab


def save_speechlm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    vocab: AudioVocab,
    directory: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a plain HF directory (+ speechlm.json) into the LOCAL `directory`.

    `state_dict` lets sharded strategies pass a gathered full state dict.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The packed attention is a training-time implementation: readers load with their default.
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    finally:
        model.config._attn_implementation = attn
    tokenizer.save_pretrained(directory)
    vocab.save(directory)


def load_speechlm(
    url: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, AudioVocab]:
    """Load a saved SpeechLM directory from a local path or any fsspec URL."""
    if not io.exists(io.join(url, SPEECHLM_FILE)):
        raise ConfigError(f"{url} is not a SpeechLM directory (no {SPEECHLM_FILE})")
    local = io.download_dir(url, tempfile.mkdtemp(prefix="speechlm-"))
    vocab = AudioVocab.load(str(local))
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, torch_dtype=dtype).to(device)
    return model, tokenizer, vocab
