"""SFT step throughput: our trainer's step vs a seed-style baseline, same model and samples, one run.

    python bench/sft_throughput.py                                   # CPU, tiny preset (< 2 min)
    python bench/sft_throughput.py --preset llama-3.2-1b --device cuda --codebook_size 65536 \
        --pack_length 16384 --rows 1 --attention flex,sdpa          # one baseline, two attention paths

Ours: packed rows, per-sample attention (packed attention backend), loss only at labelled positions
over the audio head, chunked. Baseline (the seed): per-batch right padding, HF forward with SDPA and a
padding mask, full-vocabulary logits, HF loss. Both: AdamW step, same precision. Reported: real
(non-pad) tokens/s, the ratio, peak memory (CUDA) and MFU (CUDA, known GPUs).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from trainer.data.dataset import Batch
from trainer.data.packing import pack_rows
from trainer.model.attention import resolve_backend, use_packed_attention
from trainer.model.build import build_speechlm
from trainer.model.prompt import IGNORE_INDEX
from trainer.train.objective import SpeechLMObjective
from trainer.train.telemetry import FlopCounter, peak_flops


def samples(n: int, codebook: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) with LibriTTS-like lengths: lognormal median 5 s, 1-20 s, 50 codes/s + ~20 text."""
    rng = np.random.default_rng(seed)
    out = []
    for seconds in np.clip(rng.lognormal(np.log(5.0), 0.6, n), 1, 20):
        text = rng.integers(10, 900, int(rng.integers(15, 26)))
        codes = rng.integers(0, codebook, int(seconds * 50))
        out.append((text, codes))
    return out


def formatted(vocab, text, codes):
    ids = np.concatenate([[0], text, [vocab.speech_start_id], codes + vocab.audio_offset, [vocab.speech_end_id]])
    labels = ids.copy()
    labels[: len(text) + 2] = IGNORE_INDEX
    return ids.astype(np.int64), labels.astype(np.int64)


def packed_batches(examples, pack_length, rows_per_batch, pad_id):
    lengths = np.array([len(e[0]) for e in examples])
    rows = pack_rows(lengths[lengths <= pack_length], pack_length)
    for start in range(0, len(rows) - rows_per_batch + 1, rows_per_batch):
        shape = (rows_per_batch, pack_length)
        ids = torch.full(shape, pad_id)
        pos, doc = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        tgt = torch.full(shape, IGNORE_INDEX)
        real = 0
        for r, row in enumerate(rows[start : start + rows_per_batch]):
            at = 0
            for d, i in enumerate(row):
                x, y = examples[i]
                n = len(x)
                ids[r, at : at + n], pos[r, at : at + n] = torch.from_numpy(x), torch.arange(n)
                doc[r, at : at + n], tgt[r, at : at + n - 1] = d, torch.from_numpy(y[1:])
                at += n
            doc[r, at:] = len(row)
            real += at
        yield Batch(ids, pos, doc, tgt, real, 0)


def padded_batches(examples, batch_size, pad_id):
    for start in range(0, len(examples) - batch_size + 1, batch_size):
        chunk = examples[start : start + batch_size]
        length = max(len(x) for x, _ in chunk)
        ids = torch.full((batch_size, length), pad_id)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX)
        for r, (x, y) in enumerate(chunk):
            ids[r, : len(x)], mask[r, : len(x)], labels[r, : len(y)] = torch.from_numpy(x), 1, torch.from_numpy(y)
        yield ids, mask, labels, int(mask.sum())


def timed(step_fn, batches, warmup, steps, device):
    it = iter(batches)
    for _ in range(warmup):
        step_fn(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    real, tick = 0, time.perf_counter()
    for _ in range(steps):
        real += step_fn(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return real / seconds, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codebook_size", type=int, default=4096, help="65536 for the real X-codec2 vocabulary")
    parser.add_argument("--pack_length", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--baseline_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss_vocab", default="audio", choices=["audio", "full"])
    parser.add_argument("--attention", default="auto",
                        help="comma-separated packed-attention backends to time against the one baseline "
                             "(auto, sdpa, flex, flash_attention_2)")
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm, _, vocab = build_speechlm(args.preset, args.codebook_size, seed=0)
    lm.to(device)
    examples = [formatted(vocab, t, c) for t, c in samples(args.samples, args.codebook_size, 0)]
    enabled = dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    real_total = sum(len(x) for x, _ in examples)

    # Baseline first (HF SDPA, padded, full vocabulary).
    lm.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=device.type == "cuda")

    def baseline_step(batch):
        ids, mask, labels, real = (t.to(device) if torch.is_tensor(t) else t for t in batch)
        with autocast:
            loss = lm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real

    base_tps, base_peak, _ = timed(baseline_step, padded_batches(examples, args.baseline_batch, vocab.pad_token_id),
                                   args.warmup, args.steps, device)

    use_packed_attention(lm)
    results = []
    for requested in args.attention.split(","):
        backend = resolve_backend(requested.strip(), device)
        tps, peak_gib, mfu = _time_ours(lm, vocab, backend, opt, autocast, examples, args, device)
        results.append((backend, tps, peak_gib, mfu))
    print(f"model {args.preset} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M params), device {device}, "
          f"{dtype}, loss_vocab {args.loss_vocab}, {len(examples)} samples ({real_total} tokens)")
    print(f"{'variant':<58} {'real tok/s':>11} {'peak GiB':>9}")
    print(f"{'baseline: padded mb' + str(args.baseline_batch) + ', SDPA + pad mask, full-vocab':<58} "
          f"{base_tps:>11.0f} {base_peak:>9.2f}")
    for backend, tps, peak_gib, mfu in results:
        name = f"ours: packed {args.rows}x{args.pack_length}, {backend} per-sample attn, sliced head"
        print(f"{name:<58} {tps:>11.0f} {peak_gib:>9.2f}   MFU {mfu}   ratio {tps / base_tps:.2f}x")


def _time_ours(lm, vocab, backend, opt, autocast, examples, args, device) -> tuple[float, float, str]:
    """Real tokens/s, peak GiB and MFU of our step with one packed-attention backend."""
    objective = SpeechLMObjective(lm, vocab, backend, args.loss_vocab, 4096)
    counter = FlopCounter(lm, args.codebook_size + 1 if args.loss_vocab == "audio" else vocab.vocab_size)
    flops = []

    def our_step(batch: Batch):
        batch = batch.to(device)
        with autocast:
            loss_sum, n = objective(batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts = [torch.bincount(r)[:-1].double() for r in batch.doc_ids.cpu()]
        flops.append(counter.flops(batch.real_tokens, int(n), int(sum(float((c**2).sum()) for c in counts))))
        return batch.real_tokens

    tps, peak_gib, seconds = timed(our_step, packed_batches(examples, args.pack_length, args.rows,
                                                            vocab.pad_token_id), args.warmup, args.steps, device)
    peak = peak_flops(device)
    mfu = f"{100 * sum(flops[args.warmup:]) / seconds / peak:.1f}%" if peak else "n/a"
    return tps, peak_gib, mfu


if __name__ == "__main__":
    main()
