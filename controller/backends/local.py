"""The `local` backend: each stage is a local process (group), no cluster needed.

State lives in `$TTSCTL_HOME/runs/<run>/` (default `~/.ttsctl`): `state.json`, `configs/<stage>.json`
and `logs/<stage>.log`, so `status`, `logs`, `list` and `cancel` work from any shell.

Process count: min(gpus_per_node, visible GPUs), or 1 without GPUs; GPU and resource requests are
otherwise ignored. One process runs as plain `python -m trainer` because torchrun would only add an
agent process and a rendezvous for a world of one; more run under
`python -m torch.distributed.run --standalone` (the venv's torchrun).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from controller.backends.base import Backend, BackendError, Phase, RunSummary, StageStatus
from controller.plan import StageRun
from controller.spec import PipelineSpec
from trainer import io
from trainer.config import dump_config
from trainer.errors import ConfigError, StageError
from trainer.stages import STEP_ORDER

if TYPE_CHECKING:
    from trainer.serve.vllm_server import VllmServer

POLL_S = 0.5
KILL_GRACE_S = 10.0


def ttsctl_home() -> Path:
    return Path(os.environ.get("TTSCTL_HOME") or Path.home() / ".ttsctl")


def visible_gpus() -> int:
    import torch  # lazy: only when a stage asks for GPUs (importing torch costs seconds)

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_count(run: StageRun) -> int:
    gpus = run.settings.gpus_per_node
    if run.step.stage.launch == "single" or gpus <= 0:
        return 1
    return max(1, min(gpus, visible_gpus()))


def stage_command(run: StageRun, config_file: Path, nproc: int) -> list[str]:
    tail = ["-m", "trainer", run.trainer_stage, "--config", str(config_file)]
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *tail]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


class RunState:
    """`state.json` of one run, read-modify-written under an exclusive file lock."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.path = run_dir / "state.json"

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            tmp.replace(self.path)

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"stages": {}}
        return json.loads(self.path.read_text())


class LocalBackend(Backend):
    name = "local"

    def __init__(self, home: Path | None = None, echo: bool = True, out: TextIO | None = None):
        self.home = home or ttsctl_home()
        self.echo = echo
        self.out = out or sys.stdout
        self._procs: dict[tuple[str, str], tuple[subprocess.Popen, threading.Thread]] = {}
        self._servers: dict[tuple[str, str], VllmServer] = {}  # a stage's rollout server (use_vllm)

    # ------------------------------------------------------------------ paths and state
    def run_dir(self, run_name: str) -> Path:
        return self.home / "runs" / run_name

    def log_path(self, run_name: str, stage: str) -> Path:
        return self.run_dir(run_name) / "logs" / f"{stage}.log"

    def _state(self, run_name: str) -> RunState:
        return RunState(self.run_dir(run_name))

    def _require_run(self, run_name: str) -> dict[str, Any]:
        state = self._state(run_name).read()
        if not self._state(run_name).path.exists():
            known = ", ".join(r.run for r in self.list_runs()) or "none"
            raise BackendError(f"no local run {run_name!r} under {self.home / 'runs'} (runs: {known})")
        return state

    # ------------------------------------------------------------------ submit / wait
    def submit(self, spec: PipelineSpec, run: StageRun) -> StageStatus:
        current = self.status(spec.name, run.name) if self._state(spec.name).path.exists() else None
        if current and current.phase is Phase.RUNNING:
            return current  # attach: already running from another shell
        run_dir = self.run_dir(spec.name)
        config_file = run_dir / "configs" / run.config_file
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(dump_config(run.config) + "\n")
        log = self.log_path(spec.name, run.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        nproc = process_count(run)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TTS_RUN": spec.name, "TTS_STAGE": run.name,
               **run.settings.env}
        server = self._start_rollout_server(spec, run)
        if server is not None:
            env.update(TTS_VLLM_HOST=server.host, TTS_VLLM_PORT=str(server.port))
        command = stage_command(run, config_file, nproc)
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, text=True, bufsize=1)
        except BaseException:
            if server is not None:
                server.stop()
            raise
        pump = threading.Thread(target=self._pump, args=(proc, log, run.name), daemon=True)
        pump.start()
        self._procs[(spec.name, run.name)] = (proc, pump)
        if server is not None:
            self._servers[(spec.name, run.name)] = server
        started = time.time()
        with self._state(spec.name).edit() as state:
            state.update(run=spec.name, backend=self.name, cancelled=False)
            state["stages"][run.name] = {
                "phase": Phase.RUNNING.value, "reason": f"{nproc} process(es)", "message": "",
                "pid": proc.pid, "started": started, "finished": None, "log": str(log),
                "command": command, "rollout_server_pid": server.process.pid if server else None,
            }
        return StageStatus(run.name, Phase.RUNNING, f"{nproc} process(es)", started=started)

    def _start_rollout_server(self, spec: PipelineSpec, run: StageRun) -> VllmServer | None:
        """The cluster's shape on one machine: an RLHF stage with `use_vllm` (storage weight sync) gets
        vLLM's OpenAI server as its own process on 127.0.0.1 (as the Deployment runs it), serving the
        stage's base model from vLLM's environment ($TTS_VLLM_PYTHON); healthy before the stage starts,
        stopped when it ends, failed or not (`wait`, `cancel`)."""
        rl = run.config.rlhf_training
        if not (run.step.stage.needs_rollout_server and rl.rollout_server == "storage"):
            return None
        # lazy: the server client pulls torch, which no other local-backend path needs
        from trainer.serve.vllm_server import VllmServer, free_port, model_context, vllm_python

        try:
            python = vllm_python()
        except ConfigError as err:
            raise BackendError(f"stage {run.name}: {err}") from None
        model = io.local_path(rl.base_model_dir)
        log = self.log_path(spec.name, "rollout")
        log.parent.mkdir(parents=True, exist_ok=True)
        server = VllmServer(python, model, free_port(), max_model_len=model_context(model),
                            dtype="auto" if visible_gpus() else "float32", log_path=log)
        if self.echo:
            self.out.write(f"==> rollout server: vLLM on {server.base_url} for {model} (log: {log})\n")
        try:
            server.start()
        except StageError as err:
            server.stop()
            raise BackendError(f"stage {run.name}: {err}") from None
        return server

    def _pump(self, proc: subprocess.Popen, log: Path, stage: str) -> None:
        """Copy the stage's output to its log file and, prefixed with the stage name, to the console."""
        assert proc.stdout is not None
        with open(log, "a") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if self.echo:
                    self.out.write(f"[{stage}] {line}")
                    self.out.flush()

    def wait(self, run_name: str, stage: str, notify: Callable[[str], None] = print) -> StageStatus:
        owned = self._procs.pop((run_name, stage), None)
        if owned is None:
            while not (status := self.status(run_name, stage)).phase.done:
                time.sleep(POLL_S)
            return status
        proc, pump = owned
        server = self._servers.pop((run_name, stage), None)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The stage runs in its own session (so `cancel` can kill its whole group): Ctrl-C does not
            # reach it, stop it here rather than leave it orphaned.
            with self._state(run_name).edit() as state:
                state["cancelled"] = True
            self._kill_group(proc.pid)
            code = proc.wait()
        finally:
            if server is not None:
                server.stop()
        pump.join()
        with self._state(run_name).edit() as state:
            entry = state["stages"][stage]
            entry["finished"] = time.time()
            entry["exit_code"] = code
            if code == 0:
                entry.update(phase=Phase.SUCCEEDED.value, reason="Completed", message="")
            elif state.get("cancelled"):
                entry.update(phase=Phase.FAILED.value, reason="Cancelled", message="stopped by ttsctl cancel")
            else:
                reason = f"Signal{-code}" if code < 0 else f"ExitCode{code}"
                entry.update(phase=Phase.FAILED.value, reason=reason,
                             message=f"the stage process exited with {code}" if code > 0 else
                             f"the stage process was killed by signal {-code}")
        return self.status(run_name, stage)

    # ------------------------------------------------------------------ queries
    def status(self, run_name: str, stage: str) -> StageStatus:
        entry = self._require_run(run_name)["stages"].get(stage)
        if entry is None:
            return StageStatus(stage, Phase.PENDING, "NotSubmitted")
        status = StageStatus(stage, Phase(entry["phase"]), entry.get("reason", ""), entry.get("message", ""),
                             entry.get("started"), entry.get("finished"))
        if (status.phase is Phase.RUNNING and (run_name, stage) not in self._procs
                and not _alive(entry.get("pid"))):
            # The process ended but the ttsctl process that started it is gone and could not record how.
            status.phase, status.reason = Phase.FAILED, "ProcessLost"
            status.message = f"the stage process ended without a recorded exit status; see {entry['log']}"
        return status

    def run_status(self, run_name: str) -> RunSummary:
        stages = self._require_run(run_name)["stages"]
        ordered = [s for s in STEP_ORDER if s in stages]
        return RunSummary(run_name, self.name, [self.status(run_name, s) for s in ordered])

    def list_runs(self) -> list[RunSummary]:
        runs_dir = self.home / "runs"
        names = sorted(p.parent.name for p in runs_dir.glob("*/state.json")) if runs_dir.exists() else []
        return [self.run_status(name) for name in names]

    def logs(self, run_name: str, stage: str, follow: bool = False, workers: bool = False) -> Iterator[str]:
        self._require_run(run_name)
        path = self.log_path(run_name, stage)
        if not path.exists():
            raise BackendError(f"no log for stage {stage!r} of run {run_name!r} (not started yet?)")
        with open(path) as fh:
            while True:
                line = fh.readline()
                if line:
                    yield line
                elif not follow or self.status(run_name, stage).phase.done:
                    # One more read: lines written between the last read and the status check.
                    yield from fh.readlines()
                    return
                else:
                    time.sleep(POLL_S)

    def failure_hint(self, run_name: str, stage: str, lines: int = 20) -> str:
        path = self.log_path(run_name, stage)
        tail = path.read_text().splitlines()[-lines:] if path.exists() else []
        return "\n".join([f"log: {path}", *(f"  | {line}" for line in tail)])

    # ------------------------------------------------------------------ cancel
    def cancel(self, run_name: str) -> list[str]:
        self._require_run(run_name)
        with self._state(run_name).edit() as state:
            state["cancelled"] = True
            running = {s: e for s, e in state["stages"].items() if e["phase"] == Phase.RUNNING.value}
        stopped = []
        for stage, entry in running.items():
            for pid in (entry["pid"], entry.get("rollout_server_pid")):
                if pid and _alive(pid):
                    self._kill_group(pid)
            stopped.append(stage)
        # Record the outcome ourselves when no ttsctl process waits on the stage any more.
        with self._state(run_name).edit() as state:
            for stage in stopped:
                entry = state["stages"][stage]
                if entry["phase"] == Phase.RUNNING.value and (run_name, stage) not in self._procs:
                    entry.update(phase=Phase.FAILED.value, reason="Cancelled",
                                 message="stopped by ttsctl cancel", finished=time.time())
        return [f"stopped {stage}" for stage in stopped]

    @staticmethod
    def _kill_group(pid: int) -> None:
        """SIGTERM the stage's process group (torchrun forwards it to every rank), SIGKILL after a grace."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + KILL_GRACE_S
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
