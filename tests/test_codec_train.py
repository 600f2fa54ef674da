"""`tts-train codec-train` on the example speech: the loss falls, bad files are skipped, resume works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.cli import main
from trainer.codec import Codec
from trainer.distributed import STOPPED
from trainer.metrics import read_scalars

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "example" / "configs" / "samples.jsonl"
TINY = [
    "codec.model.fsq_levels=[4,4,4,4]", "codec.model.encoder_channels=4", "codec.model.encoder_dim=64",
    "codec.model.encoder_antialias=false", "codec.model.quantizer_dim=64", "codec.model.decoder_dim=64",
    "codec.model.decoder_layers=2", "codec.model.decoder_heads=4", "metrics.port=0",
]


@pytest.fixture()
def manifest(tmp_path) -> Path:
    """The example manifest (first 12 clips, absolute paths) plus one corrupt and one missing file."""
    if not MANIFEST.exists():
        pytest.skip("example dataset not generated")
    lines = [json.loads(x) for x in MANIFEST.read_text().splitlines()[:12]]
    for rec in lines:
        rec["wav_path"] = str((MANIFEST.parent / rec["wav_path"]).resolve())
    (tmp_path / "corrupt.flac").write_bytes(b"not audio at all")
    lines.append({**lines[0], "id": "bad", "wav_path": "corrupt.flac"})
    lines.append({**lines[0], "id": "gone", "wav_path": "missing.flac"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return path


def _train(manifest: Path, out: Path, steps: int, *extra: str) -> int:
    sets = [
        *TINY, f"codec.train.dataset_path={manifest}", f"codec.train.output_dir={out}",
        f"codec.train.max_steps={steps}", "codec.train.batch_size=4", "codec.train.segment_seconds=0.4",
        "codec.train.precision=fp32", "codec.train.learning_rate=5e-4", "codec.train.log_steps=5",
        "codec.train.mpd_periods=[2,3]", "codec.train.stft_disc_fft_sizes=[206,542]",
        "codec.train.disc_channels=8", "codec.train.eval_clips=3", *extra,
    ]
    return main(["codec-train", *[arg for s in sets for arg in ("--set", s)]])


def test_codec_train_lowers_reconstruction_loss_and_resumes(manifest: Path, tmp_path) -> None:
    out = tmp_path / "run"
    assert _train(manifest, out, 40, "codec.train.disc_start_step=30", "codec.train.save_steps=20") == 0
    rows = read_scalars(str(out / "metrics.jsonl"))
    evals = [r["eval_mel_loss"] for r in rows if "eval_mel_loss" in r]
    assert len(evals) == 2 and evals[1] < 0.95 * evals[0], evals
    gan_rows = [r for r in rows if r.get("disc_loss", 0) > 0]
    assert gan_rows and gan_rows[-1]["step"] == 40  # the GAN phase ran after disc_start_step
    assert rows[-1]["unreadable_files"] == 2
    assert (out / "checkpoints" / "step_20" / "_COMPLETE").exists()
    # Codebook telemetry at every log step; training must not collapse the codes (3 clips x 20 frames:
    # ~24 codes, perplexity ~8 here; at lr 2e-3 this tiny codec collapses to 2 codes, perplexity ~1).
    usage = [r for r in rows if "codebook_usage" in r]
    assert [r["step"] for r in usage] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert usage[-1]["codebook_usage"] * 256 >= 15 and usage[-1]["codebook_perplexity"] >= 5, usage[-1]

    codec = Codec.load(str(out / "final"))
    wave = np.sin(np.arange(8000) / 16000 * 2 * np.pi * 200).astype(np.float32)
    assert len(codec.decode(codec.encode([wave], 16000))[0]) == 8000 + 320  # 25 hops + X-codec2's padding hop

    # Resume: a longer run starts from step 20's checkpoint, not from scratch.
    shutil.rmtree(out / "final")
    assert _train(manifest, out, 45, "codec.train.disc_start_step=30", "codec.train.save_steps=20") == 0
    steps = [r["step"] for r in read_scalars(str(out / "metrics.jsonl")) if "mel_loss" in r]
    assert steps[-1] == 45 and steps.count(25) == 2  # steps 25..45 re-run once after the resume


def test_decoder_only_training_keeps_the_encoder_frozen(manifest: Path, tmp_path) -> None:
    base = tmp_path / "base"
    assert _train(manifest, base, 5, "codec.train.disc_start_step=100") == 0
    sr48 = ["codec.model.sample_rate=48000", "codec.model.hop_length=160", "codec.model.upsample_factors=[3,2]"]
    out = tmp_path / "sr48"
    assert _train(
        manifest, out, 5, *sr48, "codec.train.decoder_only=true", f"codec.train.init_from={base / 'final'}",
        "codec.train.disc_start_step=3",
    ) == 0
    before, after = Codec.load(str(base / "final")), Codec.load(str(out / "final"))
    assert after.output_sample_rate == 48000
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    np.testing.assert_array_equal(before.encode([wave], 16000)[0], after.encode([wave], 16000)[0])
    assert len(after.decode(after.encode([wave], 16000))[0]) == 51 * 960  # 50 hops + X-codec2's padding hop


def test_freeze_encoder_step_fixes_the_codes_from_that_step_on(manifest: Path, tmp_path) -> None:
    out = tmp_path / "run"
    assert _train(manifest, out, 12, "codec.train.freeze_encoder_step=6", "codec.train.save_steps=6",
                  "codec.train.disc_start_step=100") == 0
    at_freeze, final = Codec.load(str(out / "checkpoints" / "step_6" / "codec")), Codec.load(str(out / "final"))
    wave = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    np.testing.assert_array_equal(at_freeze.encode([wave], 16000)[0], final.encode([wave], 16000)[0])
    enc = {k: v for k, v in final.codec_state_dict().items() if k.startswith("acoustic_encoder.")}
    dec = {k: v for k, v in final.codec_state_dict().items() if k.startswith("backbone.")}
    frozen = at_freeze.codec_state_dict()
    assert all(np.array_equal(v.numpy(), frozen[k].numpy()) for k, v in enc.items())
    assert not all(np.array_equal(v.numpy(), frozen[k].numpy()) for k, v in dec.items())  # the decoder trained


def test_bad_training_inputs_fail_clearly(tmp_path, capsys) -> None:
    assert _train(tmp_path / "missing.jsonl", tmp_path / "o", 2) == 2
    assert "codec.train.dataset_path: manifest not found" in capsys.readouterr().err
    assert main(["codec-train", "--set", "codec.train.decoder_only=true", "--set", "metrics.port=0"]) == 2
    assert "decoder_only needs codec.train.init_from" in capsys.readouterr().err
    assert main(["codec-train", "--set", "codec.train.decoder_only=true", "--set", "codec.train.freeze_encoder_step=5",
                 "--set", "metrics.port=0"]) == 2
    assert "freeze_encoder_step does not apply" in capsys.readouterr().err


def test_mel_term_leads_the_rms_term_at_init() -> None:
    """At init the decoder's loudness is far off; the weighted loudness term must not drown the
    spectral one (the reference's squared dB gave ~250 against ~38 for 15 x mel at full size)."""
    import torch

    from trainer.audio import read_audio
    from trainer.codec import full_codec_config, tiny_codec_config
    from trainer.config import CodecTrainConfig
    from trainer.train.codec_losses import MultiResolutionMelLoss, rms_loss

    if not MANIFEST.exists():
        pytest.skip("example dataset not generated")
    records = [json.loads(x) for x in MANIFEST.read_text().splitlines()[:2]]
    wav = torch.stack([
        torch.from_numpy(read_audio(str(MANIFEST.parent / r["wav_path"])).samples[:16000]) for r in records
    ])
    weights = CodecTrainConfig()
    mel_loss = MultiResolutionMelLoss(16000)
    torch.manual_seed(0)
    for config in (full_codec_config(), tiny_codec_config()):
        codec = Codec(config).train()
        with torch.no_grad():
            quantized, _ = codec.encode_tensor(wav)
            fake = codec.decode_quantized(quantized)
        mel, rms = float(mel_loss(fake, wav)), float(rms_loss(fake, wav))
        assert weights.lambda_rms * rms < weights.lambda_mel * mel, (config.decoder_dim, mel, rms)


def test_num_workers_read_the_audio_and_report_unreadable_files(tmp_path) -> None:
    import torch

    from trainer.train.codec import Clips, TrainingBatches

    if not MANIFEST.exists():
        pytest.skip("example dataset not generated")
    # 4 good clips (the eval batch reads only these) then 2 bad ones, met only by the workers.
    lines = [json.loads(x) for x in MANIFEST.read_text().splitlines()[:4]]
    for rec in lines:
        rec["wav_path"] = str((MANIFEST.parent / rec["wav_path"]).resolve())
    (tmp_path / "corrupt.flac").write_bytes(b"not audio at all")
    lines += [{**lines[0], "wav_path": "corrupt.flac"}, {**lines[0], "wav_path": "missing.flac"}]
    manifest = tmp_path / "samples.jsonl"
    manifest.write_text("".join(json.dumps(rec) + "\n" for rec in lines))

    # Worker 0's stream is the in-process stream; worker 1 draws another one.
    def first_batches(workers: int) -> list:
        clips = Clips(str(manifest), 10, 16000, 50)
        loader = torch.utils.data.DataLoader(TrainingBatches(clips, 2, 5), batch_size=None, num_workers=workers)
        batches = iter(loader)
        return [next(batches) for _ in range(2)]

    alone, pooled = first_batches(0), first_batches(2)
    assert torch.equal(alone[0][0], pooled[0][0]) and not torch.equal(pooled[0][0], pooled[1][0])

    out = tmp_path / "run"
    assert _train(manifest, out, 15, "codec.train.num_workers=2", "codec.train.eval_clips=1",
                  "codec.train.disc_start_step=100") == 0
    rows = read_scalars(str(out / "metrics.jsonl"))
    assert rows[-1]["unreadable_files"] == 2
    assert [r["step"] for r in rows if "mel_loss" in r][-1] == 15


def test_schedule_and_held_out_resynthesis_are_logged_and_survive_a_resume(manifest: Path, tmp_path) -> None:
    """Warmup + cosine follow the configured rate across a resume (the optimiser state holds the last
    scheduled rate, not the base), and pocketsphinx judges the codec's copies of held-out speech."""
    held_out = tmp_path / "held_out.jsonl"
    records = [json.loads(line) for line in MANIFEST.read_text().splitlines()[-2:]]
    for rec in records:
        rec["wav_path"] = str((MANIFEST.parent / rec["wav_path"]).resolve())
    held_out.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    out = tmp_path / "run"
    schedule = ["codec.train.lr_scheduler=cosine", "codec.train.warmup_steps=5", "codec.train.min_lr_ratio=0.2",
                "codec.train.disc_start_step=1000", "codec.train.save_steps=10", f"codec.train.eval_list={held_out}",
                "codec.train.eval_steps=10", "codec.train.eval_items=2"]
    assert _train(manifest, out, 10, *schedule) == 0
    shutil.rmtree(out / "final")
    assert _train(manifest, out, 20, *schedule) == 0  # resumes at step 10 with max_steps 20
    rows = read_scalars(str(out / "metrics.jsonl"))
    lr = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert lr[5] == pytest.approx(5e-4)  # warmup (steps 1..5 of 20) done: the base rate
    # After the resume the schedule is the 20-step one, from the configured rate: update 19 (logged at
    # step 20) sits at 0.2 + 0.8 * (1 + cos(pi * 14/15)) / 2 of 5e-4.
    assert lr[20] == pytest.approx(5e-4 * (0.2 + 0.4 * (1 + np.cos(np.pi * 14 / 15))), rel=1e-6)
    assert lr[15] < lr[10] < lr[5]
    judged = [r for r in rows if "resynth_wer" in r]
    assert [r["step"] for r in judged] == [10, 10, 20]  # step 10's check, the first run's end, the end
    for r in judged:
        assert r["resynth_wer"] >= 0.5 and 0 < r["resynth_sim"] < 1  # 20 steps cannot make it speak

    # A held-out list naming a missing file fails before the first step, not at the first check.
    records[1]["wav_path"] = str(tmp_path / "gone.flac")
    held_out.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    shutil.rmtree(out)
    assert _train(manifest, out, 10, *schedule) == 2
    assert not (out / "metrics.jsonl").exists() or "mel_loss" not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group"])
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_next_run_resumes(manifest: Path, tmp_path,
                                                                                  to_group: bool) -> None:
    """A stopped codec run (a node drained, Ctrl-C, `kill -- -PGID`) loses at most one step: SIGTERM
    saves a checkpoint at the step it ends on, and exits 0 without a final codec. With reader workers
    the signal reaches them too; they leave it to the trainer."""
    out = tmp_path / "run"

    def sets(max_steps: int) -> list[str]:
        return [arg for s in [*common, f"codec.train.max_steps={max_steps}"] for arg in ("--set", s)]

    common = [*TINY, f"codec.train.dataset_path={manifest}", f"codec.train.output_dir={out}",
              "codec.train.batch_size=2", "codec.train.segment_seconds=0.4", "codec.train.precision=fp32",
              "codec.train.log_steps=1", "codec.train.save_steps=100000", "codec.train.disc_start_step=100000",
              "codec.train.mpd_periods=[2]", "codec.train.stft_disc_fft_sizes=[206]", "codec.train.disc_channels=8",
              "codec.train.eval_clips=1", f"codec.train.num_workers={1 if to_group else 0}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "codec-train", *sets(100000)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_file.exists() and max((r["step"] for r in read_scalars(str(metrics_file))), default=0) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    # 143 (128 + SIGTERM): stopped before its end, to be resumed (a PyTorchJob's ExitCode policy retries it).
    assert proc.wait(timeout=120) == STOPPED, proc.stderr.read()[-2000:]
    last = max(r["step"] for r in read_scalars(str(metrics_file)) if "mel_loss" in r)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "_COMPLETE").exists())
    assert checkpoints == [f"step_{last}"] and not (out / "final").exists()
    # The next run continues from that step.
    assert main(["codec-train", *sets(last + 2)]) == 0
    steps = [r["step"] for r in read_scalars(str(out / "metrics.jsonl")) if "mel_loss" in r]
    assert steps[-2:] == [last + 1, last + 2] and (out / "final").exists()
