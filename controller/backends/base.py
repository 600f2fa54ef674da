"""The backend interface and the status model every backend reports in."""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from controller.plan import StageRun
from controller.spec import PipelineSpec


class Phase(str, enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def done(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


@dataclass
class StageStatus:
    stage: str
    phase: Phase
    reason: str = ""
    message: str = ""
    started: float | None = None
    finished: float | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def describe(self) -> str:
        text = f"{self.stage}: {self.phase.value}"
        if self.reason:
            text += f" ({self.reason})"
        if self.message:
            text += f": {self.message}"
        return text


@dataclass
class RunSummary:
    run: str
    backend: str
    stages: list[StageStatus] = field(default_factory=list)

    @property
    def phase(self) -> Phase:
        phases = [s.phase for s in self.stages]
        if Phase.FAILED in phases:
            return Phase.FAILED
        if Phase.RUNNING in phases:
            return Phase.RUNNING
        if phases and all(p is Phase.SUCCEEDED for p in phases):
            return Phase.SUCCEEDED
        return Phase.PENDING


class BackendError(RuntimeError):
    """The backend could not do what was asked; the message says why and what to do (exit 1)."""


class Backend(ABC):
    name: str

    @abstractmethod
    def submit(self, spec: PipelineSpec, run: StageRun) -> StageStatus:
        """Start one stage run; if it already exists (same run and stage), attach to it instead."""

    @abstractmethod
    def status(self, run_name: str, stage: str) -> StageStatus: ...

    @abstractmethod
    def run_status(self, run_name: str) -> RunSummary:
        """Every stage of the run that this backend knows about, in run order."""

    @abstractmethod
    def wait(self, run_name: str, stage: str, notify: Callable[[str], None] = print) -> StageStatus:
        """Block until the stage ends; `notify` receives notices worth a person's attention."""

    @abstractmethod
    def logs(self, run_name: str, stage: str, follow: bool = False, workers: bool = False) -> Iterator[str]: ...

    @abstractmethod
    def failure_hint(self, run_name: str, stage: str, lines: int = 20) -> str:
        """Where the full log is and its last lines, for the failure message."""

    @abstractmethod
    def cancel(self, run_name: str) -> list[str]:
        """Stop every running stage of the run; returns what it did, one phrase per stage
        ("stopped sft", "deleted vectorize (Succeeded)")."""

    @abstractmethod
    def list_runs(self) -> list[RunSummary]: ...
