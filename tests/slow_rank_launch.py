"""`tts-train` for torchrun, with every rank but 0 slow to save its RNG state (a slow disk on one node),
and `objstore://` registered: a stand-in for gs:// that all ranks share (local files behind a URL that
is not a local path, and, like an object store, no directories to create).

transformers' Trainer writes `rng_state_<rank>.pth` on each rank into the checkpoint directory and has no
barrier before the `on_save` callbacks; the delay makes a publisher that does not wait visible.
"""

from __future__ import annotations

import os
import sys
import time

import fsspec
import torch.distributed
from fsspec.implementations.local import LocalFileSystem
from transformers import Trainer

from trainer.cli import main


class ObjectStoreStandIn(LocalFileSystem):
    protocol = ("objstore",)

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("objstore://"))


fsspec.register_implementation("objstore", ObjectStoreStandIn, clobber=True)

if int(os.environ.get("RANK", "0")) > 0:
    _save_rng_state = Trainer._save_rng_state

    def _slow_save_rng_state(self: Trainer, output_dir: str) -> None:
        time.sleep(float(os.environ.get("SLOW_RANK_SECONDS", "3")))
        _save_rng_state(self, output_dir)

    Trainer._save_rng_state = _slow_save_rng_state

if __name__ == "__main__":
    code = main(sys.argv[1:])
    # A stage that leaves its process group to interpreter exit can die there: gloo's worker threads are torn
    # down with the interpreter ("terminate called without an active exception", SIGABRT after the work).
    if torch.distributed.is_initialized():
        print("the stage returned with its process group still initialised", file=sys.stderr)
        code = code or 3
    sys.exit(code)
