"""Checkpoint layout and atomic, multi-rank publishing.

    <output_dir>/<run_name>/checkpoints/step_<N>/   HF directory (config, safetensors, tokenizer,
                                                    speechlm.json) + resume/ (optimizer, scheduler,
                                                    step, sampler position, RNG) + _COMPLETE
    <output_dir>/<run_name>/final_model/            HF directory
    <output_dir>/<run_name>/best_model/             HF directory + best.json (step and measure: SFT's
                                                    eval_loss, GRPO's guard/wer) of the best model so far
                                                    (checkpointing.save_best)

codec-train (`trainer.train.codec`) publishes the same way: `<output_dir>/checkpoints/step_<N>/` holds
`codec/` and `train_state.pt`, the final codec goes to `<output_dir>/final/`.

Only directories with the `_COMPLETE` marker count: a run killed mid-save leaves a temporary
directory (local) or an unmarked one (object store) that resume never picks.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from trainer import distributed, io
from trainer.config import TrainingConfig

CHECKPOINTS = "checkpoints"
RESUME = "resume"
FINAL_MODEL = "final_model"
BEST_MODEL = "best_model"
BEST_RECORD = "best.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def run_url(training: TrainingConfig) -> str:
    """`<output_dir>/<run_name>`: where a training run (SFT or GRPO) writes everything."""
    return io.join(training.output_dir, training.run_name)


def checkpoint_url(run_url: str, step: int) -> str:
    return io.join(run_url, CHECKPOINTS, f"step_{step}")


def complete_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint of the run, oldest first."""
    root = io.join(run_url, CHECKPOINTS)
    found = []
    for name in io.listdir(root):
        match = _STEP_DIR.match(name)
        if match and io.is_complete(io.join(root, name)):
            found.append((int(match.group(1)), io.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_url: str) -> str | None:
    found = complete_checkpoints(run_url)
    return found[-1][1] if found else None


def prune(run_url: str, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (rank 0); None keeps all."""
    if not distributed.is_main() or keep is None:
        return
    for _, url in complete_checkpoints(run_url)[:-keep]:
        io.remove(url, recursive=True)


def _broadcast(value: str | None) -> str:
    if not dist.is_initialized():
        return value or ""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def publish(dest_url: str, write: Callable[[Path], None]) -> None:
    """Every rank calls `write(local_dir)` for its part; the result appears at `dest_url` atomically.

    Local destination: all ranks write into one staging directory (shared filesystem for multi-node)
    that rank 0 renames into place. Object store: each rank uploads its files, rank 0 writes the
    `_COMPLETE` marker last, after everyone finished.
    """
    if io.is_local(dest_url):
        staging = None
        if distributed.is_main():
            parent = Path(io.local_path(dest_url)).parent
            parent.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{Path(io.local_path(dest_url)).name}.tmp-", dir=parent)
        staging_dir = Path(_broadcast(staging))
        try:
            write(staging_dir)
            distributed.barrier()
            if distributed.is_main():
                io.commit_dir(staging_dir, dest_url)
        finally:
            if distributed.is_main() and staging_dir.exists():
                shutil.rmtree(staging_dir, ignore_errors=True)
        distributed.barrier()
        return
    if distributed.is_main():
        io.remove(dest_url, recursive=True)
    distributed.barrier()
    local = Path(tempfile.mkdtemp(prefix="ckpt-"))
    try:
        write(local)
        fs, path = io.filesystem(dest_url)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    distributed.barrier()
    if distributed.is_main():
        fs.pipe_file(f"{path}/{io.COMPLETE_MARKER}", b"")
    distributed.barrier()


def best_measure(run_url: str, measure: str) -> float | None:
    """The measure (`eval_loss`, `guard/wer`) of the run's published best model (None: none yet)."""
    url = io.join(run_url, BEST_MODEL)
    if not io.is_complete(url):
        return None
    return float(io.read_json(io.join(url, BEST_RECORD))[measure])


def local_copy(url: str) -> Path:
    """A local directory with the checkpoint's files (downloaded for remote URLs)."""
    return io.download_dir(url, tempfile.mkdtemp(prefix="resume-"))
