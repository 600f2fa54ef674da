"""The recipe of the shipped example models (`make example-models`): its spec plans every stage on the
local backend, its configs are the named presets, and each stage resumes."""

from __future__ import annotations

from pathlib import Path

import torch

from controller.plan import build_plan
from controller.spec import load_spec
from trainer.codec import small_codec_config

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "example" / "models.yaml"


def test_the_spec_chains_phone_corpus_sft_grpo_and_eval_on_the_shipped_codec() -> None:
    plan = {run.name: run for run in build_plan(load_spec(SPEC))}
    assert list(plan) == ["vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"]
    vectorize = plan["vectorize"].config.vectorize
    assert vectorize.codec_model_path == "example/models/codec-small" and vectorize.phone_alignment
    assert vectorize.dataset_path == "runs/example-models/corpus/train.jsonl"
    sft = plan["sft"].config
    assert sft.modeling.parameters.model_name == "small" and sft.modeling.parameters.prompt_format == "phones"
    assert sft.modeling.parameters.codebook_size == small_codec_config().codebook_size
    assert sft.checkpointing.resume == "auto" and plan["rlhf"].config.checkpointing.resume == "auto"
    rl = plan["rlhf"].config.rlhf_training
    # The ASR reward alone, std-scaled within groups (the measured recipe, bench/RESULTS.md); speaker
    # similarity is watched by the guard rails rather than rewarded.
    assert rl.reward_funcs == ["WERRewardFunc"] and rl.scale_rewards and rl.sampling.do_sample
    assert rl.guard_rail_steps > 0
    assert rl.base_model_dir == "runs/example-models/export/sft"
    evaluation = plan["eval"].config.eval
    assert evaluation.test_list == "runs/example-models/corpus/eval_list.jsonl" and not evaluation.sampling.do_sample


def test_the_four_voice_spec_continues_the_one_voice_sft_on_the_four_voice_corpus() -> None:
    """example/four-voices.yaml (the four-voice stretch): the recipe's own configs, retargeted by overrides."""
    plan = {run.name: run for run in build_plan(load_spec(REPO / "example" / "four-voices.yaml"))}
    assert list(plan) == ["vectorize", "merge", "sft", "export-sft", "eval"]
    assert plan["vectorize"].config.vectorize.dataset_path == "runs/four-voices/corpus/train.jsonl"
    sft = plan["sft"].config
    assert sft.modeling.parameters.model_name == "runs/example-models/export/sft"
    assert sft.modeling.parameters.prompt_format == "phones" and sft.training.max_steps == 700
    assert list(sft.train_weighted_datasets) == ["runs/four-voices/data/vectorized"]
    assert plan["eval"].config.eval.test_list == "runs/four-voices/corpus/eval_list.jsonl"


def test_the_shipped_speechlm_speaks_every_phone_of_new_text() -> None:
    """The shipped model loads with the shipped codec and, greedy, says each phone of a sentence it never
    saw, in order, ending by itself within the phone budget (how well it sounds: bench/RESULTS.md)."""
    from trainer.config import SamplingConfig
    from trainer.model import phones
    from trainer.serve.synthesize import Synthesizer

    model = REPO / "example" / "models" / "speechlm-small"
    synth = Synthesizer.load(str(model), codec_path=str(REPO / "example" / "models" / "codec-small"))
    assert synth.vocab.prompt_format == "phones"
    text = "The museum will be closed for repairs until June."
    result = synth.generate(text, None, None, None, SamplingConfig(do_sample=False, max_new_tokens=1500))
    assert result.truncated == [False]
    fed = [i for i in result.ids[0] if i in set(synth.prompt_format.phone_ids(list(phones.PHONES)))]
    assert fed == synth.prompt_format.phone_ids(phones.phonemize(text))[1:]
    seconds = len(result.codes[0]) / synth.decoder.token_rate
    assert 1.0 < seconds < 10.0 and result.wave.size == len(result.codes[0]) * 320


def _ship_models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_models", REPO / "example" / "ship_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipping_the_codec_halves_the_decoder_keeps_the_codes_and_records_provenance(tmp_path) -> None:
    import json

    import numpy as np
    from safetensors import safe_open

    from trainer.codec import Codec, tiny_codec_config

    run = tmp_path / "run"
    trained = Codec.from_config(tiny_codec_config())
    trained.save(str(run / "checkpoints" / "codec" / "final"))
    rows = [{"step": 0, "time": 100.0, "eval_mel_loss": 2.0}, {"step": 500, "time": 400.0, "resynth_wer": 0.9,
                                                                  "resynth_sim": 0.7},
            {"step": 1000, "time": 700.5, "resynth_wer": 0.5, "resynth_sim": 0.8}]
    (run / "checkpoints" / "codec" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "corpus").mkdir()
    (run / "corpus" / "summary.json").write_text(json.dumps({"hours": {"train": 3.5}}))
    assert _ship_models().main(["--run", str(run), "--out", str(tmp_path / "models"), "--only", "codec",
                                "--command", "tts-train codec-train --config X"]) == 0

    shipped = tmp_path / "models" / "codec-small"
    with safe_open(str(shipped / "model.safetensors"), "pt") as f:
        names = f.keys()
        dtypes = {k: f.get_tensor(k).dtype for k in names}
    assert {d for k, d in dtypes.items() if k.startswith("acoustic_encoder.")} == {torch.float32}
    assert {d for k, d in dtypes.items() if k.startswith("backbone.")} == {torch.float16}
    loaded = Codec.load(str(shipped))
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    codes = trained.encode([wave], 16000)
    np.testing.assert_array_equal(loaded.encode([wave], 16000)[0], codes[0])
    np.testing.assert_allclose(loaded.decode(codes)[0], trained.decode(codes)[0], atol=2e-2)
    provenance = json.loads((shipped / "provenance.json").read_text())
    assert provenance["steps"] == 1000 and provenance["wall_time_s"] == 600.5
    assert [p["resynth_wer"] for p in provenance["resynthesis_curve"]] == [0.9, 0.5]
    assert provenance["command"] == "tts-train codec-train --config X"
    assert provenance["corpus"] == {"hours": {"train": 3.5}}
    config = REPO / "example" / "configs" / "models" / "codec-small.yaml"
    assert (shipped / "train_config.yaml").read_text() == config.read_text()


def test_shipping_a_continued_decoder_keeps_the_history_of_the_codec_it_continued(tmp_path) -> None:
    """A decoder continued from the shipped codec (codec.train.init_from, decoder_only) is shipped over
    it: its provenance holds the continuation's curve and, under continued_from, the earlier codec's."""
    import json

    from trainer.codec import Codec, tiny_codec_config

    models = tmp_path / "models"
    for name, init_from, wer in (("first", None, 0.5), ("continued", str(models / "codec-small"), 0.3)):
        run = tmp_path / name
        Codec.from_config(tiny_codec_config()).save(str(run / "checkpoints" / "codec" / "final"))
        rows = [{"step": 0, "time": 0.0}, {"step": 100, "time": 50.0, "resynth_wer": wer, "resynth_sim": 0.9}]
        (run / "checkpoints" / "codec" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = tmp_path / f"{name}.yaml"
        train = {"decoder_only": True, "init_from": init_from} if init_from else {}
        config.write_text(json.dumps({"codec": {"train": train}}))
        assert _ship_models().main(["--run", str(run), "--out", str(models), "--only", "codec",
                                    "--codec_config", str(config), "--command", f"train {name}"]) == 0

    provenance = json.loads((models / "codec-small" / "provenance.json").read_text())
    assert provenance["command"] == "train continued" and provenance["resynthesis_curve"][0]["resynth_wer"] == 0.3
    earlier = provenance["continued_from"]
    assert earlier["codec"] == str(models / "codec-small")
    assert earlier["provenance"]["command"] == "train first" and "continued_from" not in earlier["provenance"]


def test_shipping_the_speechlm_ships_the_grpo_model_float16_with_its_runs_and_evals(tmp_path) -> None:
    """`ship_models.py --only speechlm`: the rlhf export as speechlm-small, float16 and loadable, with the
    steps of both of its runs and every eval of the run in its provenance."""
    import json

    from safetensors import safe_open
    from speech_fixtures import make_model

    from trainer.model.build import load_speechlm
    from trainer.stages import RunLayout

    run = tmp_path / "run"
    layout = RunLayout(str(run / "data"), str(run / "checkpoints"), str(run))
    for seed, stage, steps in ((1, "sft", 3000), (2, "rlhf", 60)):
        make_model(Path(layout.output(f"export-{stage}")), seed=seed, prompt_format="phones")
        metrics = Path(layout.run_dir(stage)) / "metrics.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps({"step": 0, "time": 0.0}) + "\n"
                           + json.dumps({"step": steps, "time": 10.0 * steps, "loss": 1.0}) + "\n")
    for name, wer in (("eval", 0.28), ("eval-sft", 0.31)):
        (run / name).mkdir()
        (run / name / "results.json").write_text(json.dumps({"aggregate": {"model": {"wer": wer}}}))
    assert _ship_models().main(["--run", str(run), "--out", str(tmp_path / "models"), "--only", "speechlm"]) == 0

    shipped = tmp_path / "models" / "speechlm-small"
    with safe_open(str(shipped / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}
    exported = load_speechlm(layout.output("export-rlhf"))[0]
    loaded = load_speechlm(str(shipped))[0]
    for a, b in zip(loaded.state_dict().values(), exported.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3)
    provenance = json.loads((shipped / "provenance.json").read_text())
    assert {k: v["steps"] for k, v in provenance["runs"].items()} == {"sft": 3000, "rlhf": 60}
    assert sorted(provenance["other_evals"]) == ["eval-sft"]
    assert provenance["eval"]["model"] == {"wer": 0.28}
