"""`tts-train codec-train`: GAN training of the codec (DDP under torchrun).

Generator = the Codec (encoder -> FSQ -> decoder, or the decoder alone from a frozen encoder with
`codec.train.decoder_only`); discriminators = multi-period + multi-resolution STFT
(`trainer.train.codec_discriminators`). Losses (`trainer.train.codec_losses`): log-mel L1, RMS loudness,
least-squares adversarial and feature matching. Checkpoints (codec + optimiser state) are published
atomically under `<output_dir>/checkpoints/step_<N>/` by the SFT machinery (`trainer.train.checkpoint`)
and resumed from; the final codec goes to `<output_dir>/final/` (loadable with `Codec.load`). SIGTERM
ends the run after the current step with a checkpoint, so the next run resumes there. With
`codec.train.eval_list`, held-out speech is resynthesised and scored every `codec.train.eval_steps`
(`trainer.scoring.resynthesis`).
"""

from __future__ import annotations

import io as _stdio
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Counter, Gauge
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed, io, metrics
from trainer.audio import AudioError, read_audio, resample
from trainer.codec.checkpoint import ENCODER_PREFIXES, read_codec_state
from trainer.codec.model import Codec
from trainer.config import CodecTrainConfig, TrainerConfig
from trainer.data.manifest import AUDIO_FIELDS, LineError, read_manifest, read_utterances, resolve_wav_path
from trainer.errors import ConfigError, StageError
from trainer.scoring.resynthesis import resynthesize, score_resynthesis
from trainer.scoring.scorers import Scorers
from trainer.train import checkpoint
from trainer.train.codec_discriminators import Discriminators
from trainer.train.codec_losses import (
    MultiResolutionMelLoss,
    adversarial_loss,
    discriminator_loss,
    feature_matching_loss,
    rms_loss,
)
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
    "dry_run": "dry_run",
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
        self.paths, self.low_rate = _audio_paths(manifest_url, min_sample_rate)
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


def _audio_paths(manifest_url: str, min_sample_rate: int) -> tuple[list[str], int]:
    """(the manifest's audio files, how many records were left out as under `min_sample_rate`).

    Only `wav_path` is required of a record (codec training needs no transcript); a record without a
    numeric `sample_rate` is kept. Lines that are not records are logged with their number and skipped.
    """
    paths: list[str] = []
    low_rate = 0  # records under codec.train.min_sample_rate
    for line_no, record in read_manifest(manifest_url, AUDIO_FIELDS):
        if isinstance(record, LineError):
            log.warning("%s:%d: not a manifest record with wav_path (%s: %s); skipped", manifest_url, line_no,
                        record.reason, record.detail)
            continue
        rate = record.get("sample_rate")
        if isinstance(rate, (int, float)) and rate < min_sample_rate:
            low_rate += 1
            continue
        paths.append(resolve_wav_path(manifest_url, record["wav_path"]))
    if low_rate:
        log.info("%s: %d records below %d Hz not trained on", manifest_url, low_rate, min_sample_rate)
    if not paths:
        where = f" at >= {min_sample_rate} Hz" if low_rate else ""
        raise StageError(f"{manifest_url} lists no audio{where}")
    return paths, low_rate


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
        train = config.codec.train
        self.utterances = read_utterances(train.eval_list, train.eval_items)
        missing = [u.wav for u in self.utterances if not io.exists(u.wav)]
        if missing:  # found now, not after the first eval_steps of training
            raise ConfigError(f"codec.train.eval_list: {len(missing)} audio files not found, e.g. {missing[0]}")
        # DNSMOS is left to `tts-train eval`: it would double the cost of each training-time check.
        self.eval_config = config.eval.model_copy(update={"use_dnsmos": False})
        self.scorers: Scorers | None = None

    def __call__(self, codec: Codec) -> dict[str, float]:
        if self.scorers is None:
            self.scorers = Scorers(self.eval_config)
        codec.eval()
        try:
            originals, copies = resynthesize(codec, self.utterances)
        finally:
            codec.train()
        _, aggregate = score_resynthesis(self.scorers, self.utterances, originals, copies)
        RESYNTH_WER.set(aggregate["wer"])
        if aggregate["sim"] is not None:
            RESYNTH_SIM.set(aggregate["sim"])
        return {"resynth_wer": aggregate["wer"], "resynth_sim": aggregate["sim"]}


@dataclass
class GAN:
    """What codec-train trains: the codec (generator) with its trainable parameters, the discriminators,
    and the log-mel loss (built once: it holds the mel filter banks)."""

    codec: Codec
    params: list[nn.Parameter]
    disc: Discriminators
    mel_loss: MultiResolutionMelLoss


def _build(config: TrainerConfig, train: CodecTrainConfig, device: torch.device) -> tuple[Clips, GAN]:
    model_cfg = config.codec.model
    frames = max(1, round(train.segment_seconds * model_cfg.token_rate))
    clips = Clips(train.dataset_path, frames, model_cfg.sample_rate, model_cfg.token_rate, train.min_sample_rate)
    codec = _build_codec(config).to(device).train()
    params = _trainable(codec, train.decoder_only)
    disc = Discriminators(train.mpd_periods, train.stft_disc_fft_sizes, train.disc_channels).to(device)
    mel_loss = MultiResolutionMelLoss(model_cfg.sample_rate, tuple(train.mel_fft_sizes)).to(device)
    return clips, GAN(codec, params, disc, mel_loss)


def _split(outputs: list[list[torch.Tensor]], real: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The discriminators' feature maps of `cat([real batch, fake batch])` -> (real part, fake part)."""
    return [[f[:real] for f in maps] for maps in outputs], [[f[real:] for f in maps] for maps in outputs]


def _dry_run(clips: Clips, gan: GAN, train: CodecTrainConfig, rng: random.Random, device: torch.device) -> int:
    """The reference's codec dry run: the losses of one batch, no backward pass, nothing written."""
    codec = gan.codec
    x, y = clips.batch(train.batch_size, rng)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        fake, saturation = Generator(codec, train.decoder_only)(x, codec.semantic_features(list(x.cpu().numpy())))
        _, fake_out = _split(gan.disc(torch.cat([y, fake.float()])), len(y))
        losses = {"mel_loss": float(gan.mel_loss(fake.float(), y)), "adv_loss": float(adversarial_loss(fake_out)),
                  "fsq_saturation_loss": float(saturation)}
    parameters = sum(p.numel() for p in codec.parameters())
    print(json.dumps({"stage": "codec-train", "output_dir": train.output_dir, "codec_parameters": parameters,
                      "clips": len(clips.paths), "batch_size": train.batch_size, **losses}, indent=2))
    log.info("dry run done: codec, discriminators and data are valid; nothing trained or written")
    distributed.shutdown()
    return 0


class CodecTrainer:
    """One codec-train run past its setup: optimisers (resumed from the latest checkpoint), the data
    loader, the step, logging, held-out checks, checkpoints and the final codec."""

    def __init__(self, config: TrainerConfig, train: CodecTrainConfig, clips: Clips, gan: GAN,
                 scalars: metrics.ScalarLog):
        self.config, self.train, self.clips, self.scalars = config, train, clips, scalars
        self.codec, self.params, self.disc, self.mel_loss = gan.codec, gan.params, gan.disc, gan.mel_loss
        self.device, self.world = distributed.device(), distributed.world_size()
        self.g_opt = torch.optim.AdamW(self.params, lr=train.learning_rate, betas=(0.8, 0.99))
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=train.disc_learning_rate, betas=(0.8, 0.99))
        self.step = self._resume()
        self.resynthesis = ResynthesisEval(config) if train.eval_list and distributed.is_main() else None
        self.device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.encoder_frozen = train.decoder_only
        self.generator = self._wrap_generator(self.encoder_frozen)
        self.disc_step: nn.Module = (
            DistributedDataParallel(self.disc, device_ids=self.device_ids) if self.world > 1 else self.disc
        )
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")
        self.eval_x, self.eval_y = clips.batch(train.eval_clips, None, clips.paths[: 4 * train.eval_clips])
        self.unreadable: dict[str, str] = {}
        self._count_unreadable(clips.bad)
        loader = torch.utils.data.DataLoader(
            TrainingBatches(clips, train.batch_size, train.seed + 1000 * distributed.rank()),
            batch_size=None, num_workers=train.num_workers, pin_memory=self.device.type == "cuda",
            worker_init_fn=distributed.leave_stop_signals_to_the_trainer if train.num_workers else None,
        )
        self.batches = iter(loader)
        self.stop = distributed.StopRequest()
        self.started, self.seconds_done = time.time(), 0.0

    def fit(self) -> int:
        """Train to `max_steps` (then the final codec) or to a SIGTERM (then a checkpoint of the step it ends on)."""
        train = self.train
        self.stop.install()
        if self.step == 0:
            self.scalars.log(0, eval_mel_loss=self._eval_mel_loss(), **self._eval_codebook())
        self.started, self.seconds_done = time.time(), 0.0
        while self.step < train.max_steps:
            x, losses = self._train_step()
            self._record(x, losses)
            if self.resynthesis is not None and self.step % train.eval_steps == 0 and self.step < train.max_steps:
                self._judge_resynthesis()
            stopping = distributed.any_rank(self.stop.requested, self.device) and self.step < train.max_steps
            if stopping or (self.step % train.save_steps == 0 and self.step < train.max_steps):
                self._save_checkpoint()
            if stopping:
                log.info("stopped by SIGTERM at step %d; checkpoint saved, the next run resumes from it", self.step)
                distributed.shutdown()
                return distributed.STOPPED
        self._finish()
        return 0

    def _train_step(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One step of the discriminators (once the GAN phase is on) and of the generator:
        (the batch's encoder input, the losses)."""
        train = self.train
        if not self.encoder_frozen and train.freeze_encoder_step is not None and self.step >= train.freeze_encoder_step:
            self._freeze_encoder()
        self._set_learning_rates()
        x, y, found = next(self.batches)
        self._count_unreadable(found)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        semantic = self.codec.semantic_features(list(x.cpu().numpy()))
        with self.autocast:
            fake, saturation = self.generator(x, semantic)
        fake = fake.float()
        gan_on = self.step >= train.disc_start_step
        d_loss = self._discriminator_step(y, fake) if gan_on else torch.zeros((), device=self.device)
        losses = {**self._generator_step(y, fake, saturation, gan_on), "disc_loss": d_loss,
                  "fsq_saturation_loss": saturation}
        self.step += 1
        return x, {name: float(value.detach()) for name, value in losses.items()}

    def _discriminator_step(self, y: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        self.d_opt.zero_grad(set_to_none=True)
        with self.autocast:
            outputs = self.disc_step(torch.cat([y, fake.detach()]))
        d_loss = discriminator_loss(*_split(outputs, len(y)))
        d_loss.backward()
        nn.utils.clip_grad_norm_(self.disc.parameters(), self.train.max_grad_norm)
        self.d_opt.step()
        return d_loss

    def _generator_step(self, y: torch.Tensor, fake: torch.Tensor, saturation: torch.Tensor,
                        gan_on: bool) -> dict[str, torch.Tensor]:
        train = self.train
        self.g_opt.zero_grad(set_to_none=True)
        mel = self.mel_loss(fake, y)
        rms = rms_loss(fake, y)
        g_loss = train.lambda_mel * mel + train.lambda_rms * rms + train.lambda_fsq_saturation * saturation
        adv = fm = torch.zeros((), device=self.device)
        if gan_on:
            # The unwrapped discriminators: their gradients here are discarded, so no DDP sync.
            with self.autocast:
                outputs = self.disc(torch.cat([y, fake]))
            real_out, fake_out = _split(outputs, len(y))
            adv = adversarial_loss(fake_out)
            fm = feature_matching_loss(real_out, fake_out)
            g_loss = g_loss + train.lambda_adv * adv + train.lambda_feat * fm
        if not torch.isfinite(g_loss):
            raise StageError(f"codec training diverged at step {self.step}: generator loss {float(g_loss)}")
        g_loss.backward()
        nn.utils.clip_grad_norm_(self.params, train.max_grad_norm)
        self.g_opt.step()
        return {"gen_loss": g_loss, "mel_loss": mel, "rms_loss": rms, "adv_loss": adv, "fm_loss": fm}

    def _set_learning_rates(self) -> None:
        # From the configured rates, not the groups' own: a resumed optimiser holds the last scheduled one.
        train = self.train
        factor = lr_factor(train.lr_scheduler, self.step, min(train.warmup_steps, train.max_steps), train.max_steps,
                           train.min_lr_ratio)
        for opt, lr in ((self.g_opt, train.learning_rate), (self.d_opt, train.disc_learning_rate)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    def _wrap_generator(self, decoder_only: bool) -> nn.Module:
        module = Generator(self.codec, decoder_only)
        return DistributedDataParallel(module, device_ids=self.device_ids) if self.world > 1 else module

    def _freeze_encoder(self) -> None:
        # Encoder parameters get no gradient from here (AdamW and clipping skip them); DDP is rebuilt
        # so it does not wait for their gradients.
        _trainable(self.codec, decoder_only=True)
        self.generator, self.encoder_frozen = self._wrap_generator(True), True
        log.info("step %d: encoder and code book frozen, only the decoder trains from here", self.step)

    def _count_unreadable(self, found: dict[str, str]) -> None:
        for path, reason in found.items():
            if path not in self.unreadable:
                self.unreadable[path] = reason
                UNREADABLE.labels(reason=reason).inc()

    def _record(self, x: torch.Tensor, losses: dict[str, float]) -> None:
        """Throughput and loss metrics of the step just done; every `log_steps` (and at the end) a line in
        metrics.jsonl with the codebook usage, a log line and a Pushgateway push."""
        train = self.train
        clip_seconds = len(x) * x.shape[-1] / 16000
        self.seconds_done += clip_seconds
        AUDIO_SECONDS.inc(clip_seconds)
        STEP.set(self.step)
        for name, value in losses.items():
            LOSS.labels(loss=name).set(value)
        if self.step % train.log_steps != 0 and self.step != train.max_steps:
            return
        rate = self.seconds_done / max(time.time() - self.started, 1e-9)
        THROUGHPUT.set(rate)
        usage = self._eval_codebook()
        self.scalars.log(self.step, audio_seconds_per_second=rate * self.world,
                         learning_rate=self.g_opt.param_groups[0]["lr"], **losses, **usage)
        log.info(
            "step %d mel %.4f gen %.4f disc %.4f codebook usage %.2f perplexity %.1f (%.1f audio-s/s)",
            self.step, losses["mel_loss"], losses["gen_loss"], losses["disc_loss"], usage["codebook_usage"],
            usage["codebook_perplexity"], rate,
        )
        metrics.push(self.config.metrics.pushgateway_url, "codec-train")

    def _eval_mel_loss(self) -> float:
        """Log-mel loss of the fixed evaluation clips."""
        self.codec.eval()
        with torch.no_grad(), self.autocast:
            semantic = self.codec.semantic_features(list(self.eval_x.numpy()))
            wav, _ = Generator(self.codec, self.train.decoder_only)(self.eval_x.to(self.device), semantic)
            value = float(self.mel_loss(wav.float(), self.eval_y.to(self.device)))
        self.codec.train()
        return value

    def _eval_codebook(self) -> dict[str, float]:
        """Codebook usage and perplexity of the fixed evaluation clips."""
        codec, eval_x = self.codec, self.eval_x
        codec.eval()
        with torch.no_grad(), self.autocast:
            semantic = codec.semantic_features(list(eval_x.numpy()))
            _, codes = codec.encode_tensor(eval_x.to(self.device), semantic=semantic)
        codec.train()
        usage = codebook_usage(codes, codec.codebook_size)
        CODEBOOK_USAGE.set(usage["codebook_usage"])
        CODEBOOK_PERPLEXITY.set(usage["codebook_perplexity"])
        return usage

    def _judge_resynthesis(self) -> None:
        scores = self.resynthesis(self.codec)
        self.scalars.log(self.step, **scores)
        log.info("step %d resynthesis of %d held-out clips: WER %.3f SIM %s", self.step,
                 len(self.resynthesis.utterances), scores["resynth_wer"], scores["resynth_sim"])

    def _save_checkpoint(self) -> None:
        """Every rank calls this; rank 0 writes the codec and the training state (`checkpoint.publish`)."""
        url = checkpoint.checkpoint_url(self.train.output_dir, self.step)
        checkpoint.publish(url, self._write_checkpoint)
        checkpoint.prune(self.train.output_dir, self.train.keep_checkpoints)
        if distributed.is_main():
            log.info("checkpoint %s", url)

    def _write_checkpoint(self, directory: Path) -> None:
        if not distributed.is_main():
            return
        self.codec.save(str(directory / "codec"))
        torch.save(
            {
                "step": self.step,
                "discriminators": self.disc.state_dict(),
                "g_opt": self.g_opt.state_dict(),
                "d_opt": self.d_opt.state_dict(),
            },
            directory / "train_state.pt",
        )

    def _resume(self) -> int:
        """The step of the latest complete checkpoint, its weights and optimiser states loaded (0: none)."""
        url = checkpoint.latest_checkpoint(self.train.output_dir) if self.train.resume else None
        if url is None:
            return 0
        _, state, _, _ = read_codec_state(io.join(url, "codec"))
        self.codec.load_state_dict(state, strict=False)
        raw = _stdio.BytesIO(io.read_bytes(io.join(url, "train_state.pt")))
        extra = torch.load(raw, map_location="cpu", weights_only=True)
        self.disc.load_state_dict(extra["discriminators"])
        self.g_opt.load_state_dict(extra["g_opt"])
        self.d_opt.load_state_dict(extra["d_opt"])
        log.info("resumed from %s (step %d)", url, extra["step"])
        return int(extra["step"])

    def _finish(self) -> None:
        """The closing evaluation and the final codec (rank 0)."""
        del self.batches  # stops the reader workers
        if distributed.is_main():
            final = self.resynthesis(self.codec) if self.resynthesis is not None else {}
            self.scalars.log(self.step, eval_mel_loss=self._eval_mel_loss(), unreadable_files=len(self.unreadable),
                             **final)
            self.codec.eval().save(io.join(self.train.output_dir, "final"))
            log.info("final codec at %s", io.join(self.train.output_dir, "final"))
        distributed.barrier()
        distributed.shutdown()


def run(config: TrainerConfig) -> int:
    train = config.codec.train
    if train.run_name:
        train = train.model_copy(update={"output_dir": io.join(train.output_dir, train.run_name)})
    distributed.init(config.training.process_group_timeout_s)
    device = distributed.device()
    torch.manual_seed(train.seed)
    metrics.serve(config.metrics.port, config.metrics.address)
    scalars = metrics.ScalarLog(io.join(train.output_dir, "metrics.jsonl"), "codec-train")
    clips, gan = _build(config, train, device)
    if config.dry_run:
        return _dry_run(clips, gan, train, random.Random(train.seed), device)
    return CodecTrainer(config, train, clips, gan, scalars).fit()
