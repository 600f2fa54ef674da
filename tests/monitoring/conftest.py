"""One observed session for the monitoring suite: a real Prometheus (Debian's 2.42, on 127.0.0.1) scrapes
real short runs of every stage that exports metrics, with the scrape configuration our chart's
PodMonitor/ServiceMonitor make prometheus-operator write, and evaluates our chart's alerting rules.

Timeline (one process per stage, as one pod per stage in a cluster; the vLLM rollout server starts first,
as its Deployment does):
  codec-train -> vectorize (pushes its summary to a real Pushgateway) -> sft -> sft of a second release
  whose learning rate makes its loss NaN -> rlhf with rollouts on the vLLM server, which is killed after
  a few GRPO steps; the trainer waits for it (its progress stops), then fails.
Run `full` is every stage of one release; run `diverged` is the NaN run of a second release."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_schemas.validate import helm_template
from monitoring.operator_config import EndpointTarget, PodTarget, pod_monitor_jobs, service_monitor_jobs
from monitoring.prometheus import Prometheus, Pushgateway, install
from speech_fixtures import make_codec, make_dataset, make_model
from speechlm_fixtures import sft_config, write_vectorized

from trainer.cli import main as tts_train
from trainer.serve.vllm_server import VllmServer, free_port

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "tts"
RUN, DIVERGED = "full", "diverged"
SCRAPE_S = 1.0
# Alert windows scaled to seconds (the chart's defaults are minutes); evaluated every second.
ALERT_VALUES = ["monitoring.alerts.stalledWindow=20s", "monitoring.alerts.stalledFor=10s",
                "monitoring.alerts.rolloutDownFor=5s", "monitoring.alerts.lossNotFiniteFor=2s"]
RL_STEPS_BEFORE_KILL = 3
SERVER_WAIT_S = 60  # how long the GRPO trainer waits for a vanished rollout server before it fails
CODEC_TINY = [
    "codec.model.fsq_levels=[4,4,4,4]", "codec.model.encoder_channels=4", "codec.model.encoder_dim=64",
    "codec.model.encoder_antialias=false", "codec.model.quantizer_dim=64", "codec.model.decoder_dim=64",
    "codec.model.decoder_layers=2", "codec.model.decoder_heads=4",
]


@dataclass
class StageRun:
    run: str
    stage: str
    start: float
    end: float
    returncode: int


@dataclass
class Observed:
    prometheus: Prometheus
    promtool: Path
    rules_file: Path
    runs: list[StageRun]
    server_killed_at: float
    pushed_at: float  # the vectorize summary reached the Pushgateway
    end: float
    renders: dict[str, list[dict[str, Any]]]
    scrape_s: float = SCRAPE_S

    def window(self, stage: str, run: str = RUN) -> tuple[float, float]:
        (found,) = [(r.start, r.end) for r in self.runs if r.stage == stage and r.run == run]
        return found

    @property
    def start(self) -> float:
        return min(r.start for r in self.runs)


def render(release: str) -> list[dict[str, Any]]:
    """The chart as a user installs it: every stage, the monitors (scraping every second here), the rules."""
    extra = ["--set", f"runName={release}", "--set", "monitoring.podMonitor.interval=1s",
             "--set", "monitoring.serviceMonitor.interval=1s"]
    for value in ALERT_VALUES:
        extra += ["--set", value]
    _, objects = helm_template([REPO / "charts" / "tts-training" / "ci" / "full-pipeline-values.yaml"],
                               release=release, namespace=NAMESPACE, extra=extra)
    return objects


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    return found


def pod_target(objects: list[dict[str, Any]], run: str, stage: str, port: int) -> PodTarget:
    """The Master pod the training operator makes from the stage's PyTorchJob, scraped at 127.0.0.1:port."""
    job = one(objects, "PyTorchJob", f"{run}-{stage}")
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    (container,) = template["spec"]["containers"]
    (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
    return PodTarget(f"127.0.0.1:{port}", NAMESPACE, f"{job['metadata']['name']}-master-0", container["name"],
                     metrics["name"], metrics["containerPort"], template["metadata"]["labels"])


def rollout_target(objects: list[dict[str, Any]], port: int) -> EndpointTarget:
    deployment = one(objects, "Deployment", "-rollout")
    service = one(objects, "Service", "-rollout")
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    pod = PodTarget(f"127.0.0.1:{port}", NAMESPACE, f"{deployment['metadata']['name']}-6d5f7c9b8-x4k2p",
                    container["name"], http["name"], http["containerPort"], template["metadata"]["labels"])
    (service_port,) = [p for p in service["spec"]["ports"] if p["targetPort"] == "http"]
    return EndpointTarget(pod, service["metadata"]["name"], service["metadata"]["labels"], service_port["name"])


def _metric_value(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else None


@dataclass
class Running:
    run: str
    stage: str
    process: subprocess.Popen
    log: Path
    started: float


class Stages:
    """Runs `python -m trainer <stage>` processes with their metrics on given ports; records windows."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.runs: list[StageRun] = []
        self.started: list[Running] = []

    def start(self, run: str, stage: str, args: list[str], port: int) -> Running:
        log = self.workdir / f"{run}-{stage}.log"
        cmd = [sys.executable, "-m", "trainer", *args, "--set", f"metrics.port={port}"]
        with log.open("w") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.started.append(Running(run, stage, process, log, time.time()))
        return self.started[-1]

    def finish(self, running: Running, expect_ok: bool = True) -> StageRun:
        returncode = running.process.wait(600)
        if expect_ok:
            assert returncode == 0, f"{running.run}/{running.stage} failed: {running.log.read_text()[-3000:]}"
        record = StageRun(running.run, running.stage, running.started, time.time(), returncode)
        self.runs.append(record)
        return record

    def run(self, run: str, stage: str, args: list[str], port: int) -> StageRun:
        return self.finish(self.start(run, stage, args, port))

    def kill_leftovers(self) -> None:
        """A failed set-up leaves no stage process behind (nor its metrics port)."""
        for running in self.started:
            if running.process.poll() is None:
                running.process.kill()
                running.process.wait()


def _sets(settings: dict[str, Any]) -> list[str]:
    return [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _manifest(root: Path, copies: int) -> Path:
    """The example manifest (absolute paths) repeated `copies` times under new ids, after one corrupt and
    one missing file: the rejects and unreadable-file panels need real rejects (early, to be scraped)."""
    source = REPO / "example" / "configs" / "samples.jsonl"
    records = [json.loads(x) for x in source.read_text().splitlines()[:12]]
    lines = []
    for copy in range(copies):
        for rec in records:
            lines.append({**rec, "id": f"{rec['id']}-{copy}",
                          "wav_path": str((source.parent / rec["wav_path"]).resolve())})
    (root / "corrupt.flac").write_bytes(b"not audio at all")
    lines[:0] = [{**lines[0], "id": "bad", "wav_path": str(root / "corrupt.flac")},
                 {**lines[0], "id": "gone", "wav_path": str(root / "missing.flac")}]
    path = root / "samples.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return path


@pytest.fixture(scope="session")
def observed(tmp_path_factory, vllm_python) -> Observed:
    work = tmp_path_factory.mktemp("monitoring")
    bin_dir = install()
    renders = {RUN: render(RUN), DIVERGED: render(DIVERGED)}
    ports = {name: free_port() for name in ("codec", "vectorize", "sft", "rlhf", "diverged", "vllm")}
    full = renders[RUN]

    # What the operator would write: one job per monitor of each release, their pods as static targets.
    jobs = pod_monitor_jobs(one(full, "PodMonitor"), [
        pod_target(full, RUN, stage, ports[stage]) for stage in ("codec", "vectorize", "sft", "rlhf")])
    jobs += service_monitor_jobs(one(full, "ServiceMonitor"), [rollout_target(full, ports["vllm"])])
    jobs += pod_monitor_jobs(one(renders[DIVERGED], "PodMonitor"),
                             [pod_target(renders[DIVERGED], DIVERGED, "sft", ports["diverged"])])
    with contextlib.ExitStack() as cleanup:  # nothing outlives the session, also when set-up fails
        pushgateway = Pushgateway(bin_dir, work)
        cleanup.callback(pushgateway.stop)
        # The Pushgateway is the user's own (not in our chart): scraped as its docs say, honouring pushed labels.
        jobs.append({"job_name": "pushgateway", "honor_labels": True, "scrape_interval": "1s",
                     "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]})
        rules = {"groups": [group for release in renders.values()
                            for group in one(release, "PrometheusRule")["spec"]["groups"]]}
        rules_file = work / "rules.yml"
        rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "rule_files": [str(rules_file)], "scrape_configs": jobs}
        prometheus = Prometheus(bin_dir, work, config)
        cleanup.callback(prometheus.stop)
        stages = Stages(work)
        cleanup.callback(stages.kill_leftovers)

        # Inputs: a tiny codec, an exported tiny SFT model, vectorized data for SFT and GRPO.
        codec = make_codec(work / "codec")
        model = make_model(work / "sft-model", codec, varied=True)
        export = work / "export"
        assert tts_train(["export", "--checkpoint_path", str(model), "--output_path", str(export)]) == 0
        rl_data = make_dataset(work / "rl-data", codec)
        sft_data = write_vectorized(work / "sft-data")

        server = VllmServer(vllm_python, str(export), ports["vllm"], max_model_len=2048, log_path=work / "vllm.log")
        cleanup.callback(server.stop)
        server_up = threading.Thread(target=server.start)
        server_up.start()
        manifest = _manifest(work, copies=1)
        stages.run(RUN, "codec", ["codec-train", *_sets({
            "codec.train.dataset_path": str(manifest), "codec.train.output_dir": str(work / "codec-out"),
            "codec.train.max_steps": 80, "codec.train.batch_size": 4, "codec.train.segment_seconds": 0.4,
            "codec.train.precision": "fp32", "codec.train.log_steps": 5, "codec.train.mpd_periods": [2, 3],
            "codec.train.stft_disc_fft_sizes": [206, 542], "codec.train.disc_channels": 8,
            "codec.train.eval_clips": 2}), *(a for s in CODEC_TINY for a in ("--set", s))], ports["codec"])
        (work / "vectorize-in").mkdir()
        vectorize = stages.run(RUN, "vectorize", ["vectorize", *_sets({
            "vectorize.dataset_path": str(_manifest(work / "vectorize-in", copies=20)),
            "vectorize.output_dir": str(work / "vectorized"), "vectorize.codec_model_path": str(codec),
            "vectorize.batch_size": 4, "vectorize.num_workers": 0, "vectorize.sort_window": 16,
            "vectorize.run_name": f"{RUN}-vectorize",
            "vectorize.pushgateway_url": f"127.0.0.1:{pushgateway.port}"})], ports["vectorize"])
        sft = sft_config(sft_data, work / "sft-out", max_steps=600, logging_steps=1, eval_steps=50)
        sft["checkpointing"]["save_steps"] = 50
        (work / "sft.json").write_text(json.dumps(sft))
        stages.run(RUN, "sft", ["sft", "--config", str(work / "sft.json")], ports["sft"])
        # A learning rate far past stable: the loss turns NaN within steps, and the run keeps going.
        diverged = sft_config(sft_data, work / "diverged-out", max_steps=400, logging_steps=1,
                              learning_rate=1e12, warmup_steps=0)
        (work / "diverged.json").write_text(json.dumps(diverged))
        stages.run(DIVERGED, "sft", ["sft", "--config", str(work / "diverged.json")], ports["diverged"])

        server_up.join()
        assert server.healthy(), (work / "vllm.log").read_text()[-3000:]
        trainer = stages.start(RUN, "rlhf", ["rlhf", *_sets({
            "rlhf_training.base_model_dir": str(export), "train_weighted_datasets": {str(rl_data): 1.0},
            "val_weighted_datasets": {str(rl_data): 1.0}, "rlhf_training.use_vllm": True,
            "rlhf_training.vllm_server_port": ports["vllm"],
            "rlhf_training.vllm_server_timeout_s": SERVER_WAIT_S,
            "rlhf_training.num_generations": 2, "rlhf_training.per_device_train_batch_size": 2,
            "rlhf_training.max_completion_length": 16, "rlhf_training.min_completion_length": 2,
            "rlhf_training.reward_funcs": ["SimilarityRewardFunc"],
            "rlhf_training.mask_truncated_completions": False,
            "rlhf_training.guard_rail_steps": 1000, "training.max_steps": 100, "training.logging_steps": 1,
            "training.precision": "fp32", "training.output_dir": str(work / "rl-out"), "training.run_name": "rl",
            "checkpointing.save_steps": 1})], ports["rlhf"])
        deadline = time.monotonic() + 600
        while (_metric_value(ports["rlhf"], "speechlm_rl_steps_total") or 0) < RL_STEPS_BEFORE_KILL:
            assert trainer.process.poll() is None and time.monotonic() < deadline, trainer.log.read_text()
            time.sleep(0.5)
        time.sleep(8 * SCRAPE_S)  # scrapes of the healthy state
        killed = time.time()
        server.stop()
        failed = stages.finish(trainer, expect_ok=False)
        assert failed.returncode != 0, "the trainer went on without its rollout server"
        time.sleep(3 * SCRAPE_S)
        yield Observed(prometheus, bin_dir / "promtool", rules_file, stages.runs, killed, vectorize.end, time.time(),
                       renders)
