"""A stand-in for TRL's rollout server on 127.0.0.1, for CPU tests, in both of TRL's protocols.

trl 0.x, `trl vllm-serve` (trl 0.21, trl/scripts/vllm_serve.py): GET /health/, /get_world_size/; POST
/generate/, /init_communicator/, /update_named_param/, /reset_prefix_cache/, /close_communicator/. A text
prompt is tokenised the way vLLM tokenises one (special tokens added). The server is rank 0 of the
weight-sync group and hosts its store.

trl 1.x, a stock `vllm serve` with VLLM_SERVER_DEV_MODE=1 and the NCCL weight-transfer engine (what trl
1.x's `trl/generation/vllm_client.py` calls): GET /health, /v1/models, /server_info, /get_world_size; POST
/v1/completions (token-id prompts, `return_token_ids`, sampled-token logprobs as `token_id:<id>`),
/init_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update,
/reset_prefix_cache. The trainer is rank 0 of the weight-sync group and hosts its store.

Generation runs on HF transformers. Weight updates arrive over a gloo group where TRL uses NCCL:
`GlooProcessGroup` / `GlooCommunicator` take the place of `StatelessProcessGroup` / `PyNcclCommunicator`
on both sides (trl 0.x), `trainer_endpoint` / `broadcast_producer` the place of vLLM's
`trainer_init` / `packed_nccl_broadcast_producer` on the trainer's (trl 1.x, tensors sent one by one).

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
from urllib.parse import urlparse

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
# What trl 1.x's client adds to the sampling fields of a /v1/completions request.
COMPLETION_FIELDS = {"model", "prompt", "return_token_ids", "return_tokens_as_token_ids"}


class GlooProcessGroup:
    """`StatelessProcessGroup.create(host, port, rank, world_size)` over gloo; rank 0 hosts the store on
    a socket bound to 127.0.0.1."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        if rank == 0:
            listener = socket.socket()
            listener.bind(("127.0.0.1", port))
            listener.listen()
            # The store's daemon owns the socket from here: Python closing it first (at exit) kills the process.
            store = dist.TCPStore("127.0.0.1", port, world_size, True, TIMEOUT,
                                  master_listen_fd=listener.detach(), use_libuv=False)
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


def trainer_endpoint(init_info: dict[str, Any]) -> GlooCommunicator:
    """vLLM's `trainer_init(init_info)` for trl 1.x's client: the trainer is rank 0 and hosts the store."""
    group = GlooProcessGroup.create(init_info["master_address"], init_info["master_port"], 0, init_info["world_size"])
    return GlooCommunicator(group)


def broadcast_producer(iterator, group: GlooCommunicator, src: int, post_iter_func: Callable) -> None:
    """vLLM's `packed_nccl_broadcast_producer`, one tensor at a time in the announced order."""
    for item in iterator:
        group.broadcast(post_iter_func(item).detach().contiguous(), src=src)


class StandIn:
    def __init__(self, model_dir: str, log_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = model_dir
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
    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """trl 1.x: the server's workers join the trainer's group after it (`rank_offset`)."""
        group = GlooProcessGroup.create(init_info["master_address"], init_info["master_port"],
                                        init_info["rank_offset"], init_info["world_size"])
        self.comm = GlooCommunicator(group)
        self.client_rank = 0
        self.log(event="init_communicator", host=init_info["master_address"], port=init_info["master_port"],
                 world_size=init_info["world_size"])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """trl 1.x: the announced tensors, broadcast by the trainer in that order."""
        for name, dtype, shape in zip(update_info["names"], update_info["dtype_names"], update_info["shapes"],
                                      strict=True):
            self.update_named_param(name, dtype, shape, barrier=False)

    def init_communicator(self, host: str, port: int, world_size: int) -> None:
        self.comm = GlooCommunicator(GlooProcessGroup.create(host, port, 0, world_size))
        self.client_rank = world_size - 1
        self.log(event="init_communicator", host=host, port=port, world_size=world_size)

    def update_named_param(self, name: str, dtype: str, shape: list[int], barrier: bool = True) -> None:
        assert self.comm is not None, "communicator not initialised"
        weight = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]))
        self.comm.broadcast(weight, src=self.client_rank)
        if barrier:  # trl 0.x's client waits on the group after each tensor
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

    def _sample(self, ids: list[int], kwargs: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
        """`n` completions of one prompt, each with its sampled tokens' processed logprobs."""
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        vocab_size = self.model.get_input_embeddings().weight.shape[0]
        allowed = kwargs.get("allowed_token_ids")
        stops = kwargs.get("stop_token_ids") or []
        top_k = kwargs.get("top_k")
        generate_kwargs = {
            "do_sample": True, "temperature": kwargs.get("temperature", 1.0), "top_p": kwargs.get("top_p", 1.0),
            "top_k": None if top_k is None or top_k <= 0 else top_k,
            "repetition_penalty": kwargs.get("repetition_penalty", 1.0), "max_new_tokens": kwargs.get("max_tokens", 16),
            "min_new_tokens": kwargs.get("min_tokens", 0), "num_return_sequences": kwargs.get("n", 1),
            "eos_token_id": stops or None, "pad_token_id": self.tokenizer.pad_token_id,
            "output_scores": True, "return_dict_in_generate": True,
        }
        if allowed is not None:
            keep = set(allowed)
            generate_kwargs["suppress_tokens"] = [i for i in range(vocab_size) if i not in keep]
        self.log(event="generate", prompt_ids=ids)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      **generate_kwargs)
        logprobs = torch.stack(out.scores, dim=1).log_softmax(-1)  # (n, steps, vocab), after the processors
        samples = []
        for row, tokens in enumerate(out.sequences[:, len(ids):].tolist()):
            cut = next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))  # vLLM keeps the stop token
            samples.append((tokens[:cut], [logprobs[row, k, t].item() for k, t in enumerate(tokens[:cut])]))
        return samples

    def generate(self, request: dict) -> list[list[int]]:
        """trl 0.x's /generate/: text prompts, the sampling parameters beside them and in generation_kwargs."""
        kwargs = {
            "n": request.get("n", 1), "repetition_penalty": request.get("repetition_penalty", 1.0),
            "temperature": request.get("temperature", 1.0), "top_p": request.get("top_p", 1.0),
            "top_k": request.get("top_k", -1), "min_p": request.get("min_p", 0.0),
            "max_tokens": request.get("max_tokens", 16), **(request.get("generation_kwargs") or {}),
        }
        completions = []
        for prompt in request["prompts"]:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]  # as vLLM tokenises text
            completions += [tokens for tokens, _ in self._sample(ids, kwargs)]
        return completions

    def complete(self, request: dict) -> list[dict[str, Any]]:
        """trl 1.x's /v1/completions: token-id prompts, prompt-major choices with ids and logprobs."""
        kwargs = {k: v for k, v in request.items() if k not in COMPLETION_FIELDS}
        choices = []
        for ids in request["prompt"]:
            for tokens, logprobs in self._sample(ids, kwargs):
                names = [f"token_id:{t}" for t in tokens]
                choices.append({
                    "index": len(choices), "text": "", "prompt_token_ids": ids, "token_ids": tokens,
                    "logprobs": {"tokens": names, "token_logprobs": logprobs,
                                 "top_logprobs": [{n: lp} for n, lp in zip(names, logprobs, strict=True)]},
                })
        return choices


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
            path = urlparse(self.path).path
            if path in ("/health/", "/health"):
                return self._reply({"status": "ok"})
            if path in ("/get_world_size/", "/get_world_size"):
                return self._reply({"world_size": 1})
            if path == "/v1/models":
                return self._reply({"data": [{"id": standin.model_dir}]})
            if path == "/server_info":
                return self._reply({"vllm_config": {"weight_transfer_config": {"backend": "nccl"},
                                                    "model_config": {"logprobs_mode": "processed_logprobs"}}})
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
                # trl 1.x: vLLM's own routes; the weight-transfer ones answer once the workers are done.
                if self.path == "/v1/completions":
                    return self._reply({"choices": standin.run(lambda: standin.complete(body), wait=True)})
                if self.path == "/init_weight_transfer_engine":
                    standin.run(lambda: standin.init_weight_transfer(body["init_info"]), wait=True)
                    return self._reply({})
                if self.path == "/update_weights":
                    standin.run(lambda: standin.update_weights(body["update_info"]), wait=True)
                    return self._reply({})
                if self.path in ("/start_weight_update", "/finish_weight_update"):
                    return self._reply({})
                if self.path == "/reset_prefix_cache":
                    return self._reply({"success": standin.run(standin.reset_prefix_cache, wait=True)})
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
