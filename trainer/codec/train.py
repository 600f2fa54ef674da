"""`tts-train codec-train`: GAN training of the codec (DDP under torchrun).

Generator = the Codec (encoder -> FSQ -> decoder, or the decoder alone from a frozen encoder with
`codec.train.decoder_only`); discriminators = multi-period + multi-resolution STFT. Losses: log-mel L1,
RMS loudness, least-squares adversarial and feature matching. Checkpoints (codec + optimiser state)
are published atomically under `<output_dir>/checkpoints/step_<N>/` and resumed from; the final codec
goes to `<output_dir>/final/` (loadable with `Codec.load`). SIGTERM ends the run after the current
step with a checkpoint, so the next run resumes there.
"""

from __future__ import annotations

import io as _stdio
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Counter, Gauge
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed, io, metrics
from trainer.audio import AudioError, read_audio, resample
from trainer.codec.checkpoint import ENCODER_PREFIXES, read_codec_state
from trainer.codec.discriminators import Discriminators
from trainer.codec.losses import (
    MultiResolutionMelLoss,
    adversarial_loss,
    discriminator_loss,
    feature_matching_loss,
    rms_loss,
)
from trainer.codec.model import Codec
from trainer.config import CodecTrainConfig, TrainerConfig
from trainer.errors import ConfigError, StageError
from trainer.train.checkpoint import checkpoint_url, complete_checkpoints
from trainer.train.schedule import lr_factor

log = logging.getLogger(__name__)

FLAGS: dict[str, str] = {
    "dataset_path": "codec.train.dataset_path",
    "output_dir": "codec.train.output_dir",
    "max_steps": "codec.train.max_steps",
    "batch_size": "codec.train.batch_size",
    "learning_rate": "codec.train.learning_rate",
    "decoder_only": "codec.train.decoder_only",
    "init_from": "codec.train.init_from",
    # The reference's train_codec.py flags; the run directory is <experiment_dir>/<run_name> as there.
    "run_name": "codec.train.run_name",
    "experiment_dir": "codec.train.output_dir",
    "seed": "codec.train.seed",
    "dry_run": "codec.train.dry_run",
}
NOTED_FLAGS = {
    "use_wandb": "codec-train does not log to W&B; its losses go to <output_dir>/metrics.jsonl and Prometheus",
    "project_name": "codec-train does not log to W&B (no project to name); see metrics.jsonl and Prometheus",
}

LOSS = Gauge("speechlm_codec_loss", "Latest codec training loss", ["loss"])
STEP = Gauge("speechlm_codec_step", "Optimiser steps done")
AUDIO_SECONDS = Counter("speechlm_codec_audio_seconds_total", "Seconds of audio trained on (this rank)")
THROUGHPUT = Gauge("speechlm_codec_audio_seconds_per_second", "Training throughput (this rank)")
CODEBOOK_USAGE = Gauge("speechlm_codec_codebook_usage", "Fraction of the codebook the eval clips use")
RESYNTH_WER = Gauge("speechlm_codec_resynthesis_wer", "WER of the held-out list resynthesised by the codec")
RESYNTH_SIM = Gauge("speechlm_codec_resynthesis_sim", "Speaker similarity of resynthesised to original speech")
CODEBOOK_PERPLEXITY = Gauge("speechlm_codec_codebook_perplexity", "Perplexity of the eval clips' code histogram")
UNREADABLE = Counter("speechlm_codec_unreadable_files_total", "Training files skipped as unreadable", ["reason"])


class Clips:
    """Random fixed-length crops of the manifest's audio: 16 kHz encoder input + output-rate target.

    An unreadable file is logged once and recorded in `bad` (path -> reason), then never read again;
    training goes on.
    """

    def __init__(self, manifest_url: str, frames: int, output_rate: int, token_rate: int, min_sample_rate: int = 0):
        if not io.exists(manifest_url):
            raise ConfigError(f"codec.train.dataset_path: manifest not found: {manifest_url}")
        base = manifest_url.rstrip("/").rsplit("/", 1)[0] if "/" in manifest_url else "."
        self.paths = []
        self.low_rate = 0  # records under codec.train.min_sample_rate
        for n, line in enumerate(io.read_text(manifest_url).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                wav_path = record["wav_path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: not a manifest record with wav_path; skipped", manifest_url, n)
                continue
            rate = record.get("sample_rate")
            if isinstance(rate, (int, float)) and rate < min_sample_rate:
                self.low_rate += 1
                continue
            self.paths.append(wav_path if "://" in wav_path or wav_path.startswith("/") else io.join(base, wav_path))
        if self.low_rate:
            log.info("%s: %d records below %d Hz not trained on", manifest_url, self.low_rate, min_sample_rate)
        if not self.paths:
            where = f" at >= {min_sample_rate} Hz" if self.low_rate else ""
            raise StageError(f"{manifest_url} lists no audio{where}")
        self.frames = frames
        self.output_rate = output_rate
        self.in_hop = 16000 // token_rate
        self.out_hop = output_rate // token_rate
        self.bad: dict[str, str] = {}

    def read(self, path: str) -> tuple[np.ndarray, np.ndarray] | None:
        if path in self.bad:
            return None
        try:
            audio = read_audio(path)
        except AudioError as err:
            self.bad[path] = err.reason
            log.warning("skipping unreadable training file: %s", err)
            return None
        wav16 = resample(audio.samples, audio.sample_rate, 16000)
        return wav16, resample(audio.samples, audio.sample_rate, self.output_rate)

    def crop(self, wav16: np.ndarray, target: np.ndarray, rng: random.Random | None) -> tuple[np.ndarray, np.ndarray]:
        available = max(len(wav16) // self.in_hop - self.frames, 0)
        start = rng.randint(0, available) if rng is not None else 0
        x = wav16[start * self.in_hop : (start + self.frames) * self.in_hop]
        y = target[start * self.out_hop : (start + self.frames) * self.out_hop]
        x = np.pad(x, (0, self.frames * self.in_hop - len(x)))
        y = np.pad(y, (0, self.frames * self.out_hop - len(y)))
        return x, y

    def batch(
        self, size: int, rng: random.Random | None, paths: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, tries = [], [], 0
        candidates = iter(paths) if paths is not None else None
        while len(xs) < size:
            tries += 1
            if tries > 20 * size + len(self.paths):
                raise StageError(f"could not read {size} clips: {len(self.bad)} of {len(self.paths)} files unreadable")
            if candidates is not None:
                path = next(candidates, None)
                if path is None:
                    break
            else:
                path = rng.choice(self.paths)
            item = self.read(path)
            if item is None:
                continue
            x, y = self.crop(*item, rng)
            xs.append(x)
            ys.append(y)
        if not xs:
            raise StageError("no readable clip for the evaluation batch")
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


class TrainingBatches(torch.utils.data.IterableDataset):
    """Endless random training batches `(wav16, target, {path: reason} newly found unreadable)`.

    Read through a DataLoader: with `codec.train.num_workers` > 0, audio is decoded and cropped in
    worker processes, each drawing its own stream (seeded by rank and worker id); unreadable files
    travel back with the batches, since a worker's own records and metrics never reach the trainer.
    """

    def __init__(self, clips: Clips, batch_size: int, seed: int):
        super().__init__()
        self.clips = clips
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed + (info.id if info is not None else 0))
        while True:
            known = set(self.clips.bad)
            x, y = self.clips.batch(self.batch_size, rng)
            yield x, y, {path: reason for path, reason in self.clips.bad.items() if path not in known}


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and the perplexity of their histogram: both fall towards 1 / size and 1
    when the encoder collapses onto a few codes."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=codebook_size).float()
    probs = counts[counts > 0] / counts.sum()
    return {
        "codebook_usage": float((counts > 0).sum()) / codebook_size,
        "codebook_perplexity": float(torch.exp(-(probs * probs.log()).sum())),
    }


def _build_codec(config: TrainerConfig) -> Codec:
    train = config.codec.train
    codec = Codec(config.codec.model)
    if train.init_from:
        _, state, _, source = read_codec_state(train.init_from)
        own = codec.codec_state_dict()
        copied = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if train.decoder_only:
            absent = [k for k in own if k.startswith((*ENCODER_PREFIXES, "quantizer.project_in")) and k not in copied]
            if absent:
                raise ConfigError(
                    f"codec.train.init_from: {source} lacks encoder weights matching codec.model "
                    f"({len(absent)} keys, e.g. {absent[:3]}); decoder_only needs a trained encoder"
                )
        codec.load_state_dict(copied, strict=False)
        log.info("initialised %d of %d tensors from %s", len(copied), len(own), source)
    elif train.decoder_only:
        raise ConfigError("codec.train.decoder_only needs codec.train.init_from (the frozen encoder)")
    return codec


def _trainable(codec: Codec, decoder_only: bool) -> list[nn.Parameter]:
    if decoder_only:
        # The encoder and the code book stay fixed, so codes vectorised with it keep their meaning.
        frozen_prefixes = (*ENCODER_PREFIXES, "quantizer.project_in", "semantic_model.")
    else:
        frozen_prefixes = ("semantic_model.",)
    params = []
    for name, param in codec.named_parameters():
        param.requires_grad_(not name.startswith(frozen_prefixes))
        if param.requires_grad:
            params.append(param)
    return params


class Generator(nn.Module):
    """The codec's training forward (one call per step, as DDP requires)."""

    def __init__(self, codec: Codec, decoder_only: bool):
        super().__init__()
        self.codec = codec
        self.decoder_only = decoder_only

    def forward(self, wav16: torch.Tensor, semantic: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (decoded audio, the FSQ saturation penalty: zero when the encoder is frozen)."""
        if self.decoder_only:
            with torch.no_grad():
                _, codes = self.codec.encode_tensor(wav16, semantic=semantic)
            return self.codec.decode_tensor(codes), torch.zeros((), device=wav16.device)
        latent, dtype = self.codec.encode_latent(wav16, semantic=semantic)
        quantized, _ = self.codec.quantizer.quantize_latent(latent, dtype)
        return self.codec.decode_quantized(quantized), self.codec.quantizer.saturation_loss(latent)


class ResynthesisEval:
    """Held-out speech resynthesised by the codec and judged by the eval scorers (loaded on first use)."""

    def __init__(self, config: TrainerConfig):
        from trainer.eval.resynthesis import read_utterances, resynthesize, score_resynthesis

        train = config.codec.train
        self.utterances = read_utterances(train.eval_list, train.eval_items)
        missing = [u.wav for u in self.utterances if not io.exists(u.wav)]
        if missing:  # found now, not after the first eval_steps of training
            raise ConfigError(f"codec.train.eval_list: {len(missing)} audio files not found, e.g. {missing[0]}")
        self._resynthesize, self._score = resynthesize, score_resynthesis
        # DNSMOS is left to `tts-train eval`: it would double the cost of each training-time check.
        self.eval_config = config.eval.model_copy(update={"use_dnsmos": False})
        self.scorers = None

    def __call__(self, codec: Codec) -> dict[str, float]:
        from trainer.eval.harness import Scorers

        if self.scorers is None:
            self.scorers = Scorers(self.eval_config)
        codec.eval()
        try:
            originals, copies = self._resynthesize(codec, self.utterances)
        finally:
            codec.train()
        _, aggregate = self._score(self.scorers, self.utterances, originals, copies)
        RESYNTH_WER.set(aggregate["wer"])
        if aggregate["sim"] is not None:
            RESYNTH_SIM.set(aggregate["sim"])
        return {"resynth_wer": aggregate["wer"], "resynth_sim": aggregate["sim"]}


def _save_checkpoint(train: CodecTrainConfig, step: int, codec: Codec, disc: nn.Module, g_opt, d_opt) -> None:
    url = checkpoint_url(train.output_dir, step)
    with io.staged_dir(url) as tmp:
        codec.save(str(Path(tmp) / "codec"))
        torch.save(
            {
                "step": step,
                "discriminators": disc.state_dict(),
                "g_opt": g_opt.state_dict(),
                "d_opt": d_opt.state_dict(),
            },
            Path(tmp) / "train_state.pt",
        )
    for _, old in complete_checkpoints(train.output_dir)[: -train.keep_checkpoints]:
        io.remove(old, recursive=True)
    log.info("checkpoint %s", url)


def _resume(train: CodecTrainConfig, codec: Codec, disc: nn.Module, g_opt, d_opt) -> int:
    checkpoints = complete_checkpoints(train.output_dir)
    if not train.resume or not checkpoints:
        return 0
    step, url = checkpoints[-1]
    _, state, _, _ = read_codec_state(io.join(url, "codec"))
    codec.load_state_dict(state, strict=False)
    raw = _stdio.BytesIO(io.read_bytes(io.join(url, "train_state.pt")))
    extra = torch.load(raw, map_location="cpu", weights_only=True)
    disc.load_state_dict(extra["discriminators"])
    g_opt.load_state_dict(extra["g_opt"])
    d_opt.load_state_dict(extra["d_opt"])
    log.info("resumed from %s (step %d)", url, step)
    return int(extra["step"])


def _dry_run(codec: Codec, disc: nn.Module, mel_loss: nn.Module, clips: Clips, train: CodecTrainConfig,
             rng: random.Random, device: torch.device) -> int:
    """The reference's codec dry run: the losses of one batch, no backward pass, nothing written."""
    x, y = clips.batch(train.batch_size, rng)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        fake, saturation = Generator(codec, train.decoder_only)(x, codec.semantic_features(list(x.cpu().numpy())))
        outputs = disc(torch.cat([y, fake.float()]))
        fake_out = [[f[len(y) :] for f in maps] for maps in outputs]
        losses = {"mel_loss": float(mel_loss(fake.float(), y)), "adv_loss": float(adversarial_loss(fake_out)),
                  "fsq_saturation_loss": float(saturation)}
    parameters = sum(p.numel() for p in codec.parameters())
    print(json.dumps({"stage": "codec-train", "output_dir": train.output_dir, "codec_parameters": parameters,
                      "clips": len(clips.paths), "batch_size": train.batch_size, **losses}, indent=2))
    log.info("dry run done: codec, discriminators and data are valid; nothing trained or written")
    distributed.shutdown()
    return 0


def run(config: TrainerConfig) -> int:
    train = config.codec.train
    if train.run_name:
        train = train.model_copy(update={"output_dir": io.join(train.output_dir, train.run_name)})
    distributed.init(config.training.process_group_timeout_s)
    device = distributed.device()
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(train.seed)
    metrics.serve(config.metrics.port)
    scalars = metrics.ScalarLog(io.join(train.output_dir, "metrics.jsonl"), "codec-train")

    model_cfg = config.codec.model
    frames = max(1, round(train.segment_seconds * model_cfg.token_rate))
    clips = Clips(train.dataset_path, frames, model_cfg.sample_rate, model_cfg.token_rate, train.min_sample_rate)

    codec = _build_codec(config).to(device).train()
    params = _trainable(codec, train.decoder_only)
    disc = Discriminators(train.mpd_periods, train.stft_disc_fft_sizes, train.disc_channels).to(device)
    mel_loss = MultiResolutionMelLoss(model_cfg.sample_rate, tuple(train.mel_fft_sizes)).to(device)
    if train.dry_run:
        return _dry_run(codec, disc, mel_loss, clips, train, random.Random(train.seed), device)
    g_opt = torch.optim.AdamW(params, lr=train.learning_rate, betas=(0.8, 0.99))
    d_opt = torch.optim.AdamW(disc.parameters(), lr=train.disc_learning_rate, betas=(0.8, 0.99))
    step = _resume(train, codec, disc, g_opt, d_opt)
    resynthesis = ResynthesisEval(config) if train.eval_list and distributed.is_main() else None

    def set_learning_rates(update: int) -> None:
        # From the configured rates, not the groups' own: a resumed optimiser holds the last scheduled one.
        factor = lr_factor(train.lr_scheduler, update, min(train.warmup_steps, train.max_steps), train.max_steps,
                           train.min_lr_ratio)
        for opt, lr in ((g_opt, train.learning_rate), (d_opt, train.disc_learning_rate)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    ids = [device.index] if device.type == "cuda" else None

    def wrap_generator(decoder_only: bool) -> nn.Module:
        module = Generator(codec, decoder_only)
        return DistributedDataParallel(module, device_ids=ids) if world > 1 else module

    encoder_frozen = train.decoder_only
    generator = wrap_generator(encoder_frozen)
    disc_step: nn.Module = DistributedDataParallel(disc, device_ids=ids) if world > 1 else disc
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")

    eval_x, eval_y = clips.batch(train.eval_clips, None, clips.paths[: 4 * train.eval_clips])
    unreadable: dict[str, str] = {}

    def count_unreadable(found: dict[str, str]) -> None:
        for path, reason in found.items():
            if path not in unreadable:
                unreadable[path] = reason
                UNREADABLE.labels(reason=reason).inc()

    count_unreadable(clips.bad)
    loader = torch.utils.data.DataLoader(
        TrainingBatches(clips, train.batch_size, train.seed + 1000 * rank),
        batch_size=None, num_workers=train.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=distributed.leave_stop_signals_to_the_trainer if train.num_workers else None,
    )
    batches = iter(loader)

    def evaluate() -> float:
        codec.eval()
        with torch.no_grad(), autocast:
            semantic = codec.semantic_features(list(eval_x.numpy()))
            wav, _ = Generator(codec, train.decoder_only)(eval_x.to(device), semantic)
            value = float(mel_loss(wav.float(), eval_y.to(device)))
        codec.train()
        return value

    def eval_codebook() -> dict[str, float]:
        codec.eval()
        with torch.no_grad(), autocast:
            _, codes = codec.encode_tensor(eval_x.to(device), semantic=codec.semantic_features(list(eval_x.numpy())))
        codec.train()
        usage = codebook_usage(codes, codec.codebook_size)
        CODEBOOK_USAGE.set(usage["codebook_usage"])
        CODEBOOK_PERPLEXITY.set(usage["codebook_perplexity"])
        return usage

    stop = distributed.StopRequest()
    stop.install()
    if step == 0:
        scalars.log(0, eval_mel_loss=evaluate(), **eval_codebook())
    started, seconds_done = time.time(), 0.0
    while step < train.max_steps:
        if not encoder_frozen and train.freeze_encoder_step is not None and step >= train.freeze_encoder_step:
            # Encoder parameters get no gradient from here (AdamW and clipping skip them); DDP is rebuilt
            # so it does not wait for their gradients.
            _trainable(codec, decoder_only=True)
            generator, encoder_frozen = wrap_generator(True), True
            log.info("step %d: encoder and code book frozen, only the decoder trains from here", step)
        set_learning_rates(step)
        x, y, found = next(batches)
        count_unreadable(found)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        semantic = codec.semantic_features(list(x.cpu().numpy()))
        with autocast:
            fake, saturation = generator(x, semantic)
        fake = fake.float()
        gan_on = step >= train.disc_start_step
        d_loss = torch.zeros((), device=device)
        if gan_on:
            d_opt.zero_grad(set_to_none=True)
            with autocast:
                outputs = disc_step(torch.cat([y, fake.detach()]))
            real_out = [[f[: len(y)] for f in maps] for maps in outputs]
            fake_out = [[f[len(y) :] for f in maps] for maps in outputs]
            d_loss = discriminator_loss(real_out, fake_out)
            d_loss.backward()
            nn.utils.clip_grad_norm_(disc.parameters(), train.max_grad_norm)
            d_opt.step()

        g_opt.zero_grad(set_to_none=True)
        mel = mel_loss(fake, y)
        rms = rms_loss(fake, y)
        g_loss = train.lambda_mel * mel + train.lambda_rms * rms + train.lambda_fsq_saturation * saturation
        adv = fm = torch.zeros((), device=device)
        if gan_on:
            # The unwrapped discriminators: their gradients here are discarded, so no DDP sync.
            with autocast:
                outputs = disc(torch.cat([y, fake]))
            real_out = [[f[: len(y)] for f in maps] for maps in outputs]
            fake_out = [[f[len(y) :] for f in maps] for maps in outputs]
            adv = adversarial_loss(fake_out)
            fm = feature_matching_loss(real_out, fake_out)
            g_loss = g_loss + train.lambda_adv * adv + train.lambda_feat * fm
        if not torch.isfinite(g_loss):
            raise StageError(f"codec training diverged at step {step}: generator loss {float(g_loss)}")
        g_loss.backward()
        nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        g_opt.step()
        step += 1

        clip_seconds = len(x) * x.shape[-1] / 16000
        seconds_done += clip_seconds
        AUDIO_SECONDS.inc(clip_seconds)
        STEP.set(step)
        losses = {
            "gen_loss": g_loss, "mel_loss": mel, "rms_loss": rms, "adv_loss": adv, "fm_loss": fm, "disc_loss": d_loss,
            "fsq_saturation_loss": saturation,
        }
        values = {name: float(value.detach()) for name, value in losses.items()}
        for name, value in values.items():
            LOSS.labels(loss=name).set(value)
        if step % train.log_steps == 0 or step == train.max_steps:
            rate = seconds_done / max(time.time() - started, 1e-9)
            THROUGHPUT.set(rate)
            usage = eval_codebook()
            scalars.log(step, audio_seconds_per_second=rate * world, learning_rate=g_opt.param_groups[0]["lr"],
                        **values, **usage)
            log.info(
                "step %d mel %.4f gen %.4f disc %.4f codebook usage %.2f perplexity %.1f (%.1f audio-s/s)",
                step, values["mel_loss"], values["gen_loss"], values["disc_loss"], usage["codebook_usage"],
                usage["codebook_perplexity"], rate,
            )
            metrics.push(config.metrics.pushgateway_url, "codec-train")
        if resynthesis is not None and step % train.eval_steps == 0 and step < train.max_steps:
            scores = resynthesis(codec)
            scalars.log(step, **scores)
            log.info("step %d resynthesis of %d held-out clips: WER %.3f SIM %s", step,
                     len(resynthesis.utterances), scores["resynth_wer"], scores["resynth_sim"])
        stopping = distributed.any_rank(stop.requested, device)
        if stopping or (step % train.save_steps == 0 and step < train.max_steps):
            if distributed.is_main():
                _save_checkpoint(train, step, codec, disc, g_opt, d_opt)
            distributed.barrier()
        if stopping:
            log.info("stopped by SIGTERM at step %d; checkpoint saved, the next run resumes from it", step)
            distributed.shutdown()
            return 0

    del batches  # stops the reader workers
    if distributed.is_main():
        final = resynthesis(codec) if resynthesis is not None else {}
        scalars.log(step, eval_mel_loss=evaluate(), unreadable_files=len(unreadable), **final)
        codec.eval().save(io.join(train.output_dir, "final"))
        log.info("final codec at %s", io.join(train.output_dir, "final"))
    distributed.barrier()
    distributed.shutdown()
    return 0
