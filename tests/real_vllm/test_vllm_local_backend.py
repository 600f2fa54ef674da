"""`ttsctl run` on the local backend, an RLHF stage with `use_vllm`: the cluster's shape on one machine.
vLLM's server runs as its own process on 127.0.0.1 (as the Deployment would), healthy before the stage
starts, the stage samples from it, and it is stopped after the stage, also when the stage fails."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from controller_fixtures import write_spec
from speech_fixtures import make_codec, make_dataset, make_model

from controller.cli import main as ttsctl
from controller.plan import build_plan
from controller.spec import load_spec
from trainer.cli import main as tts_train

pytestmark = pytest.mark.vllm


def _spec(tmp_path, rlhf: dict) -> dict:
    return {
        "name": "rollout-local",
        "storage": {"data": str(tmp_path / "data"), "checkpoints": str(tmp_path / "ckpt"),
                    "outputs": str(tmp_path / "out")},
        "stages": {"vectorize": {"config": {}}, "merge": {}, "sft": {"config": {}}, "eval": {"config": {}},
                   "rlhf": {"config": rlhf}},
    }


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_rlhf_stage_gets_its_own_vllm_server_for_its_lifetime(vllm_python, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTS_VLLM_PYTHON", vllm_python)
    monkeypatch.setenv("TTSCTL_HOME", str(tmp_path / "home"))
    rlhf = {"rlhf_training": {"use_vllm": True, "num_generations": 2, "per_device_train_batch_size": 2,
                              "max_completion_length": 16, "reward_funcs": ["SimilarityRewardFunc"],
                              "mask_truncated_completions": False, "guard_rail_steps": 100},
            "training": {"max_steps": 2, "logging_steps": 1, "precision": "fp32"},
            "checkpointing": {"save_steps": 2}, "metrics": {"port": 0}}
    spec_path = write_spec(tmp_path, _spec(tmp_path, rlhf))
    # What the stages before RLHF would have published: the exported SFT model and the dataset.
    config = build_plan(load_spec(spec_path), ["rlhf"])[0].config
    codec = make_codec(tmp_path / "codec")
    model = make_model(tmp_path / "sft", codec, varied=True)
    assert tts_train(["export", "--checkpoint_path", str(model), "--output_path",
                      config.rlhf_training.base_model_dir]) == 0
    make_dataset(tmp_path / "vectorized", codec)
    shutil.copytree(tmp_path / "vectorized", next(iter(config.train_weighted_datasets)))

    assert ttsctl(["run", str(spec_path), "--backend", "local", "--stages", "rlhf"]) == 0
    out = capsys.readouterr().out
    assert "==> rollout server: vLLM on http://127.0.0.1:" in out
    port = int(out.split("==> rollout server: vLLM on http://127.0.0.1:")[1].split()[0])
    assert "rollout server holds policy version 1" in out  # the stage sampled from it after a step
    assert not _port_open(port)  # stopped with the stage
    state = json.loads((tmp_path / "home" / "runs" / "rollout-local" / "state.json").read_text())
    assert state["stages"]["rlhf"]["phase"] == "Succeeded"

    # A stage that fails (here: its dataset is missing) still stops its server.
    spec = _spec(tmp_path / "f", rlhf)
    spec["name"] = "rollout-failing"
    failing = write_spec(tmp_path, spec, "failing.yaml")
    shutil.copytree(config.rlhf_training.base_model_dir,
                    build_plan(load_spec(failing), ["rlhf"])[0].config.rlhf_training.base_model_dir)
    assert ttsctl(["run", str(failing), "--backend", "local", "--stages", "rlhf"]) != 0
    out = capsys.readouterr().out
    port = int(out.split("==> rollout server: vLLM on http://127.0.0.1:")[1].split()[0])
    assert not _port_open(port)
