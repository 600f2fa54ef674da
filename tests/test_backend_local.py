"""The `local` backend runs real stage processes: vectorize -> merge on a few example utterances with a
random-init tiny codec, a failing stage, and status/logs/cancel from "another shell" (a second CLI call).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from controller_fixtures import REPO, write_spec

from controller.cli import main
from trainer.data.shards import read_shard


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "ttsctl-home"
    monkeypatch.setenv("TTSCTL_HOME", str(home))
    monkeypatch.chdir(REPO)
    return home


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    from trainer.codec import Codec
    from trainer.codec.presets import tiny_codec_config

    path = tmp_path_factory.mktemp("codec") / "tiny"
    Codec.from_config(tiny_codec_config()).save(str(path))
    return path


def small_manifest(tmp_path: Path, lines: int = 4) -> Path:
    out = tmp_path / "manifest.jsonl"
    records = [json.loads(line) for line in (REPO / "example/configs/samples.jsonl").read_text().splitlines()]
    with open(out, "w") as fh:
        for record in records[:lines]:
            record["wav_path"] = str((REPO / "example/configs" / record["wav_path"]).resolve())
            fh.write(json.dumps(record) + "\n")
    return out


def local_spec(tmp_path: Path, codec: Path, manifest: Path | str) -> Path:
    no_metrics = {"metrics": {"port": 0}}
    return write_spec(tmp_path, {
        "name": "loc",
        "storage": {"data": str(tmp_path / "data"), "checkpoints": str(tmp_path / "ckpt"),
                    "outputs": str(tmp_path / "out")},
        "codec_model_path": str(codec),
        "stages": {
            "vectorize": {"config": {"vectorize": {"dataset_path": str(manifest), "val_fraction": 0.25},
                                     **no_metrics}, "gpus_per_node": 1},
            "merge": {"config": no_metrics},
            "sft": {"enabled": False},
            "rlhf": {"enabled": False},
            "eval": {"enabled": False},
        },
    })


def test_two_stage_pipeline_runs_for_real(tmp_path, home, codec_dir, capsys):
    spec = local_spec(tmp_path, codec_dir, small_manifest(tmp_path))
    assert main(["run", str(spec), "--backend", "local"]) == 0
    out = capsys.readouterr().out
    # Progress: stage start/end lines with durations, stage output prefixed with its name.
    assert "==> vectorize: started" in out and "<== vectorize: succeeded in" in out
    assert "<== merge: succeeded in" in out and "[vectorize] " in out
    vectorized = tmp_path / "data" / "vectorized"
    merged = read_shard(str(vectorized), "train")  # the seed's layout: raw int32 codes + start offsets
    assert merged.bounds[-1] == len(merged.codes) > 0
    # The resolved configs and logs sit in the run dir; the config carries the chaining keys.
    run_dir = home / "runs" / "loc"
    config = json.loads((run_dir / "configs" / "vectorize.json").read_text())
    assert config["vectorize"]["output_dir"] == str(vectorized)
    assert config["vectorize"]["codec_model_path"] == str(codec_dir)
    assert json.loads((run_dir / "configs" / "merge.json").read_text())["merge"]["dataset_path"] == str(vectorized)
    assert (run_dir / "logs" / "merge.log").stat().st_size > 0

    assert main(["status", "loc"]) == 0
    status = capsys.readouterr().out
    assert "run loc (local): Succeeded" in status and "merge: Succeeded" in status
    assert main(["list"]) == 0
    assert "loc\tSucceeded" in capsys.readouterr().out
    assert main(["logs", "loc", "--stage", "vectorize"]) == 0
    assert "accepted: 4" in capsys.readouterr().out
    assert main(["wait", "loc"]) == 0


def test_failed_stage_stops_the_pipeline_with_its_log(tmp_path, home, codec_dir, capsys):
    spec = local_spec(tmp_path, codec_dir, tmp_path / "missing.jsonl")
    assert main(["run", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "xx vectorize: Failed after" in out and "ExitCode2" in out
    assert f"log: {home / 'runs' / 'loc' / 'logs' / 'vectorize.log'}" in out
    assert "  | " in out and "missing.jsonl" in out  # the last log lines name the missing input
    assert "not started: merge; after fixing, resume with --from vectorize" in out
    assert main(["wait", "loc"]) == 1


def test_submit_status_logs_cancel_from_another_shell(tmp_path, home, codec_dir, capsys):
    # A manifest that is a FIFO nobody writes: the stage blocks on its input until cancelled.
    fifo = tmp_path / "blocked.jsonl"
    os.mkfifo(fifo)
    spec = local_spec(tmp_path, codec_dir, fifo)
    assert main(["submit", str(spec), "vectorize"]) == 0
    assert "vectorize: Running" in capsys.readouterr().out
    # Submitting again attaches instead of starting a second process.
    assert main(["submit", str(spec), "vectorize"]) == 0
    assert "already running: attached" in capsys.readouterr().out
    state = json.loads((home / "runs" / "loc" / "state.json").read_text())
    pid = state["stages"]["vectorize"]["pid"]
    os.kill(pid, 0)
    assert main(["status", "loc"]) == 0
    assert "vectorize: Running" in capsys.readouterr().out

    assert main(["cancel", "loc"]) == 0
    assert "stopped vectorize" in capsys.readouterr().out
    deadline = time.time() + 30
    while time.time() < deadline:
        assert main(["status", "loc"]) == 0
        if "Cancelled" in (status := capsys.readouterr().out):
            break
        time.sleep(0.2)
    assert "vectorize: Failed (Cancelled)" in status
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert main(["wait", "loc"]) == 1


def test_unknown_run_is_an_actionable_error(home, capsys):
    assert main(["status", "nope"]) == 1
    assert "no local run 'nope'" in capsys.readouterr().err
