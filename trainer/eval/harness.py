"""`tts-train eval`: a Seed-TTS-eval-style harness that runs offline.

For each test item (prompt wav, prompt text, target text, optional ground-truth target wav) the model
clones the prompt voice and speaks the target text. Both the synthesised clip and the ground truth
are scored with the same scorers the GRPO rewards use (one implementation): WER/CER from an ASR
backend, speaker similarity (cosine of speaker embeddings, prompt vs clip), DNSMOS OVRL, and the
real-time factor of synthesis. Writes `results.json` (per item and aggregate), the WAVs, and
`report.html` with plots.

Given a codec and no SpeechLM (`--codec_model_path` without `--model_path`), it judges the codec
instead: each held-out clip (a manifest or a test list's `target_wav`) is encoded and decoded, and the
copy is scored against its transcript and, for SIM, against the original (`trainer.scoring.resynthesis`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer import io
from trainer.audio import Audio, read_audio, write_wav
from trainer.codec.model import Codec
from trainer.config import EvalConfig, TrainerConfig, section_flags
from trainer.data.manifest import read_json_objects, read_utterances, resolve_wav_path, speaker_of
from trainer.errors import ConfigError
from trainer.eval import report
from trainer.scoring.resynthesis import Clip, resynthesize, score_resynthesis
from trainer.scoring.scorers import Scorers, aggregate

log = logging.getLogger(__name__)

FLAGS = section_flags("eval", "model_path", "codec_model_path", "test_list", "output_dir")
REQUIRED_ITEM_KEYS = ("prompt_wav", "prompt_text", "target_text")


def read_test_list(url: str, max_items: int | None = None) -> list[dict[str, Any]]:
    if not io.exists(url):
        raise ConfigError(f"eval.test_list: {url} does not exist")
    items = []
    for line_no, item in read_json_objects(url):
        missing = [k for k in REQUIRED_ITEM_KEYS if not item.get(k)]
        if missing:
            raise ConfigError(f"{url}:{line_no}: missing {', '.join(missing)}")
        item.setdefault("id", f"item_{line_no:04d}")
        item.setdefault("language", "en")
        for key in ("prompt_wav", "target_wav"):
            if item.get(key):
                item[key] = resolve_wav_path(url, item[key])
        items.append(item)
        if max_items and len(items) >= max_items:
            break
    if not items:
        raise ConfigError(f"eval.test_list: {url} has no items")
    return items


def _output_dir(cfg: EvalConfig) -> Path:
    # Remote output dirs (gs://...) are written locally first and uploaded file by file at the end.
    out_dir = Path(io.local_path(cfg.output_dir) if io.is_local(cfg.output_dir) else tempfile.mkdtemp())
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    return out_dir


def _publish(cfg: EvalConfig, out_dir: Path, results: dict[str, Any], plots: list[str]) -> None:
    io.write_json_atomic(str(out_dir / "results.json"), results)
    report.write_html(results, plots, out_dir / "report.html")
    if not io.is_local(cfg.output_dir):
        for file in sorted(p for p in out_dir.rglob("*") if p.is_file()):
            io.write_bytes_atomic(io.join(cfg.output_dir, file.relative_to(out_dir).as_posix()), file.read_bytes())
    tables = [("", results["aggregate"])]
    tables += [(f"voice {s} ", rows) for s, rows in results.get("by_speaker", {}).items()]
    for prefix, rows in tables:
        for row_name, agg in rows.items():
            log.info(
                "%s%s: WER %.3f  SIM %s  DNSMOS %s  RTF %s  (%d items, %d failed)", prefix, row_name, agg["wer"],
                _maybe(agg.get("sim")), _maybe(agg.get("dnsmos")), _maybe(agg.get("rtf")), agg["items"],
                agg.get("failed", 0),
            )
    print(f"eval report: {out_dir / 'report.html'}\neval results: {out_dir / 'results.json'}")


def run_resynthesis(config: TrainerConfig) -> int:
    """Judge the codec alone: copies (encode -> decode) of held-out speech vs their transcripts."""
    cfg = config.eval
    utterances = read_utterances(cfg.test_list, cfg.max_items)
    out_dir = _output_dir(cfg)
    codec = Codec.load(cfg.codec_model_path)
    start = time.perf_counter()
    originals, copies = resynthesize(codec, utterances)
    elapsed = time.perf_counter() - start
    scorers = Scorers(cfg)
    rows, aggregate_copy = score_resynthesis(scorers, utterances, originals, copies)
    texts, languages = [u.text for u in utterances], [u.language for u in utterances]
    truth = scorers.score(originals, scorers.embed_references([u.wav for u in utterances], originals), texts,
                          languages)
    audio_seconds = sum(len(w) / sr for w, sr in originals)
    items = []
    for u, row, gt, (orig, orig_sr), (copy, copy_sr) in zip(utterances, rows, truth, originals, copies, strict=True):
        row["wav"], row["duration"] = f"audio/{u.id}.wav", len(copy) / copy_sr
        write_wav(str(out_dir / row["wav"]), copy, copy_sr)
        gt["wav"], gt["duration"] = f"audio/{u.id}_gt.wav", len(orig) / orig_sr
        gt["sim"] = None  # the original against itself
        write_wav(str(out_dir / gt["wav"]), orig, orig_sr)
        items.append({"id": u.id, "target_text": u.text, "prompt_text": "", "language": u.language,
                      "speaker_id": u.speaker_id, "model": row, "ground_truth": gt})
    aggregate_copy.update(rtf=elapsed / audio_seconds if audio_seconds else None)
    aggregate_truth = aggregate(truth, texts, languages)
    results: dict[str, Any] = {
        "mode": "resynthesis",
        "model_path": f"codec resynthesis (encode -> decode) of {cfg.test_list}",
        "codec_path": cfg.codec_model_path,
        "asr_backend": cfg.asr_backend,
        "speaker_backend": cfg.speaker_backend,
        "aggregate": {"model": aggregate_copy, "ground_truth": aggregate_truth},
        **_by_speaker(items),
        "items": items,
    }
    report.plot_spectrograms([(f"resynthesis: {utterances[0].text}", *copies[0]), ("original", *originals[0])],
                             out_dir / "spectrogram.png")
    report.plot_histograms(items, out_dir / "histograms.png")
    results["plots"] = ["spectrogram.png", "histograms.png"]
    _publish(cfg, out_dir, results, results["plots"])
    return 0


def run(config: TrainerConfig) -> int:
    cfg = config.eval
    if not cfg.model_path and cfg.codec_model_path and cfg.test_list and cfg.output_dir:
        return run_resynthesis(config)
    for key in ("model_path", "test_list", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"eval.{key} is required (or eval.codec_model_path alone to judge the codec)")
    items = read_test_list(cfg.test_list, cfg.max_items)
    out_dir = _output_dir(cfg)
    prompts, model_clips, model_rows = _synthesize_items(cfg, items, out_dir)

    scorers = Scorers(cfg)
    texts = [it["target_text"] for it in items]
    languages = [it["language"] for it in items]
    # Each prompt is embedded once; the model row and the ground-truth row both compare against it.
    prompt_embeddings = scorers.embed_references([it["prompt_wav"] for it in items],
                                                 [(p.samples, p.sample_rate) for p in prompts])
    model_scores = scorers.score(model_clips, prompt_embeddings, texts, languages)
    for row, scores in zip(model_rows, model_scores, strict=True):
        row.update({k: v for k, v in scores.items() if k not in row})
    gt_rows = _score_ground_truth(scorers, items, prompt_embeddings, out_dir)
    result_items = [{
        "id": it["id"], "target_text": it["target_text"], "prompt_text": it["prompt_text"],
        "language": it["language"], "speaker_id": speaker_of(it), "model": model_rows[i],
        "ground_truth": gt_rows.get(i),
    } for i, it in enumerate(items)]
    results: dict[str, Any] = {
        "model_path": cfg.model_path,
        "codec_path": cfg.codec_model_path,
        "asr_backend": cfg.asr_backend,
        "speaker_backend": cfg.speaker_backend,
        "aggregate": _aggregates(result_items),
        **_by_speaker(result_items),
        "items": result_items,
    }
    results["plots"] = _plot(cfg, items, model_clips, gt_rows, results["items"], out_dir)
    _publish(cfg, out_dir, results, results["plots"])
    return 0


def _aggregates(result_items: list[dict[str, Any]]) -> dict[str, Any]:
    """The model row and (over the items that have one) the ground-truth row of these result items."""
    rows = {"model": aggregate([it["model"] for it in result_items], [it["target_text"] for it in result_items],
                               [it["language"] for it in result_items])}
    with_truth = [it for it in result_items if it["ground_truth"]]
    if with_truth:
        rows["ground_truth"] = aggregate([it["ground_truth"] for it in with_truth],
                                         [it["target_text"] for it in with_truth],
                                         [it["language"] for it in with_truth])
    return rows


def _by_speaker(result_items: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"by_speaker": {voice: aggregates}}` for a multi-voice list (items naming their `speaker_id`), else {}:
    one voice that does not clone or speak hides in the mean."""
    speakers = sorted({it["speaker_id"] for it in result_items if it["speaker_id"] is not None})
    if not speakers:
        return {}
    return {"by_speaker": {s: _aggregates([it for it in result_items if it["speaker_id"] == s]) for s in speakers}}


def _synthesize_items(
    cfg: EvalConfig, items: list[dict[str, Any]], out_dir: Path
) -> tuple[list[Audio], list[Clip], list[dict[str, Any]]]:
    """(prompts, synthesised clips, per-item rows with duration, RTF, wav or error), WAVs written."""
    # lazy: the SpeechLM stack (transformers models) is not needed to judge a codec alone (run_resynthesis)
    from trainer.serve.synthesize import Synthesizer

    synth = Synthesizer.load(cfg.model_path, codec_path=cfg.codec_model_path)
    prompts = [read_audio(it["prompt_wav"]) for it in items]
    clips: list[Clip] = []
    rows: list[dict[str, Any]] = []
    for it, prompt in zip(items, prompts, strict=True):
        row: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            wave, sr = synth.synthesize(
                it["target_text"], prompt.samples, prompt.sample_rate, it["prompt_text"], cfg.sampling,
                it["language"],
            )
        except Exception as err:  # one bad item must not lose the whole evaluation
            log.warning("item %s: synthesis failed: %s", it["id"], err)
            wave, sr = np.zeros(0, np.float32), synth.sample_rate
            row["error"] = f"{type(err).__name__}: {err}"
        elapsed = time.perf_counter() - start
        duration = wave.size / sr
        row.update(duration=duration, rtf=elapsed / duration if duration else None)
        if wave.size:
            row["wav"] = f"audio/{it['id']}.wav"
            write_wav(str(out_dir / row["wav"]), wave, sr)
        clips.append((wave, sr))
        rows.append(row)
        log.info("eval %s: %.2f s of audio in %.2f s", it["id"], duration, elapsed)
    return prompts, clips, rows


def _score_ground_truth(scorers: Scorers, items: list[dict[str, Any]], prompt_embeddings: np.ndarray,
                        out_dir: Path) -> dict[int, dict[str, Any]]:
    """Item index -> scores of its ground-truth `target_wav` (items that have one), WAVs copied."""
    gt_idx = [i for i, it in enumerate(items) if it.get("target_wav")]
    if not gt_idx:
        return {}
    gt_audio = [read_audio(items[i]["target_wav"]) for i in gt_idx]
    gt_scores = scorers.score(
        [(a.samples, a.sample_rate) for a in gt_audio],
        prompt_embeddings[gt_idx],
        [items[i]["target_text"] for i in gt_idx],
        [items[i]["language"] for i in gt_idx],
    )
    gt_rows: dict[int, dict[str, Any]] = {}
    for i, audio, scores in zip(gt_idx, gt_audio, gt_scores, strict=True):
        gt_rows[i] = {**scores, "duration": audio.duration, "wav": f"audio/{items[i]['id']}_gt.wav"}
        write_wav(str(out_dir / gt_rows[i]["wav"]), audio.samples, audio.sample_rate)
    return gt_rows


def _plot(cfg: EvalConfig, items: list[dict[str, Any]], model_clips: list[Clip], gt_rows: dict[int, dict[str, Any]],
          result_items: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Training curves, a spectrogram of the first synthesised clip (beside its ground truth) and score
    histograms: the file names of the plots written."""
    plots = []
    if report.plot_curves([io.join(d, "metrics.jsonl") for d in cfg.metrics_dirs], out_dir / "curves.png"):
        plots.append("curves.png")
    first = next((i for i, (w, _) in enumerate(model_clips) if w.size), None)
    if first is not None:
        spectra = [(f"model: {items[first]['target_text']}", *model_clips[first])]
        if first in gt_rows:
            gt = read_audio(items[first]["target_wav"])
            spectra.append(("ground truth", gt.samples, gt.sample_rate))
        report.plot_spectrograms(spectra, out_dir / "spectrogram.png")
        plots.append("spectrogram.png")
    report.plot_histograms(result_items, out_dir / "histograms.png")
    plots.append("histograms.png")
    return plots


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
