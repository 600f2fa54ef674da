"""`ttsctl validate`: good specs pass; bad ones exit 2 naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from controller_fixtures import spec_dict, write_spec

from controller.cli import main
from controller.plan import build_plan, select_stages
from controller.spec import load_spec
from trainer.errors import ConfigError


def test_valid_spec(tmp_path, capsys):
    path = write_spec(tmp_path, spec_dict(tmp_path))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "export-sft" in out and "19 Kubernetes objects" in out


def break_spec(tmp_path: Path, edit) -> str:
    data = spec_dict(tmp_path)
    edit(data)
    return str(write_spec(tmp_path, data))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["stages"]["sft"].update(gpus=8), "stages.sft.gpus: extra inputs are not permitted"),
        (lambda d: d["stages"]["sft"].update(nodes=0), "stages.sft.nodes"),
        (lambda d: d["cluster"].update(service_account="x"), "cluster.service_account"),
        (lambda d: d.update(name="Demo_1"), "name: 'Demo_1' is not a valid run name"),
        (lambda d: d["stages"].pop("merge"), "stages.merge: field required"),
        (lambda d: d["stages"]["sft"].update(resources={"limits": {"nvidia.com/gpu": "1"}}), "gpus_per_node"),
        # Errors inside a stage's trainer config carry both key paths.
        (lambda d: d["stages"]["sft"]["config"]["training"].update(lr=1), "stages.sft.config: training.lr"),
        (lambda d: d["stages"]["sft"].update(config="missing.json"), "config file not found"),
        (lambda d: d["stages"]["eval"].update(config={}), "eval.test_list is not set"),
        (lambda d: d["stages"]["codec"].update(enabled=False), "no codec"),
    ],
)
def test_bad_spec_exits_2_with_key_path(tmp_path, capsys, edit, expected):
    assert main(["validate", break_spec(tmp_path, edit)]) == 2
    err = capsys.readouterr().err
    assert expected.lower() in err.lower()
    assert "Traceback" not in err


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_codec_from_the_spec_when_the_stage_is_disabled(tmp_path):
    data = spec_dict(tmp_path)
    data["stages"]["codec"]["enabled"] = False
    data["codec_model_path"] = "gs://models/xcodec2"
    plan = {r.name: r for r in build_plan(load_spec(write_spec(tmp_path, data)))}
    assert "codec" not in plan
    assert plan["vectorize"].config.vectorize.codec_model_path == "gs://models/xcodec2"
    assert plan["eval"].config.eval.codec_model_path == "gs://models/xcodec2"


def test_stage_selection(tmp_path):
    spec = load_spec(write_spec(tmp_path, spec_dict(tmp_path)))
    assert select_stages(spec, start="rlhf") == ["rlhf", "export-rlhf", "eval"]
    assert select_stages(spec, only=["merge", "sft"]) == ["merge", "sft"]
    with pytest.raises(ConfigError, match="unknown stage 'sfx'"):
        select_stages(spec, only=["sfx"])
