"""GRPO with rollouts on a real vLLM server (`use_vllm`, `weight_sync: storage`): after every sync the
server's greedy completion is the policy's and it scores a probe as the policy does; a server killed
mid-run is waited for and re-synced; one that stays away fails the stage with its last checkpoint intact,
and the re-run resumes."""

from __future__ import annotations

import itertools
import json
import logging
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from speech_fixtures import make_codec, make_dataset, make_model

from trainer.cli import main
from trainer.metrics import read_scalars
from trainer.model.build import load_speechlm
from trainer.rl import server_rollouts
from trainer.serve.vllm_server import VllmServer, complete_ids, free_port, post

pytestmark = pytest.mark.vllm
PROBE_TOKENS = 12
TOLERANCE = 1e-3  # log-probability, fp32 policy vs fp32 server
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory):
    """Per prompt format: an exported tiny SFT model and its data (the phone format's vectorized with
    phone timings from the demo's speech)."""
    root = tmp_path_factory.mktemp("vllm-grpo")
    codec = make_codec(root / "codec")
    data = {"inworld": make_dataset(root / "data", codec)}
    manifest = root / "phones.jsonl"
    lines = (REPO / "example" / "configs" / "speech.jsonl").read_text().splitlines()[:6]
    manifest.write_text("".join(json.dumps({**json.loads(line), "wav_path": str(
        (REPO / "example" / "configs" / json.loads(line)["wav_path"]).resolve())}) + "\n" for line in lines))
    data["phones"] = root / "data-phones"
    settings = [f"vectorize.dataset_path={manifest}", f"vectorize.output_dir={data['phones']}",
                f"vectorize.codec_model_path={codec}", "vectorize.phone_alignment=true", "vectorize.val_fraction=0",
                "vectorize.num_workers=0", "metrics.port=0"]
    assert main(["vectorize", *(arg for s in settings for arg in ("--set", s))]) == 0
    exports = {}
    for fmt in ("inworld", "phones"):
        sft = make_model(root / f"sft-{fmt}" / "final_model", codec, seed=4, prompt_format=fmt, varied=True)
        exports[fmt] = root / f"export-{fmt}"
        assert main(["export", "--checkpoint_path", str(sft), "--output_path", str(exports[fmt])]) == 0
    return data, exports


def _args(base: Path, data: Path, out: Path, port: int, **extra) -> list[str]:
    settings = {
        "rlhf_training.base_model_dir": str(base), "train_weighted_datasets": {str(data): 1.0},
        "val_weighted_datasets": {str(data): 1.0}, "rlhf_training.use_vllm": True,
        "rlhf_training.vllm_server_port": port, "rlhf_training.num_generations": 2,
        "rlhf_training.per_device_train_batch_size": 2, "rlhf_training.max_completion_length": 16,
        "rlhf_training.min_completion_length": 2, "rlhf_training.reward_funcs": ["SimilarityRewardFunc"],
        "rlhf_training.mask_truncated_completions": False, "rlhf_training.guard_rail_steps": 2,
        "rlhf_training.guard_rail_samples": 1, "training.learning_rate": 5e-2, "training.logging_steps": 1,
        "training.precision": "fp32", "training.output_dir": str(out), "training.run_name": "rl",
        "checkpointing.save_steps": 1, "metrics.port": 0, **extra,
    }
    return ["rlhf", *[a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]]


def _probe(vocab) -> list[int]:
    """A fixed speech prompt and 12 audio tokens after it, scored teacher-forced by both sides."""
    return [vocab.speech_start_id, *(vocab.audio_offset + (37 * i + 3) % 256 for i in range(PROBE_TOKENS + 1))]


def _served_logprobs(base_url: str, model: str, ids: list[int]) -> list[float]:
    """The server's log-probability of each token of `ids` after the first, given those before it."""
    body = {"model": model, "prompt": [ids], "max_tokens": 1, "prompt_logprobs": 0}
    scored = post(base_url, "/v1/completions", body)["choices"][0]["prompt_logprobs"][1:]
    return [entry[str(token)]["logprob"] for entry, token in zip(scored, ids[1:], strict=True)]


def _policy_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The policy's log-softmax at each position of `ids` but the last (the distribution of the next token)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


class SyncCheck(NamedTuple):
    version: int
    probe: list[float]  # the policy's log-probabilities of the probe's tokens
    probe_gap: float  # the largest |policy - server| over them
    greedy_gap: float  # the largest (policy's best - served token's) log-probability along the served greedy


@pytest.fixture
def checked_syncs(monkeypatch):
    """After every sync, what the server serves against the policy (HF): its greedy completion of a fixed
    prompt must be the policy's greedy completion — every token the policy's argmax up to float error, so
    a near-tie that another CPU's kernels (AVX2 vs AVX-512) break the other way still counts as equal —
    and it must score a fixed probe teacher-forced as the policy does (a stale policy whose greedy happens
    to agree still moves these scores by far more than float error)."""
    checks: list[SyncCheck] = []
    sync = server_rollouts.ServerRollouts.sync

    def checked(self, collective: bool = False) -> None:
        before = len(self.sync_seconds)
        sync(self, collective)
        if len(self.sync_seconds) == before:
            return
        prompt = [self.vocab.speech_start_id, self.vocab.audio_offset + 3]
        served = complete_ids(self.base_url, self.served_name(), [prompt], PROBE_TOKENS, temperature=0.0,
                              ignore_eos=True)[0]
        along = _policy_logprobs(self.model, prompt + served)[len(prompt) - 1 :]
        greedy_gap = (along.max(-1).values - along.gather(1, torch.tensor(served)[:, None])[:, 0]).max().item()
        ids = _probe(self.vocab)
        probe = _policy_logprobs(self.model, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        served_probe = _served_logprobs(self.base_url, self.served_name(), ids)
        probe_gap = max(abs(a - b) for a, b in zip(probe, served_probe, strict=True))
        checks.append(SyncCheck(self.synced[0], probe, probe_gap, greedy_gap))

    monkeypatch.setattr(server_rollouts.ServerRollouts, "sync", checked)
    return checks


def _assert_served_each_version(checks: list[SyncCheck], versions: list[int]) -> None:
    """Each sync at the expected version, served as the policy (fp32 on both sides: float error ~1e-5), and
    consecutive versions score the probe differently by far more than that, so a server still holding the
    previous weights would have failed."""
    assert [c.version for c in checks] == versions
    assert max(c.greedy_gap for c in checks) < TOLERANCE and max(c.probe_gap for c in checks) < TOLERANCE
    for a, b in itertools.pairwise(checks):
        if a.version != b.version:
            assert max(abs(x - y) for x, y in zip(a.probe, b.probe, strict=True)) > 100 * TOLERANCE


def _server(python: str, model_dir: Path, port: int, log: Path) -> VllmServer:
    return VllmServer(python, str(model_dir), port, max_model_len=2048, log_path=log)


@pytest.mark.parametrize("fmt", ["inworld", "phones"])
def test_grpo_samples_on_vllm_and_every_sync_serves_the_policy(fmt, grpo_inputs, checked_syncs, vllm_python,
                                                              tmp_path):
    data, exports = grpo_inputs
    port = free_port()
    # Phone rollouts run several stop-at-end-of-phone rounds (a phone holds up to 75 codes).
    length = {"inworld": 16, "phones": 200}[fmt]
    with _server(vllm_python, exports[fmt], port, tmp_path / "vllm.log"):
        assert main(_args(exports[fmt], data[fmt], tmp_path / "out", port, **{
            "training.max_steps": 3, "rlhf_training.max_completion_length": length})) == 0
    # Each policy version published once, before the first sampling from it (rollouts at versions 0, 1, 2;
    # the guard rails after steps 2 and 3 at 2 and 3), and served exactly after each sync.
    _assert_served_each_version(checked_syncs, [0, 1, 2, 3])
    scalars = read_scalars(str(tmp_path / "out" / "rl" / "metrics.jsonl"))
    assert len([s for s in scalars if "timing/weight_sync_seconds" in s]) == 2  # the rollouts' own syncs
    final = load_speechlm(str(tmp_path / "out" / "rl" / "final_model"))[0]
    base = load_speechlm(str(exports[fmt]))[0]
    assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), base.parameters(), strict=True))


def test_a_killed_server_is_waited_for_and_resynced(grpo_inputs, checked_syncs, vllm_python, tmp_path, caplog):
    data, exports = grpo_inputs
    port = free_port()
    server = _server(vllm_python, exports["inworld"], port, tmp_path / "vllm.log")
    sync = server_rollouts.ServerRollouts.sync
    restarted: list[threading.Thread] = []

    def kill_after_version_2(self, collective: bool = False) -> None:
        if self.synced is not None and self.synced[0] == 2 and not restarted:  # the pod dies, comes back fresh
            server.stop()
            restarted.append(threading.Thread(target=server.start))
            restarted[0].start()
        sync(self, collective)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_rollouts.ServerRollouts, "sync", kill_after_version_2)
        server.start()
        try:
            assert main(_args(exports["inworld"], data["inworld"], tmp_path / "out", port, **{
                "training.max_steps": 3, "rlhf_training.vllm_server_timeout_s": 240})) == 0
        finally:
            restarted[0].join()
            server.stop()
    assert "rollout server unreachable" in caplog.text and "the rollout server restarted" in caplog.text
    # The restarted server (back on its startup weights) got version 2 again before step 3 sampled from it.
    _assert_served_each_version(checked_syncs, [0, 1, 2, 2, 3])


def test_a_server_that_stays_away_fails_the_stage_and_the_rerun_resumes(grpo_inputs, vllm_python, tmp_path, capsys,
                                                                        caplog):
    data, exports = grpo_inputs
    port = free_port()
    server = _server(vllm_python, exports["inworld"], port, tmp_path / "vllm.log")
    sync = server_rollouts.ServerRollouts.sync

    def kill_at_version_2(self, collective: bool = False) -> None:
        if self.policy_version() == 2:
            server.stop()
        sync(self, collective)

    args = _args(exports["inworld"], data["inworld"], tmp_path / "out", port, **{
        "training.max_steps": 3, "rlhf_training.vllm_server_timeout_s": 5, "rlhf_training.guard_rail_steps": 100})
    run = tmp_path / "out" / "rl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_rollouts.ServerRollouts, "sync", kill_at_version_2)
        server.start()
        try:
            assert main(args) != 0
        finally:
            server.stop()
    assert "unreachable for 5 s" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_2" / "_COMPLETE").exists() and not (run / "final_model").exists()
    caplog.set_level(logging.INFO, logger="trainer.rl.grpo")
    with server:
        assert main(args) == 0
    assert "resuming GRPO from" in caplog.text and "step_2" in caplog.text
    assert (run / "final_model" / "_COMPLETE").exists()
    steps = [s["step"] for s in read_scalars(str(run / "metrics.jsonl")) if "loss" in s]
    assert steps == [1, 2, 3]  # each step once: nothing lost, nothing repeated
