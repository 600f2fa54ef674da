"""The SFT loop: build model and data, train with accumulation/clipping/schedule, evaluate, checkpoint,
resume, stop cleanly on SIGTERM. Strategy-specific work lives in `trainer.train.parallel`.

Loss normalisation: every micro-batch's summed CE is divided by the number of labelled tokens of the
whole GLOBAL step (all micro-batches, all ranks), times world size (DDP/FSDP average gradients over
ranks). The step's gradient is then exactly that of the global token-mean loss, so 1 process and N
processes with the same global batch follow the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trainer import distributed, io, metrics
from trainer.config import TrainerConfig
from trainer.data.dataset import Batch, PackedData, SamplerState
from trainer.errors import ConfigError, StageError
from trainer.model.attention import resolve_backend, use_packed_attention
from trainer.model.build import build_speechlm, save_speechlm
from trainer.model.lora import added_token_rows, apply_lora, merge_lora_state_dict
from trainer.model.prompt import PromptFormat
from trainer.train import checkpoint, telemetry
from trainer.train.objective import SpeechLMObjective
from trainer.train.parallel import build_strategy
from trainer.train.schedule import build_scheduler

log = logging.getLogger(__name__)


def _advise(config: TrainerConfig) -> None:
    """Settings that run, but not as a user may expect (the hard checks are sft.problems)."""
    t, p = config.training, config.modeling.parameters
    if t.packing and p.max_seq_len > t.pack_length:
        log.info("max_seq_len %d > pack_length %d: samples longer than a row are skipped", p.max_seq_len, t.pack_length)
    if t.precision == "bf16" and not torch.cuda.is_available():
        log.warning("bf16 on CPU is slow and its numerics differ from GPU; use precision fp32 for CPU runs")


def compile_layers(lm: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile each decoder layer: one graph for every layer and every (rows, length, documents) shape,
    from dynamic shapes without duck sizing; per-document attention runs eager inside it."""
    torch.fx.experimental._config.use_duck_shape = False
    for layer in lm.model.layers:
        layer.compile(dynamic=True, backend=backend)


@dataclass
class StepStats:
    loss: float
    lr: float  # the learning rate this step's update used
    real_tokens: int
    labelled_tokens: int
    sum_sq_lengths: int
    stop: bool


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class SFTTrainer:
    def __init__(self, config: TrainerConfig):
        self.config = config
        t, p = config.training, config.modeling.parameters
        self.t, self.p = t, p
        _advise(config)
        distributed.init(t.process_group_timeout_s)
        self.device = distributed.device()
        self.world = distributed.world_size()
        self.run_url = checkpoint.run_url(t)
        self.resume_url, self.weights_only = self._resume_source()
        torch.manual_seed(t.seed)
        self.strategy = build_strategy(t.strategy, t, self.device, config.modeling.lora.enabled)

        lm, self.tokenizer, self.vocab = build_speechlm(p.model_name, p.codebook_size, p.prompt_format, seed=t.seed)
        if t.precision == "bf16":
            lm.config.torch_dtype = torch.bfloat16  # serving dtype; master weights stay fp32
        if self.resume_url and (
            self.weights_only or (not self.strategy.resume_has_model and not config.modeling.lora.enabled)
        ):
            weights = load_file(str(checkpoint.local_copy(self.resume_url) / "model.safetensors"))
            lm.load_state_dict(weights, strict=False)  # tied head is absent from the file
        self.base_lm = lm
        if config.modeling.lora.enabled:
            lm = apply_lora(lm, config.modeling.lora, self.vocab)
        if t.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.backend = resolve_backend(p.attn_implementation, self.device)
        use_packed_attention(self.base_lm)
        if t.compile_model:
            compile_layers(self.base_lm)

        prompt = PromptFormat(self.tokenizer, self.vocab, p.enable_text_normalization,
                              label_speech_start=p.loss_vocab == "full")
        common = dict(
            max_seq_len=p.max_seq_len, pack_length=t.pack_length, batch_size=t.batch_size, packing=t.packing,
            seed=t.seed, rank=distributed.rank(), world_size=self.world, codebook_size=p.codebook_size,
            dataset_filter=config.dataset,
        )
        self.train_data = PackedData(config.train_weighted_datasets, "train", prompt, **common)
        self.val_data = (
            PackedData(config.val_weighted_datasets, "val", prompt, **common) if config.val_weighted_datasets else None
        )
        self._report_data()
        steps_per_epoch = self.train_data.batches_per_epoch(0) // t.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the training data gives {self.train_data.batches_per_epoch(0)} micro-batches per epoch, fewer "
                f"than gradient_accumulation_steps={t.gradient_accumulation_steps}"
            )
        self.total_steps = 1 if config.dry_run else (t.max_steps or t.num_epochs * steps_per_epoch)

        objective = SpeechLMObjective(
            lm, self.vocab, self.backend, p.loss_vocab, p.loss_chunk_size, t.audio_input_noise
        )
        self.module, self.optimizer = self.strategy.setup(objective)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
        self.flops = telemetry.FlopCounter(
            self.base_lm, self.vocab.codebook_size + 1 if p.loss_vocab == "audio" else self.vocab.vocab_size
        )
        self.peak = telemetry.peak_flops(self.device)
        self.step = 0
        self.sampler = SamplerState()
        if self.resume_url and not self.weights_only:
            self._load_resume()
        elif self.weights_only:
            log.info("started from the model weights of %s (optimiser, schedule and data order fresh)",
                     self.resume_url)
        # A resumed run keeps competing with the best model it already published; a new run starts afresh.
        resumed = self.resume_url is not None and not self.weights_only
        self.best_loss = (checkpoint.best_measure(self.run_url, "eval_loss")
                          if config.checkpointing.save_best and resumed else None)
        self._stop = distributed.StopRequest()
        self.scalars = metrics.ScalarLog(io.join(self.run_url, "metrics.jsonl"), "sft")
        self.wandb = self._init_wandb()

    # ------------------------------------------------------------------------------------ setup
    def _resume_source(self) -> tuple[str | None, bool]:
        """(checkpoint to resume from, whether to take only its model weights)."""
        ck = self.config.checkpointing
        explicit = ck.checkpoint_file_to_resume_from
        own = checkpoint.latest_checkpoint(self.run_url) if ck.resume == "auto" and not self.config.dry_run else None
        if explicit:
            if not io.is_complete(explicit):
                raise ConfigError(
                    f"checkpointing.checkpoint_file_to_resume_from: {explicit!r} is not a complete checkpoint"
                )
            if ck.only_load_model_weights:
                # Weights are the run's starting point; once the run has checkpoints of its own, a restart
                # resumes those (else a preempted fine-tune would start over).
                return (own, False) if own else (explicit, True)
            return explicit, False
        return own, False

    def _report_data(self) -> None:
        for data in (self.train_data, self.val_data):
            if data is None:
                continue
            data.rows(0)
            telemetry.SKIPPED.labels(split=data.split).set(data.skipped)
            if data.stats is not None:
                telemetry.PACKING.labels(split=data.split).set(data.stats.efficiency)
                log.info(
                    "%s: %d samples in %d rows of %d tokens, packing efficiency %.1f%%, %d skipped",
                    data.split, data.stats.samples, data.stats.rows, data.row_length,
                    100 * data.stats.efficiency, data.skipped,
                )

    def _init_wandb(self):
        if not self.t.use_wandb or not distributed.is_main():
            return None
        try:
            # lazy: optional, only with training.use_wandb
            import wandb
        except ImportError:
            log.warning("--use_wandb was given but wandb is not installed (pip install wandb): not logging to W&B")
            return None
        return wandb.init(name=self.t.run_name, project=self.t.project_name,
                          config=self.config.model_dump(mode="json"))

    def _resharded_sampler(self, state: dict) -> SamplerState:
        """The saved data position for this run's layout. Ranks take consecutive rows, so the position
        is a number of rows consumed in the epoch; another world size or batch size continues exactly
        there when its rows per micro-batch divide that number, and is refused otherwise (it would
        skip or repeat data)."""
        saved = SamplerState(**state["sampler"])
        old_world, old_batch = state["world_size"], state.get("batch_size", self.t.batch_size)
        old, new = old_world * old_batch, self.world * self.t.batch_size
        if old == new:
            return saved
        consumed = saved.batch * old
        if consumed % new:
            raise ConfigError(
                f"resume from {self.resume_url}: the checkpoint was written by {old_world} process(es) x "
                f"batch_size {old_batch} after {consumed} rows of epoch {saved.epoch}; {self.world} process(es) "
                f"x batch_size {self.t.batch_size} = {new} rows per micro-batch cannot continue exactly there "
                f"(data would be skipped or repeated). Resume with a world size x batch_size that divides "
                f"{consumed}, or start a new run"
            )
        log.warning("resuming %d process(es) x %d rows from a %d x %d checkpoint: continuing at row %d of epoch %d",
                    self.world, self.t.batch_size, old_world, old_batch, consumed, saved.epoch)
        return SamplerState(saved.epoch, consumed // new)

    def _load_resume(self) -> None:
        local = checkpoint.local_copy(self.resume_url)
        state = json.loads((local / checkpoint.RESUME / "state.json").read_text())
        self.sampler = self._resharded_sampler(state)
        self.strategy.load_resume(self.module, self.optimizer, local / checkpoint.RESUME)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        rng = torch.load(local / checkpoint.RESUME / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", self.resume_url, self.step,
                 self.sampler.epoch, self.sampler.batch)

    # ------------------------------------------------------------------------------------ train
    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.strategy.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _train_step(self, micro: list[Batch]) -> StepStats:
        labelled = sum(b.labelled_tokens for b in micro)
        (global_labelled,) = _all_reduce([labelled], self.device)
        scale = self.world / max(global_labelled, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            batch = batch.to(self.device)
            with self.strategy.sync(self.module, last=i == len(micro) - 1), self.autocast():
                ce_sum, _ = self.module(batch)
            self.strategy.backward(self.module, ce_sum * scale)
            loss_sum += ce_sum.detach().double()
        lr = self.optimizer.param_groups[0]["lr"]
        self.grad_norm = self.strategy.step(self.module, self.optimizer)
        self.scheduler.step()  # sets the next update's rate
        real = sum(b.real_tokens for b in micro)
        sum_sq = sum(telemetry.doc_lengths_sq(b.doc_ids, b.targets) for b in micro)
        total_loss, real, sum_sq, stop = _all_reduce(
            [float(loss_sum), real, sum_sq, float(self._stop.requested)], self.device
        )
        return StepStats(
            total_loss / max(global_labelled, 1.0), lr, int(real), int(global_labelled), int(sum_sq), stop > 0
        )

    def micro_batches(self) -> Iterator[tuple[Batch, SamplerState]]:
        """This rank's training micro-batches from the resume position on, epoch after epoch, each with
        the position after it. `training.num_workers` DataLoader workers collate (read codes, format
        prompts, pack) ahead of the training thread, in order; pinned memory on GPU."""
        data, epoch, start = self.train_data, self.sampler.epoch, self.sampler.batch
        if self.t.num_workers:
            # Workers fork after the tokenizer's thread pool was used; keep them single-threaded.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        while True:
            n = data.batches_per_epoch(epoch)
            if n == 0:
                raise StageError(f"epoch {epoch} of the training data fills fewer rows than batch_size x world")
            loader = DataLoader(
                [data.micro_batch_rows(epoch, b) for b in range(start, n)], batch_size=None,
                collate_fn=data.collate, num_workers=self.t.num_workers, pin_memory=self.device.type == "cuda",
                worker_init_fn=distributed.leave_stop_signals_to_the_trainer,
            )
            for b, batch in enumerate(loader, start):
                yield batch, SamplerState(epoch, b + 1)
            epoch, start = epoch + 1, 0

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None:
            return None
        self.module.eval()
        loss_sum, count = 0.0, 0.0
        for batch in self.val_data.eval_batches():
            with self.autocast():
                ce_sum, n = self.module(batch.to(self.device))
            loss_sum += float(ce_sum)
            count += float(n)
        self.module.train()
        loss_sum, count = _all_reduce([loss_sum, count], self.device)
        return loss_sum / count if count else None

    def train(self) -> int:
        self._stop.install()
        metrics.serve(self.config.metrics.port, self.config.metrics.address)
        t = self.t
        accum = t.gradient_accumulation_steps
        batches = self.micro_batches()
        started = time.perf_counter()
        first_step = self.step
        log.info("training %d steps from step %d (%s, %d process(es), attention %s)",
                 self.total_steps, self.step, t.strategy, self.world, self.backend)
        while self.step < self.total_steps:
            tick = time.perf_counter()
            micro, sampler = [], self.sampler
            for _ in range(accum):
                batch, sampler = next(batches)
                micro.append(batch)
            stats = self._train_step(micro)
            self.step += 1
            self.sampler = sampler
            elapsed = time.perf_counter() - tick
            self._record(stats, elapsed, started, first_step)
            if self.val_data is not None and (self.step % t.eval_steps == 0 or self.step == self.total_steps):
                self._record_eval()
            if self.config.dry_run:
                log.info("dry run: one step done, loss %.4f; configuration, data and model are valid", stats.loss)
                return 0
            if stats.stop and self.step < self.total_steps:
                self.save_checkpoint()
                log.info("stopped by SIGTERM at step %d; checkpoint saved, the next run resumes from it", self.step)
                return distributed.STOPPED
            if self.step % self.config.checkpointing.save_steps == 0:
                self.save_checkpoint()
        self.save_final()
        return 0

    def _record(self, stats: StepStats, elapsed: float, started: float, first_step: int) -> None:
        lr = stats.lr
        tps = stats.real_tokens / elapsed if elapsed > 0 else 0.0
        flops = self.flops.flops(stats.real_tokens, stats.labelled_tokens, stats.sum_sq_lengths)
        mfu = flops / elapsed / (self.peak * self.world) if self.peak and elapsed > 0 else 0.0
        telemetry.TRAIN_LOSS.set(stats.loss)
        telemetry.TOKENS.inc(stats.real_tokens)
        telemetry.STEPS.inc()
        telemetry.LEARNING_RATE.set(lr)
        telemetry.STEP_SECONDS.observe(elapsed)
        telemetry.TOKENS_PER_SECOND.set(tps)
        telemetry.MFU.set(mfu)
        telemetry.GRAD_NORM.set(self.grad_norm)
        self.scalars.log(self.step, loss=stats.loss, lr=lr, tokens_per_second=tps, grad_norm=self.grad_norm, mfu=mfu)
        if self.wandb is not None:
            self.wandb.log({"train/loss": stats.loss, "train/lr": lr, "train/tokens_per_second": tps}, step=self.step)
        if distributed.is_main() and (self.step % self.t.logging_steps == 0 or self.step == 1):
            per_step = (time.perf_counter() - started) / max(self.step - first_step, 1)
            eta = per_step * (self.total_steps - self.step)
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f MFU %s ETA %s",
                self.step, self.total_steps, stats.loss, lr, self.grad_norm, tps,
                f"{100 * mfu:.1f}%" if self.peak else "n/a", time.strftime("%H:%M:%S", time.gmtime(eta)),
            )

    def _record_eval(self) -> None:
        loss = self.evaluate()
        if loss is None:
            return
        telemetry.EVAL_LOSS.set(loss)
        self.scalars.log(self.step, eval_loss=loss)
        if self.wandb is not None:
            self.wandb.log({"eval/loss": loss}, step=self.step)
        if distributed.is_main():
            log.info("step %d eval_loss %.4f", self.step, loss)
        if self.config.checkpointing.save_best and (self.best_loss is None or loss < self.best_loss):
            self.best_loss = loss
            self.save_best(loss)

    # ------------------------------------------------------------------------------- checkpoints
    def _hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = self.strategy.full_state_dict(self.module)  # collective
        if state is None:
            return None
        if self.config.modeling.lora.enabled:
            state = merge_lora_state_dict(state, self.config.modeling.lora, added_token_rows(self.vocab))
        if self.base_lm.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def _write_hf(self, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
        if distributed.is_main():
            save_speechlm(self.base_lm, self.tokenizer, self.vocab, directory, state_dict=state)

    def save_checkpoint(self) -> None:
        tick = time.perf_counter()
        state = self._hf_state_dict()

        def write(directory: Path) -> None:
            self._write_hf(directory, state)
            resume = directory / checkpoint.RESUME
            resume.mkdir(parents=True, exist_ok=True)
            self.strategy.save_resume(self.module, self.optimizer, resume)
            if distributed.is_main():
                (resume / "state.json").write_text(json.dumps({
                    "step": self.step, "sampler": self.sampler.to_dict(), "scheduler": self.scheduler.state_dict(),
                    "world_size": self.world, "batch_size": self.t.batch_size,
                }))
                torch.save({"cpu": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                           resume / "rng.pt")

        checkpoint.publish(checkpoint.checkpoint_url(self.run_url, self.step), write)
        checkpoint.prune(self.run_url, self.config.checkpointing.keep_only_last_n_checkpoints)
        telemetry.CHECKPOINT_OK.set(time.time())
        telemetry.CHECKPOINT_SECONDS.observe(time.perf_counter() - tick)
        if distributed.is_main():
            log.info("checkpoint step %d saved in %.1f s", self.step, time.perf_counter() - tick)

    def save_best(self, loss: float) -> None:
        state = self._hf_state_dict()
        record = {"step": self.step, "eval_loss": loss}

        def write(directory: Path) -> None:
            self._write_hf(directory, state)
            if distributed.is_main():
                (directory / checkpoint.BEST_RECORD).write_text(json.dumps(record))

        checkpoint.publish(io.join(self.run_url, checkpoint.BEST_MODEL), write)
        if distributed.is_main():
            log.info("best model so far (eval_loss %.4f at step %d) saved", loss, self.step)

    def save_final(self) -> None:
        state = self._hf_state_dict()
        url = io.join(self.run_url, checkpoint.FINAL_MODEL)
        checkpoint.publish(url, lambda directory: self._write_hf(directory, state))
        if distributed.is_main():
            log.info("final model: %s", url)


def train(config: TrainerConfig) -> int:
    try:
        trainer = SFTTrainer(config)
        code = trainer.train()
        if trainer.wandb is not None:
            trainer.wandb.finish()
        return code
    finally:
        distributed.shutdown()
