"""`training.strategy: deepspeed` (ZeRO-2 and ZeRO-3) on 2 CPU ranks over gloo, with gradient
accumulation, against DDP with the same global batch. DeepSpeed is a dev dependency: these run in CI."""

import pytest
from speechlm_fixtures import run_losses, sft_config, torchrun, write_config


def _run(data_dir, out, **training) -> dict[int, float]:
    config = sft_config(data_dir, out, batch_size=1, max_steps=6, gradient_accumulation_steps=2, **training)
    config["checkpointing"]["save_steps"] = 3
    proc = torchrun(write_config(out / "sft.json", config), 2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "t" / "final_model" / "model.safetensors").exists()
    return run_losses(out / "t")


@pytest.fixture(scope="module")
def ddp_losses(data_dir, tmp_path_factory):
    return _run(data_dir, tmp_path_factory.mktemp("ddp"), strategy="ddp")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(stage, ddp_losses, data_dir, tmp_path):
    got = _run(data_dir, tmp_path, strategy="deepspeed", deepspeed_zero_stage=stage)
    assert sorted(got) == sorted(ddp_losses) == list(range(1, 7))
    for step in ddp_losses:  # fp32 on both; ZeRO's flat-buffer reductions differ in summation order only
        assert got[step] == pytest.approx(ddp_losses[step], rel=1e-4), step
