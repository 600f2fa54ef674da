"""Training telemetry: Prometheus metrics (rank 0 serves them), throughput and MFU estimates.

Labels are bounded (`split` only). MFU counts model FLOPs on REAL tokens (padding excluded):
6 x (non-embedding parameters) per token, the head only at labelled positions over the rows the
loss uses, and causal attention 6 x layers x hidden x sum(sample_len^2) (fwd + bwd, causal half).
"""

from __future__ import annotations

import torch
from prometheus_client import Counter, Gauge, Histogram

from trainer.model.prompt import IGNORE_INDEX

TRAIN_LOSS = Gauge("speechlm_train_loss", "Training loss (mean CE over labelled audio tokens) of the last step")
EVAL_LOSS = Gauge("speechlm_eval_loss", "Validation loss of the last evaluation")
TOKENS = Counter("speechlm_train_tokens_total", "Real (non-padding) tokens trained on, all ranks")
STEPS = Counter("speechlm_train_steps_total", "Optimizer steps done")
LEARNING_RATE = Gauge("speechlm_train_learning_rate", "Current learning rate")
STEP_SECONDS = Histogram(
    "speechlm_train_step_duration_seconds", "Wall time of one optimizer step",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
TOKENS_PER_SECOND = Gauge("speechlm_train_tokens_per_second", "Real tokens per second, all ranks")
MFU = Gauge("speechlm_train_mfu", "Model FLOPs utilisation estimate (0-1; 0 when the peak is unknown)")
GRAD_NORM = Gauge("speechlm_train_grad_norm", "Gradient norm before clipping")
SKIPPED = Gauge("speechlm_train_samples_skipped", "Samples skipped for exceeding the row length", ["split"])
PACKING = Gauge("speechlm_train_packing_efficiency", "Fraction of row slots holding real tokens", ["split"])
CHECKPOINT_OK = Gauge(
    "speechlm_checkpoint_last_success_timestamp_seconds", "Unix time of the last published checkpoint"
)
CHECKPOINT_SECONDS = Histogram(
    "speechlm_checkpoint_duration_seconds", "Time to write and publish a checkpoint",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
)

# Dense bf16 peak FLOP/s per device, by name fragment.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class FlopCounter:
    def __init__(self, lm: torch.nn.Module, head_rows: int):
        config = lm.config
        embedding = config.vocab_size * config.hidden_size
        total = sum(p.numel() for p in lm.parameters())
        untied_head = 0 if config.tie_word_embeddings else embedding
        self.body = total - embedding - untied_head
        self.head = head_rows * config.hidden_size
        self.attn = config.num_hidden_layers * config.hidden_size

    def flops(self, real_tokens: int, labelled_tokens: int, sum_sq_lengths: int) -> float:
        return 6.0 * (self.body * real_tokens + self.head * labelled_tokens + self.attn * sum_sq_lengths)


def doc_lengths_sq(doc_ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Sum of length^2 over the samples of a batch (attention work). Padding is told apart as the
    document without labels (every sample has some: its codes and speech-end), so a row filled to the
    last token keeps all its samples."""
    total = 0
    for docs, labels in zip(doc_ids, targets, strict=True):
        lengths = torch.bincount(docs)
        labelled = torch.bincount(docs, weights=(labels != IGNORE_INDEX).double(), minlength=len(lengths))
        total += int((lengths[labelled > 0].double() ** 2).sum())
    return total
