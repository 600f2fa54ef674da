"""The stage registry (trainer/stages.py) is what the CLI, the controller and the layout ask, and the
knobs it wires and the stages' flags name exist; keys that moved to one owner still load."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from controller_fixtures import REPO, spec_dict, write_spec
from pydantic import BaseModel

from controller import render
from controller.plan import build_plan, enabled_stages, layout_of
from controller.spec import Stages, load_spec
from trainer.config import TrainerConfig, load_config
from trainer.errors import ConfigError
from trainer.stages import STAGES, STEP_ORDER, STEPS


def _is_config_path(path: str) -> bool:
    model: type[BaseModel] | None = TrainerConfig
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_module_runs_and_its_flags_set_real_keys(name):
    stage = STAGES[name]
    module = stage.load()
    assert callable(module.run)
    assert stage.section in TrainerConfig.model_fields
    missing = {flag: key for flag, key in module.FLAGS.items() if not _is_config_path(key)}
    assert missing == {}


def test_the_cli_offers_exactly_the_registry_stages():
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    listed = [line.split()[0] for line in out.split("STAGE\n", 1)[1].split("\n\n")[0].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(STAGES)


def test_every_step_has_a_spec_section_and_the_spec_no_other():
    assert {step.spec_key for step in STEPS.values()} == set(Stages.model_fields)
    assert all(step.source is None or STEP_ORDER.index(step.source) < STEP_ORDER.index(name)
               for name, step in STEPS.items())


def test_the_plan_wires_each_step_to_what_the_steps_before_it_publish(tmp_path):
    spec = load_spec(write_spec(tmp_path, spec_dict(tmp_path)))
    layout = layout_of(spec)
    runs = {run.name: run for run in build_plan(spec)}
    assert list(runs) == list(STEP_ORDER) == enabled_stages(spec)
    assert runs["vectorize"].config.vectorize.codec_model_path == layout.output("codec")
    assert runs["sft"].config.train_weighted_datasets == {layout.output("merge"): 1.0}
    assert runs["export-sft"].config.export.checkpoint_path == layout.output("sft")
    assert runs["rlhf"].config.rlhf_training.base_model_dir == layout.output("export-sft")
    assert runs["eval"].config.eval.model_path == layout.output("export-rlhf")
    assert runs["codec"].skip_if_complete == layout.output("codec")
    assert Path(layout.output("sft")).parent == Path(runs["sft"].config.training.output_dir) / "sft"


def test_only_the_step_whose_stage_needs_it_gets_the_rollout_server(tmp_path):
    spec = load_spec(write_spec(tmp_path, spec_dict(tmp_path)))
    with_server = {s.run.name for s in render.render(spec) if s.rollout}
    assert with_server == {name for name, step in STEPS.items() if step.stage.needs_rollout_server} == {"rlhf"}


def test_a_single_process_stage_runs_one_process_whatever_gpus_it_is_given(tmp_path):
    data = spec_dict(tmp_path)
    data["stages"]["merge"]["gpus_per_node"] = 4
    spec = load_spec(write_spec(tmp_path, data))
    jobs = {s.run.name: render.to_dict(s.job) for s in render.render(spec)}
    assert STAGES["merge"].launch == "single" and STAGES["sft"].launch == "torchrun"
    assert jobs["merge"]["spec"]["nprocPerNode"] == "1"
    assert jobs["sft"]["spec"]["nprocPerNode"] == "8"


# ------------------------------------------------------------------- one owner per knob
@pytest.mark.parametrize(("old", "new"), [
    ({"rlhf_training": {"max_steps": 7}}, ("training", "max_steps")),
    ({"training": {"dry_run": True}}, ("dry_run",)),
    ({"vectorize": {"dry_run": True}}, ("dry_run",)),
    ({"codec": {"train": {"dry_run": True}}}, ("dry_run",)),
])
def test_keys_of_earlier_releases_load_into_their_one_owner(old, new):
    config = load_config(data=old)
    value = config
    for part in new:
        value = getattr(value, part)
    assert value in (7, True)


def test_a_moved_key_that_disagrees_with_its_owner_fails_with_both_paths():
    with pytest.raises(ConfigError, match=r"rlhf_training\.max_steps \(7\) and training\.max_steps \(3\) disagree"):
        load_config(data={"rlhf_training": {"max_steps": 7}, "training": {"max_steps": 3}})


def test_reference_rollout_sampling_keys_fill_the_shared_sampler():
    config = load_config(data={"rlhf_training": {"temperature": 1.1, "top_k": 50}})
    sampling = config.rlhf_training.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (1.1, 50, 0.9)  # top_p: the RL default
    assert config.infer.sampling.top_k == 0  # synthesis keeps its own default
    with pytest.raises(ConfigError, match=r"rlhf_training\.sampling\.top_k"):
        load_config(data={"rlhf_training": {"sampling": {"top_k": -1}}})


def test_enable_rlhf_training_is_warned_as_having_no_effect(caplog):
    with caplog.at_level(logging.WARNING):
        load_config(data={"dataset": {"enable_rlhf_training": True}})
    assert "dataset.enable_rlhf_training is not honoured" in caplog.text


def test_an_override_named_by_an_old_or_reference_key_wins_over_the_file(tmp_path):
    path = tmp_path / "rlhf.json"
    path.write_text('{"training": {"max_steps": 3}, "rlhf_training": {"sampling": {"top_k": 9}}}')
    config = load_config(path, ["rlhf_training.max_steps=1", "rlhf_training.top_k=5"])
    assert (config.training.max_steps, config.rlhf_training.sampling.top_k) == (1, 5)
