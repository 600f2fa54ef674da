"""`python -m trainer.torchrun ...`: torchrun (same arguments, same `PET_*` environment) with exit codes a
PyTorchJob's `ExitCode` restart policy can act on.

torchrun itself ends with 1 whatever its workers did (a failed worker or its own SIGTERM becomes a
traceback), so a stage that was stopped part-way, which a retry resumes from its checkpoint, looked like
a bug and failed its job for good: found on a real node, where deleting a Worker pod mid-SFT stopped the
Master too (the trainers stop together) and the job then failed. Here the container ends with:

- 0: every worker finished;
- 128 + signal (143 for SIGTERM): the stage was stopped before its end: torchrun or a worker got a signal
  (preemption, eviction, a deleted pod, OOM-kill), or a worker stopped because a peer did and exited
  `distributed.STOPPED`; the operator recreates the pod and the stage resumes from its checkpoint;
- the workers' own code (1-127) otherwise: a bug or bad input, which no retry fixes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from trainer.distributed import STOPPED


def exit_code(worker_codes: Sequence[int]) -> int:
    """The container's exit code for the failed workers' codes (negative: killed by that signal)."""
    permanent = [c for c in worker_codes if 0 < c < 128]
    if permanent:
        return permanent[0]
    return next((128 - c if c < 0 else c for c in worker_codes if c != 0), STOPPED)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        return exit_code([failure.exitcode for failure in err.failures.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
