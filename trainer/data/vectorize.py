"""`tts-train vectorize`: encode a speech manifest into code shards (resumable, one process per GPU).

Work is cut into units: unit `i` is manifest lines [i*S+1, (i+1)*S] (S = `vectorize.samples_per_shard`),
and rank r of W takes the units with i % W == r, so ranks never share a line and shard names do not
depend on the world size. A unit writes `train_*_{i}`, `val_*_{i}` and `rejects_{i}.jsonl`, then its
`_done_{i}.json` marker, last and atomically: a re-run skips marked units and redoes any other from
scratch, so a crash (even kill -9) neither loses nor duplicates a line. Ranks never wait for each
other (a data job's ranks can be hours apart, longer than any collective timeout): whichever finishes
with every marker present writes `vectorize_summary.json`.

Every non-blank manifest line ends in exactly one samples file or rejects file, with its line number.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge
from tqdm import tqdm

from trainer import distributed, io, metrics
from trainer.audio import Audio, AudioError, read_audio
from trainer.codec import Codec
from trainer.config import TrainerConfig
from trainer.data import filters, shards
from trainer.data.manifest import LineError, parse_line, read_lines, resolve_wav_path, sample_id
from trainer.errors import ConfigError, StageError
from trainer.model import phones as front_end

log = logging.getLogger(__name__)

# The seed's --dry_run takes batch_size x world_size x 50 samples.
DRY_RUN_BATCHES = 50

FLAGS = {
    "codec_model_path": "vectorize.codec_model_path",
    "batch_size": "vectorize.batch_size",
    "dataset_path": "vectorize.dataset_path",
    "output_dir": "vectorize.output_dir",
    "run_name": "vectorize.run_name",
    "use_wandb": "vectorize.use_wandb",
    "val_split": "vectorize.val_fraction",
    "num_workers": "vectorize.num_workers",
    "dry_run": "dry_run",
    "compile_model": "vectorize.compile_model",
}
NOTED_FLAGS = {
    "val_split": (
        "the fraction goes to val as in the seed, but val samples are those whose id hashes below it "
        "(stable across resumes, ranks and shard sizes), not the last samples of each rank"
    ),
    "num_workers": "threads that read and decode audio ahead of the codec (the seed: DataLoader processes)",
    "dry_run": (
        f"vectorizes only the first batch_size x world_size x {DRY_RUN_BATCHES} manifest lines into output_dir "
        "(the seed counts samples that pass its text filters); resuming that directory without --dry_run is refused"
    ),
}

SUMMARY = "vectorize_summary.json"
MARKER_PATTERN = re.compile(r"^_done_(\d+)\.json$")

ITEMS = Counter("speechlm_vectorize_items", "Manifest lines processed, by outcome", ["status"])
REJECTS = Counter("speechlm_vectorize_rejects", "Rejected manifest lines, by reason", ["reason"])
AUDIO_SECONDS = Counter("speechlm_vectorize_audio_seconds", "Seconds of accepted audio encoded")
UNITS = Counter("speechlm_vectorize_units", "Work units (manifest line blocks), by outcome", ["status"])


def marker_name(unit: int) -> str:
    return f"_done_{unit}.json"


def rejects_name(unit: int) -> str:
    return f"rejects_{unit}.jsonl"


def split_of(record: dict[str, Any], val_fraction: float) -> str:
    """Deterministic split from a hash of the sample id: same answer on every rank and every run."""
    digest = hashlib.sha1(sample_id(record).encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclass
class Unit:
    index: int
    lines: list[tuple[int, str]]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for line_no, text in self.lines:
            h.update(f"{line_no}\t{text}\n".encode())
        return h.hexdigest()


def iter_units(
    manifest_url: str, size: int, keep: Callable[[int], bool], max_lines: int | None = None
) -> Iterator[Unit | int]:
    """Stream the manifest (its first `max_lines` lines when given) in blocks of `size` lines. Units
    for which `keep(index)` is False are not held in memory: their index alone is yielded, so the
    caller still learns how many units exist."""
    index, lines, last_line = 0, [], 0
    for line_no, text in itertools.islice(read_lines(manifest_url), max_lines):
        last_line = line_no
        if keep(index):
            lines.append((line_no, text))
        if line_no % size == 0:
            yield Unit(index, lines) if keep(index) else index
            index, lines = index + 1, []
    if last_line > index * size:
        yield Unit(index, lines) if keep(index) else index


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], read: Callable[[T], R], workers: int, depth: int) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in input order, with up to `depth` reads in flight on `workers` threads.
    Decoding audio (libsndfile, soxr) releases the GIL, so threads overlap it with the codec."""
    if workers == 0:
        for item in items:
            yield item, read(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="audio-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(read, item)))
            if len(pending) >= depth:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


@dataclass
class Candidate:
    line: int
    raw: str
    record: dict[str, Any]
    wav_url: str
    split: str


@dataclass
class UnitResult:
    """What one unit produced; its counts become the unit's marker."""

    samples: dict[str, list[tuple[dict[str, Any], np.ndarray]]] = field(
        default_factory=lambda: {s: [] for s in shards.SPLITS}
    )
    rejects: list[dict[str, Any]] = field(default_factory=list)
    blank_lines: int = 0

    def reject(self, line: int, raw: str, reason: str, detail: str) -> None:
        self.rejects.append({"line": line, "reason": reason, "detail": detail, "raw": raw})
        REJECTS.labels(reason).inc()
        ITEMS.labels("rejected").inc()

    def note_counts(self) -> dict[str, int]:
        """Accepted samples per note kind ("duration_mismatch", "downmixed", ...)."""
        kinds = Tally(
            note.split(":", 1)[0]
            for split_samples in self.samples.values()
            for record, _ in split_samples
            for note in record.get("notes", [])
        )
        return dict(sorted(kinds.items()))


class Progress:
    """Rank 0's progress bar: audio hours encoded, audio hours per second, lines accepted/rejected."""

    def __init__(self, enabled: bool):
        self.bar = tqdm(
            desc="vectorize", disable=not enabled, bar_format="{desc}: {n:.3f} audio h [{elapsed}{postfix}]"
        )
        self.start = time.monotonic()
        self.accepted = 0
        self.rejected = 0

    def update(self, audio_seconds: float = 0.0, accepted: int = 0, rejected: int = 0) -> None:
        self.accepted += accepted
        self.rejected += rejected
        hours = self.bar.n + audio_seconds / 3600
        rate = hours / max(time.monotonic() - self.start, 1e-6)
        self.bar.set_postfix_str(
            f"{rate:.4f} audio h/s, accepted {self.accepted}, rejected {self.rejected}", refresh=False
        )
        self.bar.update(audio_seconds / 3600)

    def close(self) -> None:
        self.bar.close()


class Vectorizer:
    def __init__(self, config: TrainerConfig, codec: Any, output_dir: str, progress: Progress):
        self.config = config
        self.vcfg = config.vectorize
        self.codec = codec
        self.output_dir = output_dir
        self.progress = progress
        self.manifest_url = str(config.vectorize.dataset_path)

    # -------------------------------------------------------------------------------------- unit
    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Process one unit and commit it; returns its marker."""
        self._remove_stale_temporaries(unit.index)
        result = UnitResult()
        candidates = self._screen(unit, result)
        window: list[tuple[Candidate, Audio, list[str]]] = []
        reads = read_ahead(candidates, self._read, self.vcfg.num_workers, self.vcfg.sort_window)
        for candidate, audio in reads:
            if isinstance(audio, AudioError):
                result.reject(candidate.line, candidate.raw, audio.reason, str(audio))
                continue
            rejection = filters.check_audio(
                candidate.record["transcript"], audio.duration, audio.sample_rate, self.config.dataset
            )
            if rejection:
                result.reject(candidate.line, candidate.raw, rejection.reason, rejection.detail)
                continue
            notes = filters.declared_mismatch_notes(
                candidate.record, audio.duration, audio.sample_rate, audio.channels, self.config.dataset
            )
            window.append((candidate, audio, notes))
            if len(window) >= self.vcfg.sort_window:
                self._encode(window, result)
                window = []
        self._encode(window, result)
        return self._commit(unit, result)

    def _screen(self, unit: Unit, result: UnitResult) -> list[Candidate]:
        """Checks that need no audio: JSON, required fields, transcript, language, DNSMOS."""
        candidates = []
        for line_no, text in unit.lines:
            if not text.strip():
                result.blank_lines += 1
                continue
            parsed = parse_line(text)
            if isinstance(parsed, LineError):
                result.reject(line_no, text, parsed.reason, parsed.detail)
                continue
            rejection = filters.check_record(parsed, self.config.dataset)
            if rejection:
                result.reject(line_no, text, rejection.reason, rejection.detail)
                continue
            wav_url = resolve_wav_path(self.manifest_url, parsed["wav_path"])
            split = split_of(parsed, self.vcfg.val_fraction)
            candidates.append(Candidate(line_no, text, parsed, wav_url, split))
        return candidates

    @staticmethod
    def _read(candidate: Candidate) -> Audio | AudioError:
        try:
            return read_audio(candidate.wav_url)
        except AudioError as err:
            return err

    def _encode(self, window: list[tuple[Candidate, Audio, list[str]]], result: UnitResult) -> None:
        """Encode a window of clips; the codec sorts them by length into batches that pad little."""
        if not window:
            return
        codes = self.codec.encode(
            [audio.samples for _, audio, _ in window],
            [audio.sample_rate for _, audio, _ in window],
            batch_size=self.vcfg.batch_size,
        )
        accepted = 0
        for (candidate, audio, notes), item_codes in zip(window, codes, strict=True):
            if self.vcfg.phone_alignment:
                try:
                    phones, approximate = self._phones(candidate.record, audio.duration, len(item_codes))
                except (ConfigError, ValueError, TypeError) as err:
                    result.reject(candidate.line, candidate.raw, "bad_phone_times", str(err))
                    continue
                candidate.record["phones"] = phones
                notes = [*notes, "approximate_phone_times"] if approximate else notes
            accepted += 1
            record = {
                **candidate.record,
                "duration": round(audio.duration, 6),
                "sample_rate": audio.sample_rate,
                "line": candidate.line,
                "resolved_wav_path": candidate.wav_url,
                "num_codes": len(item_codes),
            }
            if notes:
                record["notes"] = notes
            result.samples[candidate.split].append((record, np.asarray(item_codes)))
        seconds = sum(audio.duration for _, audio, _ in window)
        ITEMS.labels("accepted").inc(accepted)
        AUDIO_SECONDS.inc(seconds)
        self.progress.update(seconds, accepted=accepted)

    def _phones(self, record: dict[str, Any], seconds: float, num_frames: int) -> tuple[list[list], bool]:
        """The sample's [phone, frames] list and whether its timings are flite's estimate, not the clip's."""
        given = record.get("phone_times")
        if given is None:
            times, approximate = front_end.approximate_times(str(record["transcript"]), seconds), True
        else:
            times = [(str(phone), float(end)) for phone, end in given]
            unknown = sorted({p for p, _ in times} - set(front_end.PHONES))
            if not times or unknown:
                raise ValueError(f"phone_times: empty or phones outside flite's set: {unknown}")
            if any(b < a for (_, a), (_, b) in itertools.pairwise(times)):
                raise ValueError("phone_times: end times must not decrease")
            approximate = False
        frames = front_end.frames_per_phone(times, num_frames, float(self.codec.token_rate))
        return [[phone, n] for phone, n in frames], approximate

    def _remove_stale_temporaries(self, unit: int) -> None:
        """Temporary files a killed run left for this unit (local filesystems only have them)."""
        if io.is_local(self.output_dir):
            for url in io.glob(self.output_dir, f"*_{unit}.*.tmp-*"):
                io.remove(url)

    def _commit(self, unit: Unit, result: UnitResult) -> dict[str, Any]:
        """Write the unit's files, then its marker last: a unit without a marker is redone whole."""
        marker: dict[str, Any] = {
            "unit": unit.index,
            "first_line": unit.lines[0][0],
            "last_line": unit.lines[-1][0],
            "lines_sha1": unit.fingerprint,
            "accepted": {},
            "audio_seconds": {},
            "rejected": dict(sorted(Tally(r["reason"] for r in result.rejects).items())),
            "blank_lines": result.blank_lines,
            "notes": result.note_counts(),
        }
        for split in shards.SPLITS:
            samples = sorted(result.samples[split], key=lambda sample: sample[0]["line"])
            records = [record for record, _ in samples]
            shards.write_shard(self.output_dir, split, unit.index, [codes for _, codes in samples], records)
            marker["accepted"][split] = len(records)
            marker["audio_seconds"][split] = round(sum(r["duration"] for r in records), 6)
        rejects = sorted(result.rejects, key=lambda r: r["line"])
        io.write_bytes_atomic(io.join(self.output_dir, rejects_name(unit.index)), shards.jsonl_bytes(rejects))
        io.write_json_atomic(io.join(self.output_dir, marker_name(unit.index)), marker)
        UNITS.labels("done").inc()
        return marker


# ------------------------------------------------------------------------------------------ summary
def summarize(markers: list[dict[str, Any]], manifest_url: str) -> dict[str, Any]:
    accepted = {s: sum(m["accepted"][s] for m in markers) for s in shards.SPLITS}
    seconds = {s: sum(m["audio_seconds"][s] for m in markers) for s in shards.SPLITS}
    by_reason: Tally[str] = Tally()
    notes: Tally[str] = Tally()
    for m in markers:
        by_reason.update(m["rejected"])
        notes.update(m["notes"])
    rejected = sum(by_reason.values())
    records = sum(accepted.values()) + rejected
    hours = {s: round(v / 3600, 6) for s, v in seconds.items()}
    return {
        "manifest": manifest_url,
        "units": len(markers),
        "lines": max((m["last_line"] for m in markers), default=0),
        "blank_lines": sum(m["blank_lines"] for m in markers),
        "accepted": {**accepted, "total": sum(accepted.values())},
        "rejected": {"total": rejected, "by_reason": dict(sorted(by_reason.items()))},
        "reject_fraction": round(rejected / records, 6) if records else 0.0,
        "audio_hours": {**hours, "total": round(sum(seconds.values()) / 3600, 6)},
        "notes": dict(sorted(notes.items())),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"vectorize summary for {summary['manifest']}",
        f"  accepted: {summary['accepted']['total']} (train {summary['accepted']['train']}, "
        f"val {summary['accepted']['val']}), {summary['audio_hours']['total']:.3f} audio hours",
        f"  rejected: {summary['rejected']['total']} ({summary['reject_fraction']:.1%})",
    ]
    lines += [f"    {reason}: {n}" for reason, n in summary["rejected"]["by_reason"].items()]
    if summary["notes"]:
        lines.append("  accepted with notes: " + ", ".join(f"{k} {v}" for k, v in summary["notes"].items()))
    return "\n".join(lines)


def read_markers(output_dir: str, units: int) -> list[dict[str, Any]] | None:
    """All unit markers in unit order, or None while any unit is unfinished."""
    names = {name for name in io.listdir(output_dir) if MARKER_PATTERN.match(name)}
    wanted = [marker_name(i) for i in range(units)]
    if not set(wanted) <= names:
        return None
    fs, root = io.filesystem(output_dir)
    paths = [f"{root.rstrip('/')}/{name}" for name in wanted]
    contents = fs.cat(paths) if paths else {}
    return [json.loads(contents[p]) for p in paths]


def push_summary(summary: dict[str, Any], gateway_url: str | None, run_name: str) -> None:
    """Batch jobs can end between scrapes: push the outcome once (Prometheus' advice for batch jobs)."""
    if not gateway_url:
        return
    registry = CollectorRegistry()
    items = Gauge("speechlm_vectorize_summary_items", "Manifest lines by outcome", ["status"], registry=registry)
    items.labels("accepted").set(summary["accepted"]["total"])
    items.labels("rejected").set(summary["rejected"]["total"])
    rejects = Gauge("speechlm_vectorize_summary_rejects", "Rejected lines by reason", ["reason"], registry=registry)
    for reason, n in summary["rejected"]["by_reason"].items():
        rejects.labels(reason).set(n)
    Gauge("speechlm_vectorize_summary_audio_seconds", "Accepted audio", registry=registry).set(
        summary["audio_hours"]["total"] * 3600
    )
    Gauge("speechlm_vectorize_last_success_timestamp_seconds", "End of the last complete run", registry=registry).set(
        time.time()
    )
    metrics.push(gateway_url, job=f"vectorize-{run_name}", registry=registry)


# ---------------------------------------------------------------------------------------------- run
def dry_run_lines(config: TrainerConfig, world_size: int) -> int | None:
    v = config.vectorize
    return v.batch_size * world_size * DRY_RUN_BATCHES if config.dry_run else None


def dataset_info(config: TrainerConfig, codec: Any, max_lines: int | None = None) -> dict[str, Any]:
    v = config.vectorize
    info = {
        "codebook_size": int(codec.codebook_size),
        "token_rate": int(codec.token_rate),
        "codec_model_path": v.codec_model_path,
        "codes_dtype": np.dtype(shards.CODES_DTYPE).name,
        "manifest": v.dataset_path,
        "samples_per_shard": v.samples_per_shard,
        "val_fraction": v.val_fraction,
        "filters": config.dataset.model_dump(mode="json"),
    }
    if v.phone_alignment:  # only then, so directories written before this key still resume
        info["phone_alignment"] = True
    if max_lines is not None:  # only then, so directories written before this key still resume
        info["dry_run_lines"] = max_lines
    return info


def claim_output_dir(output_dir: str, info: dict[str, Any]) -> None:
    """Write dataset_info.json, or check that an earlier run of this directory used the same settings:
    resuming with another codec, manifest, shard size or filters would mix incompatible shards."""
    url = io.join(output_dir, shards.DATASET_INFO)
    if io.exists(url):
        previous = io.read_json(url)
        changed = [k for k in {**previous, **info} if previous.get(k) != info.get(k)]
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {info.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{output_dir} holds a vectorize run with other settings ({details}); "
                "use a new output_dir or restore the settings to resume"
            )
        return
    io.write_json_atomic(url, info)


def load_codec(path: str, compile_model: bool = False) -> Any:
    codec = Codec.load(path, device=distributed.device(), components=("encoder",))
    if compile_model:
        # The whole encoder forward (acoustic encoder, semantic adapter, FSQ), as the seed compiles
        # its encoder; dynamic, as every length bucket has its own shape.
        codec.encode_tensor = torch.compile(codec.encode_tensor, dynamic=True)
    return codec


def run(config: TrainerConfig) -> int:
    v = config.vectorize
    for key in ("codec_model_path", "dataset_path", "output_dir"):
        if not getattr(v, key):
            raise ConfigError(f"vectorize.{key} is required (flag --{key})")
    if not io.exists(v.dataset_path):
        raise ConfigError(f"manifest not found: {v.dataset_path}")
    if v.use_wandb:
        log.warning("--use_wandb is accepted for compatibility; vectorize reports via Prometheus and %s", SUMMARY)
    rank, world = distributed.rank(), distributed.world_size()
    metrics.serve(config.metrics.port, config.metrics.address)

    codec = load_codec(v.codec_model_path, v.compile_model)
    output_dir = str(v.output_dir)
    io.makedirs(output_dir)
    max_lines = dry_run_lines(config, world)
    claim_output_dir(output_dir, dataset_info(config, codec, max_lines))

    progress = Progress(enabled=rank == 0)
    vectorizer = Vectorizer(config, codec, output_dir, progress)
    units = 0
    if max_lines is not None:
        log.info("dry run: vectorizing the first %d manifest lines only", max_lines)
    for unit in iter_units(v.dataset_path, v.samples_per_shard, keep=lambda i: i % world == rank, max_lines=max_lines):
        units += 1
        if not isinstance(unit, Unit):
            continue
        marker_url = io.join(output_dir, marker_name(unit.index))
        if io.exists(marker_url):
            if io.read_json(marker_url)["lines_sha1"] != unit.fingerprint:
                raise StageError(
                    f"manifest lines {unit.lines[0][0]}-{unit.lines[-1][0]} changed since unit {unit.index} "
                    f"was vectorized into {output_dir}; use a new output_dir"
                )
            UNITS.labels("skipped").inc()
            continue
        marker = vectorizer.run_unit(unit)
        progress.update(rejected=sum(marker["rejected"].values()))
    progress.close()
    log.info("rank %d of %d finished its share of %d units", rank, world, units)

    markers = read_markers(output_dir, units)
    if markers is None:
        log.info("other ranks are still working; the last to finish writes %s", SUMMARY)
        return 0
    summary = summarize(markers, v.dataset_path)
    io.write_json_atomic(io.join(output_dir, SUMMARY), summary)
    print(format_summary(summary), flush=True)
    push_summary(summary, v.pushgateway_url or config.metrics.pushgateway_url, v.run_name)
    if summary["reject_fraction"] > v.max_reject_fraction:
        raise StageError(
            f"{summary['reject_fraction']:.1%} of manifest records were rejected "
            f"(vectorize.max_reject_fraction = {v.max_reject_fraction:.1%}); see {output_dir}/rejects_*.jsonl"
        )
    return 0
