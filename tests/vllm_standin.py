"""A stand-in for `trl vllm-serve` (trl 0.21, trl/scripts/vllm_serve.py) on 127.0.0.1, for CPU tests.

Same HTTP endpoints and payloads: GET /health/, /get_world_size/; POST /generate/, /init_communicator/,
/update_named_param/, /reset_prefix_cache/, /close_communicator/. Generation runs on HF transformers, and a
text prompt is tokenised the way vLLM tokenises one (special tokens added). Weight updates arrive over a
gloo group (TRL's client uses vLLM's NCCL communicator; `GlooProcessGroup` / `GlooCommunicator` take the
place of `StatelessProcessGroup` / `PyNcclCommunicator` on both sides, with the same calls).

As in vLLM's server, every command runs on one worker thread in arrival order; the "fire and forget"
ones (communicator, weight updates) answer at once. What the server saw is appended to a JSON-lines log:
prompt token ids, weight names/shapes/dtypes, and a weight checksum after each completed sync.

    python tests/vllm_standin.py --model DIR --port P --log FILE
"""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=120)
# vLLM 0.10 `SamplingParams` fields: anything else in generation_kwargs fails there, so it fails here.
SAMPLING_FIELDS = {
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "bad_words", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
    "include_stop_str_in_output", "truncate_prompt_tokens", "output_kind", "guided_decoding", "logit_bias",
    "allowed_token_ids", "extra_args",
}


class GlooProcessGroup:
    """`StatelessProcessGroup.create(host, port, rank, world_size)` over gloo; rank 0 hosts the store on
    a socket bound to 127.0.0.1."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        if rank == 0:
            self._listener = socket.socket()
            self._listener.bind(("127.0.0.1", port))
            self._listener.listen()
            store = dist.TCPStore("127.0.0.1", port, world_size, True, TIMEOUT,
                                  master_listen_fd=self._listener.fileno(), use_libuv=False)
        else:
            store = dist.TCPStore(host, port, world_size, False, TIMEOUT)
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)

    @classmethod
    def create(cls, host: str, port: int, rank: int, world_size: int) -> GlooProcessGroup:
        return cls(host, port, rank, world_size)

    def barrier(self) -> None:
        self.pg.barrier().wait()


class GlooCommunicator:
    """`PyNcclCommunicator(group, device)`: `broadcast(tensor, src)` and `.group`."""

    def __init__(self, group: GlooProcessGroup, device: Any = None):
        self.group = group

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.group.pg.broadcast([tensor], options).wait()


class StandIn:
    def __init__(self, model_dir: str, log_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.params = dict(self.model.named_parameters())
        self.log_path = log_path
        self.comm: GlooCommunicator | None = None
        self.client_rank: int | None = None
        self.commands: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def log(self, **event: Any) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def _work(self) -> None:
        while True:
            func, done = self.commands.get()
            try:
                done["result"] = func()
            except Exception as err:  # reported to the caller (calls) or the log (fire and forget)
                done["error"] = f"{type(err).__name__}: {err}"
                self.log(event="error", error=done["error"])
            done["event"].set()

    def run(self, func: Callable[[], Any], wait: bool) -> Any:
        done: dict[str, Any] = {"event": threading.Event()}
        self.commands.put((func, done))
        if not wait:
            return None
        done["event"].wait()
        if "error" in done:
            raise RuntimeError(done["error"])
        return done["result"]

    # ---- worker-side commands (vLLM's WeightSyncWorkerExtension and LLM.generate)
    def init_communicator(self, host: str, port: int, world_size: int) -> None:
        self.comm = GlooCommunicator(GlooProcessGroup.create(host, port, 0, world_size))
        self.client_rank = world_size - 1
        self.log(event="init_communicator", host=host, port=port, world_size=world_size)

    def update_named_param(self, name: str, dtype: str, shape: list[int]) -> None:
        assert self.comm is not None, "communicator not initialised"
        weight = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]))
        self.comm.broadcast(weight, src=self.client_rank)
        self.comm.group.barrier()
        known = name in self.params and tuple(self.params[name].shape) == tuple(shape)
        if known:
            with torch.no_grad():
                self.params[name].copy_(weight)
        self.log(event="update", name=name, dtype=dtype, shape=list(shape), known=known)

    def reset_prefix_cache(self) -> bool:
        checksum = float(sum(p.detach().double().sum() for p in self.params.values()))
        self.log(event="synced", checksum=checksum)
        return True

    def generate(self, request: dict) -> list[list[int]]:
        kwargs = {
            "n": request.get("n", 1), "repetition_penalty": request.get("repetition_penalty", 1.0),
            "temperature": request.get("temperature", 1.0), "top_p": request.get("top_p", 1.0),
            "top_k": request.get("top_k", -1), "min_p": request.get("min_p", 0.0),
            "max_tokens": request.get("max_tokens", 16), **(request.get("generation_kwargs") or {}),
        }
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        vocab_size = self.model.get_input_embeddings().weight.shape[0]
        allowed = kwargs.get("allowed_token_ids")
        stops = kwargs.get("stop_token_ids") or []
        generate_kwargs = {
            "do_sample": True, "temperature": kwargs["temperature"], "top_p": kwargs["top_p"],
            "top_k": None if kwargs["top_k"] < 0 else kwargs["top_k"],
            "repetition_penalty": kwargs["repetition_penalty"], "max_new_tokens": kwargs["max_tokens"],
            "min_new_tokens": kwargs.get("min_tokens", 0), "num_return_sequences": kwargs["n"],
            "eos_token_id": stops or None, "pad_token_id": self.tokenizer.pad_token_id,
        }
        if allowed is not None:
            keep = set(allowed)
            generate_kwargs["suppress_tokens"] = [i for i in range(vocab_size) if i not in keep]
        completions = []
        for prompt in request["prompts"]:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]  # as vLLM tokenises text
            self.log(event="generate", prompt_ids=ids)
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          **generate_kwargs)
            for row in out[:, len(ids):].tolist():
                cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
                completions.append(row[:cut])  # vLLM's token_ids keep the stop token
        return completions


def serve(standin: StandIn, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, payload: Any, status: int = 200) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health/":
                return self._reply({"status": "ok"})
            if self.path == "/get_world_size/":
                return self._reply({"world_size": 1})
            return self._reply({"detail": "Not Found"}, 404)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            try:
                if self.path == "/generate/":
                    ids = standin.run(lambda: standin.generate(body), wait=True)
                    return self._reply({"completion_ids": ids})
                if self.path == "/init_communicator/":
                    world_size = 1 + 1  # tensor_parallel_size * data_parallel_size + the client
                    standin.run(lambda: standin.init_communicator(body["host"], body["port"], world_size), wait=False)
                    return self._reply({"message": "Request received, initializing communicator"})
                if self.path == "/update_named_param/":
                    standin.run(lambda: standin.update_named_param(body["name"], body["dtype"], body["shape"]),
                                wait=False)
                    return self._reply({"message": "Request received, updating named parameter"})
                if self.path == "/reset_prefix_cache/":
                    ok = standin.run(standin.reset_prefix_cache, wait=True)
                    return self._reply({"message": f"Request received, resetting prefix cache status: {ok}"})
                if self.path == "/close_communicator/":
                    return self._reply({"message": "Request received, closing communicator"})
            except (KeyError, TypeError, RuntimeError) as err:
                return self._reply({"detail": str(err)}, 500)
            return self._reply({"detail": "Not Found"}, 404)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    server = serve(StandIn(args.model, args.log), args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
