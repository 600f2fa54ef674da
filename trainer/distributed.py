"""Process-group setup under torchrun (and PyTorchJob, which injects the same env as `PET_*`)."""

from __future__ import annotations

import datetime
import logging
import os
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init(timeout_s: int = 1800) -> bool:
    """Join the process group when launched by torchrun with more than one process.

    Returns True when a group was created. NCCL async error handling turns a hung collective into
    a crash (and a pod restart) instead of a job that never ends.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dist.is_initialized()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_stop_signals_to_the_trainer(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: workers ignore SIGTERM/SIGINT. When the whole process group gets
    one (Ctrl-C, a runtime stopping every process), the trainer finishes its step and saves; a worker
    dying of it would instead fail the step ("DataLoader worker is killed by signal"). The trainer
    stops its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# The exit code of a stage stopped before its end (SIGTERM here, or a peer that got one): 128 + SIGTERM, as
# if the signal had ended the process, so a PyTorchJob's ExitCode policy retries it and the retry resumes
# from the checkpoint the stop saved (trainer/torchrun.py). 0 means the stage's work is done.
STOPPED = 143


class StopRequest:
    """SIGTERM (a pod evicted, a job cancelled, `ttsctl` stopping a run) asks the training loop to finish
    its step, save a checkpoint and exit, so the next run resumes instead of losing the steps since the
    last save. The one handler of both training loops (SFT, codec)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum: int, _frame: object) -> None:
        log.warning("SIGTERM: finishing the current step, saving a checkpoint, then exiting")
        self.requested = True


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is set on any of them (one all-reduce; no-op in one process)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
