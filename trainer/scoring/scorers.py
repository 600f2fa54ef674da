"""Batched speech scoring: WER/CER, speaker similarity and DNSMOS of clips (`Scorers`), and their
Seed-TTS-eval-style aggregate. Used by the eval harness and by codec training's held-out check."""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.config import EvalConfig
from trainer.scoring.asr import corpus_error_rate, error_rate, load_transcriber
from trainer.scoring.quality import DNSMOS
from trainer.scoring.speaker import EmbeddingCache, cosine_similarity, load_speaker_encoder


class Scorers:
    """WER/CER, speaker similarity and DNSMOS over batches of clips, loaded once."""

    def __init__(self, cfg: EvalConfig):
        self.asr = load_transcriber(cfg.asr_backend, cfg.asr_model_path)
        self.speaker = load_speaker_encoder(cfg.speaker_backend, cfg.speaker_model_path)
        self.references = EmbeddingCache(self.speaker)
        self.dnsmos = DNSMOS() if cfg.use_dnsmos else None

    def embed_references(self, keys: list[str], clips: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """Speaker embeddings of voice prompts, one row per clip (a prompt shared by items is embedded once),
        batched per sample rate."""
        rows: list[np.ndarray | None] = [None] * len(clips)
        for sr in sorted({sr for _, sr in clips}):
            idx = [i for i, (_, s) in enumerate(clips) if s == sr]
            embedded = self.references.embed([keys[i] for i in idx], [clips[i][0] for i in idx], sr)
            for i, emb in zip(idx, embedded, strict=True):
                rows[i] = emb
        return np.stack(rows)

    def score(
        self,
        clips: list[tuple[np.ndarray, int]],
        prompt_embeddings: np.ndarray,
        texts: list[str],
        languages: list[str],
    ) -> list[dict[str, Any]]:
        """WER/CER, DNSMOS and speaker similarity to the prompt (its embedding row) of each clip."""
        rows: list[dict[str, Any]] = [{} for _ in clips]
        # Scorers take one sample rate per batch: group clips by rate.
        for sr in sorted({sr for _, sr in clips}):
            idx = [i for i, (_, s) in enumerate(clips) if s == sr]
            waves = [clips[i][0] for i in idx]
            hyps = self.asr.transcribe(waves, sr, [languages[i] for i in idx])
            for i, hyp in zip(idx, hyps, strict=True):
                rows[i]["transcript"] = hyp
                rows[i]["wer"] = float(error_rate(hyp, texts[i], languages[i]))
            if self.dnsmos is not None:
                for i, s in zip(idx, self.dnsmos.score(waves, sr), strict=True):
                    ovrl = s.get("ovrl")
                    rows[i]["dnsmos"] = None if ovrl is None or np.isnan(ovrl) else float(ovrl)
            emb = self.speaker.embed(waves, sr)
            for i, cos in zip(idx, cosine_similarity(emb, prompt_embeddings[idx]), strict=True):
                rows[i]["sim"] = None if not clips[i][0].size else float(cos)
        return rows


def aggregate(rows: list[dict[str, Any]], texts: list[str], languages: list[str]) -> dict[str, Any]:
    """Corpus WER/CER and the means of the other scores over the items that did not fail."""
    ok = [r for r in rows if "error" not in r]
    language = languages[0] if len(set(languages)) == 1 else "en"
    return {
        # Corpus-level like Seed-TTS-eval: failed items count with an empty transcript.
        "wer": corpus_error_rate([r.get("transcript", "") for r in rows], texts, language),
        "sim": _mean(ok, "sim"),
        "dnsmos": _mean(ok, "dnsmos"),
        "rtf": _mean(ok, "rtf"),
        "duration": _mean(ok, "duration"),
        "items": len(rows),
        "failed": len(rows) - len(ok),
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None
