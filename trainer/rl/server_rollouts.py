"""GRPO rollouts on a stock vLLM server (its OpenAI-compatible API), weights synced through storage.

TRL samples with the policy's `generate` when its own vLLM integration is off; `ServerRollouts.install`
puts the server behind that call, so TRL's batching, scoring and loss stay TRL's. The prompts (TRL's
left-padded ids) go to `/v1/completions` as token ids with the rollout constraints (audio tokens and
speech-end only, `min_tokens`, stop at speech-end; the phone format by stop-at-end-of-phone rounds,
`phone_forcing.forced_completions`) and come back padded as `generate` returns them. The same code
serves CPU and GPU servers.

Weight sync (`weight_sync: storage`): before sampling, when the policy is `weight_sync_steps` optimiser
steps ahead of the server, its weights are written to `weight_sync_dir` (atomically) and the server
reloads them (POST /collective_rpc reload_weights; the server runs with VLLM_SERVER_DEV_MODE=1). Any two
processes that share that path work (a local run, a PVC shared by the trainer and rollout pods): no
NCCL, no port beyond the HTTP one.

Never stale silently: the server's incarnation (its process start time) is read before every batch; a
restarted server serves its startup weights, so it is re-synced first, and a request of a batch that a
restart cut is retried only after that re-sync (rank 0 publishes: with several trainer ranks, another
rank's retry may reach the new server before rank 0 has re-synced it). An unreachable server is waited
for up to `vllm_server_timeout_s`, then the stage fails with its last checkpoint intact (a re-run
resumes).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from trainer import distributed
from trainer.config import vllm_sampling
from trainer.errors import StageError
from trainer.model.vocab import AudioVocab
from trainer.serve import vllm_server
from trainer.serve.vllm_server import ServerUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_S = 2.0


class ServerRollouts:
    def __init__(self, model: torch.nn.Module, vocab: AudioVocab, base_url: str, weights_dir: str,
                 sync_steps: int, timeout_s: float, phone_frame_rate: float | None = None):
        """`phone_frame_rate`: the codec's codes per second for the phone format (None: not phones)."""
        self.model = model
        self.vocab = vocab
        self.base_url = base_url
        self.weights_dir = weights_dir
        self.sync_steps = sync_steps
        self.timeout_s = timeout_s
        self.phone_frame_rate = phone_frame_rate
        self.policy_version: Callable[[], int] = lambda: 0
        self.synced: tuple[int, float] | None = None  # (policy version, server incarnation) last synced
        self.sync_seconds: list[float] = []  # each sync's, for the trainer's metrics
        self._served_name: str | None = None

    def install(self, policy_version: Callable[[], int]) -> None:
        """Sample through the server wherever the policy's `generate` is called (TRL's rollouts, the guard
        rails); `policy_version`: the optimiser steps taken (the trainer's global step)."""
        self.policy_version = policy_version
        self.model.generate = self.generate

    # -------------------------------------------------------------------------------- the server
    def _with_server(self, action: Callable[[], T], resync: bool = False) -> T:
        """`action`, waiting out an unreachable server up to `timeout_s` (a Deployment restarting its pod).
        `resync` (sampling): before each retry, re-publish the policy if the server restarted meanwhile, so
        a batch cut by a restart is finished on the policy, not on the startup weights."""
        deadline = None
        while True:
            try:
                return action()
            except ServerUnreachable as err:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                    log.warning("rollout server unreachable (%s); waiting up to %.0f s for it to come back",
                                err, self.timeout_s)
                if now >= deadline:
                    raise StageError(
                        f"the rollout server {self.base_url} has been unreachable for {self.timeout_s:.0f} s "
                        f"({err}); the last checkpoint is intact: re-run the stage to resume"
                    ) from None
                time.sleep(RETRY_S)
                if resync:
                    self.sync()

    def sync(self, collective: bool = False) -> None:
        """Publish the policy to the server if it is `sync_steps` ahead or the server restarted. Rank 0
        decides and writes; with `collective` (every rank calls it, as TRL's rollouts do) the other ranks
        wait for it, so no rank samples before the server holds the policy."""
        if distributed.rank() == 0:
            version = self.policy_version()
            served = self._with_server(lambda: vllm_server.incarnation(self.base_url))
            if self.synced is None or served != self.synced[1] or version - self.synced[0] >= self.sync_steps:
                if self.synced is not None and served != self.synced[1]:
                    log.warning("the rollout server restarted (it serves its startup weights): re-publishing "
                                "policy version %d", version)
                start = time.perf_counter()
                vllm_server.save_for_reload(self.model, self.weights_dir)
                self._with_server(lambda: vllm_server.reload_weights(self.base_url, self.weights_dir))
                # The incarnation read after the reload: a restart during it shows at the next batch.
                self.synced = (version, self._with_server(lambda: vllm_server.incarnation(self.base_url)))
                self.sync_seconds.append(time.perf_counter() - start)
                log.info("rollout server holds policy version %d (sync %.2f s)", version, self.sync_seconds[-1])
        if collective:
            distributed.barrier()

    def served_name(self) -> str:
        if self._served_name is None:
            self._served_name = self._with_server(lambda: vllm_server.served_model(self.base_url))
        return self._served_name

    # -------------------------------------------------------------------------------- sampling
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config=None, **kwargs) -> torch.Tensor:
        """`generate`'s contract for TRL and the guard rails: prompt + completion ids, padded."""
        config = copy.deepcopy(generation_config or self.model.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        self.sync()  # no-op when fresh (TRL's rollouts synced collectively just before)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
        # The generation config's sampler (TRL's, or the guard rails' kwargs) in vLLM's names.
        sampling = vllm_sampling(config.do_sample, config.temperature, config.top_p or 1.0, config.top_k,
                                 config.repetition_penalty or 1.0)
        completions = vllm_server.speech_completions(
            self.base_url, self.served_name(), self.vocab, prompts, config.max_new_tokens, sampling,
            min_new_tokens=config.min_new_tokens or 0, phone_frame_rate=self.phone_frame_rate,
            call=lambda request: self._with_server(request, resync=True))
        width = max((len(c) for c in completions), default=0)
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + width), self.vocab.pad_token_id,
                         dtype=input_ids.dtype)
        out[:, : input_ids.shape[1]] = input_ids.cpu()
        for row, ids in enumerate(completions):
            out[row, input_ids.shape[1] : input_ids.shape[1] + len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return out.to(input_ids.device)
