"""The evaluation report: PNG plots and one self-contained HTML page next to `results.json`.

Plots: training curves (every loss-like and reward-like scalar in the runs' `metrics.jsonl`), a
spectrogram of a synthesised sample beside its ground truth, and score histograms (model vs ground
truth). Audio players point at the WAVs in the output directory, so the folder can be copied whole.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pods and CI have no display
import matplotlib.pyplot as plt
import numpy as np

from trainer.metrics import read_scalars

SCORES = (("wer", "WER / CER (lower is better)"), ("sim", "speaker similarity"), ("dnsmos", "DNSMOS OVRL"))


def _is_reward(key: str) -> bool:
    """Reward values (per function and total), not their timings or spreads."""
    return "reward" in key and not any(part in key for part in ("timing", "seconds", "std", "frac_"))


def plot_curves(metrics_urls: list[str], out: Path) -> bool:
    """Loss and reward curves of the runs that produced the model. False when there is nothing to plot."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"loss": {}, "reward": {}}
    for url in metrics_urls:
        for row in read_scalars(url):
            stage = row.get("stage", Path(url).parent.name)
            for key, value in row.items():
                if key in ("step", "time", "stage") or not isinstance(value, (int, float)):
                    continue
                kind = "loss" if "loss" in key else "reward" if _is_reward(key) else None
                if kind:
                    series[kind].setdefault(f"{stage}/{key}", []).append((int(row["step"]), float(value)))
    panels = [(kind, curves) for kind, curves in series.items() if curves]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (kind, curves) in zip(axes[0], panels, strict=True):
        for name, points in sorted(curves.items()):
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{kind} curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def plot_spectrograms(waves: list[tuple[str, np.ndarray, int]], out: Path) -> None:
    """Log-magnitude STFT spectrograms, one row per (title, wave, sample_rate)."""
    fig, axes = plt.subplots(len(waves), 1, figsize=(10, 2.6 * len(waves)), squeeze=False)
    for ax, (title, wave, sr) in zip(axes[:, 0], waves, strict=True):
        n_fft = 1024 if sr > 16000 else 512
        hop = n_fft // 4
        wave = np.pad(wave, (0, max(0, n_fft - wave.size)))
        frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop] * np.hanning(n_fft)
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        # Floor at -100 dB: digital silence would otherwise be log(0).
        db = 10 * np.log10(np.maximum(power, 1e-10))
        ax.imshow(db.T, origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80,
                  extent=(0, wave.size / sr, 0, sr / 2))
        ax.set_title(title)
        ax.set_ylabel("Hz")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_histograms(items: list[dict[str, Any]], out: Path) -> None:
    fig, axes = plt.subplots(1, len(SCORES), figsize=(5 * len(SCORES), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], SCORES, strict=True):
        for row, color in (("model", "tab:blue"), ("ground_truth", "tab:green")):
            values = [it[row][key] for it in items if it.get(row) and it[row].get(key) is not None]
            if values:
                ax.hist(values, bins=min(20, max(5, len(values))), alpha=0.6, color=color, label=row)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def write_html(results: dict[str, Any], plots: list[str], out: Path) -> None:
    agg = results["aggregate"]
    metric_keys = ["wer", "sim", "dnsmos", "rtf", "duration", "items", "failed"]
    head = "".join(f"<th>{k}</th>" for k in ["row", *metric_keys])
    tables = [("", agg), *((f"voice {s}: ", rows) for s, rows in results.get("by_speaker", {}).items())]
    agg_rows = "".join(
        f"<tr><td>{html.escape(prefix)}{row}</td>"
        + "".join(f"<td>{_fmt(rows[row].get(k))}</td>" for k in metric_keys) + "</tr>"
        for prefix, rows in tables
        for row in ("model", "ground_truth")
        if row in rows
    )
    item_rows = []
    for it in results["items"]:
        cells = [f"<td>{html.escape(it['id'])}</td><td>{html.escape(it['target_text'])}</td>"]
        for row in ("model", "ground_truth"):
            r = it.get(row) or {}
            audio = f'<audio controls preload="none" src="{html.escape(r["wav"])}"></audio>' if r.get("wav") else ""
            hyp = html.escape(r.get("transcript", "") or r.get("error", ""))
            cells.append(
                f"<td>{audio}<br><small>{hyp}</small></td>"
                f"<td>{_fmt(r.get('wer'))}</td><td>{_fmt(r.get('sim'))}</td><td>{_fmt(r.get('dnsmos'))}</td>"
            )
        item_rows.append("<tr>" + "".join(cells) + "</tr>")
    images = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"></figure>' for p in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>TTS evaluation: {html.escape(results["model_path"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}img{{max-width:100%}}</style></head>
<body><h1>TTS evaluation</h1>
<p>model: <code>{html.escape(results["model_path"])}</code>
<br>codec: <code>{html.escape(str(results["codec_path"]))}</code>
<br>ASR: {html.escape(results["asr_backend"])}, speaker: {html.escape(results["speaker_backend"])}</p>
<h2>Aggregate</h2><table><tr>{head}</tr>{agg_rows}</table>
<p>WER is corpus-level (CER for zh/ja/ko); SIM is the cosine similarity of speaker embeddings of the prompt and
the clip; RTF = synthesis seconds / audio seconds.</p>
<h2>Plots</h2>{images}
<h2>Items</h2><table><tr><th>id</th><th>target text</th><th>model</th><th>WER</th><th>SIM</th>
<th>DNSMOS</th><th>ground truth</th><th>WER</th><th>SIM</th><th>DNSMOS</th></tr>{"".join(item_rows)}</table>
</body></html>
"""
    out.write_text(page)
