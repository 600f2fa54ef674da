"""The pipeline as PyTorchJob pods on the real node: every stage's pods run the CPU image to Succeeded,
SFT's Master and Worker form one DDP group over gloo from the env the operator stand-in injects, `ttsctl
status` / `ttsctl logs` work while it runs; then faults on real pods: a Worker deleted mid-SFT (the group
re-forms, SFT resumes from its checkpoint to the same final step), a stage that exits non-zero (its job
fails with the pod's message), the rollout pod deleted mid-GRPO (its Deployment replaces it, the trainer
waits, re-publishes the policy and finishes), and nothing of the completed stages is lost."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Kube
from node import NODE_NAME, REPO, Node, example_workspace
from operator_standin import Operator

pytestmark = pytest.mark.cluster

NAMESPACE = "tts"
RUN = "ci-cluster"
SFT_STEPS = 6


def spec(workdir: Path, name: str, sft_overrides: list[str], data_run: str = RUN,
         rlhf_overrides: tuple[str, ...] = ()) -> Path:
    """example/cluster.yaml, shortened: stage configs by absolute path, SFT (and GRPO) cut to a few steps."""
    doc = yaml.safe_load((REPO / "example" / "cluster.yaml").read_text())
    doc["name"] = name
    doc["storage"] = {"data": f"runs/{data_run}/data", "checkpoints": f"runs/{name}/checkpoints",
                      "outputs": f"runs/{name}"}
    for stage in doc["stages"].values():
        if "config" in stage:
            stage["config"] = str(REPO / "example" / stage["config"])
    doc["stages"]["sft"]["overrides"] = sft_overrides
    doc["stages"]["rlhf"]["overrides"] = list(rlhf_overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def workspace(node: Node, operator: Operator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = example_workspace(tmp_path_factory.mktemp("workspace"))
    node.prepare_namespace(NAMESPACE, "tts-workspace", path)
    return path


def job(kube: Kube, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("-n", NAMESPACE, "get", "pytorchjob", name, "-o", "json"))


def pods(kube: Kube, job_name: str) -> list[dict[str, Any]]:
    out = kube.kubectl("-n", NAMESPACE, "get", "pods", "-l", f"training.kubeflow.org/job-name={job_name}",
                       "-o", "json")
    return sorted(json.loads(out)["items"], key=lambda p: p["metadata"]["name"])


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def wait_for(what: str, check: Any, timeout: float = 600, every: float = 1.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps_logged(workspace: Path, run: str, stage: str = "sft") -> list[int]:
    """The steps a stage logged, in order, across every attempt (metrics.jsonl of the run's stage)."""
    files = sorted((workspace / "runs" / run / "checkpoints" / stage).glob("**/metrics.jsonl"))
    steps = []
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row and "step" in row:
                steps.append(int(row["step"]))
    return steps


def test_the_pipeline_runs_as_pods_and_sft_is_one_ddp_group_of_two_pods(
        node: Node, kube: Kube, workspace: Path, tmp_path: Path) -> None:
    path = spec(tmp_path, RUN, [f"training.max_steps={SFT_STEPS}", "checkpointing.save_steps=3"])
    log = tmp_path / "run.log"
    run = kube.ttsctl_bg("run", str(path), "--backend", "kubeflow", "--stages", "vectorize,merge,sft", log=log)
    # While it runs: status and logs go through the API server to the real kubelet.
    wait_for("the SFT pods to run", lambda: any(p["status"].get("phase") == "Running"
                                                for p in pods(kube, f"{RUN}-sft")), timeout=900)
    status = kube.ttsctl("status", RUN, "--backend", "kubeflow", "-n", NAMESPACE)
    assert status.returncode == 0 and re.search(r"vectorize: Succeeded", status.stdout), status.stdout
    assert re.search(r"sft: (Running|Pending)", status.stdout), status.stdout
    logs = wait_for("SFT's log", lambda: kube.ttsctl("logs", RUN, "--stage", "sft", "--backend", "kubeflow",
                                                     "-n", NAMESPACE).stdout.strip(), timeout=300)
    assert logs
    assert run.wait(timeout=1800) == 0, log.read_text()[-4000:]

    for stage in ("vectorize", "merge", "sft"):
        conditions = {c["type"]: c for c in job(kube, f"{RUN}-{stage}")["status"]["conditions"]}
        assert conditions["Succeeded"]["status"] == "True", conditions
        assert conditions["Succeeded"]["message"] == f"PyTorchJob {RUN}-{stage} is successfully completed."
    master, worker = pods(kube, f"{RUN}-sft")
    assert [master["metadata"]["name"], worker["metadata"]["name"]] == [f"{RUN}-sft-master-0", f"{RUN}-sft-worker-0"]
    for pod in (master, worker):
        assert pod["status"]["phase"] == "Succeeded" and pod["spec"]["nodeName"] == NODE_NAME
        (main,) = [c for c in pod["status"]["containerStatuses"] if c["name"] == "pytorch"]
        assert main["image"].endswith("ghcr.io/speechlm/tts-cpu:dev") and main["containerID"].startswith("containerd://")
    # The env the training operator injects, which torchrun reads (PET_*) to form the group.
    for pod, rank in ((master, "0"), (worker, "1")):
        env = env_of(pod)
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == f"{RUN}-sft-master-0"
        assert env["WORLD_SIZE"] == env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1"
        assert env["RANK"] == env["PET_NODE_RANK"] == rank and env["MASTER_PORT"] == "23456"
    assert [c["name"] for c in worker["spec"]["initContainers"]] == ["init-pytorch"]
    # One DDP group of two processes: the master's trainer says so, and both pods trained every step.
    master_log = kube.kubectl("-n", NAMESPACE, "logs", master["metadata"]["name"], "-c", "pytorch")
    assert f"training {SFT_STEPS} steps from step 0 (ddp, 2 process(es)" in master_log, master_log[-3000:]
    services = json.loads(kube.kubectl("-n", NAMESPACE, "get", "services", "-l",
                                       f"training.kubeflow.org/job-name={RUN}-sft", "-o", "json"))["items"]
    assert sorted(s["metadata"]["name"] for s in services) == [f"{RUN}-sft-master-0", f"{RUN}-sft-worker-0"]
    assert all(s["spec"]["clusterIP"] == "None" for s in services)
    final = workspace / "runs" / RUN / "checkpoints"
    assert list(final.glob("**/final_model/model.safetensors")), sorted(p.name for p in final.rglob("*"))[:40]
    assert sorted(set(steps_logged(workspace, RUN))) == list(range(1, SFT_STEPS + 1))


def events(kube: Kube, name: str) -> list[dict[str, Any]]:
    out = kube.kubectl("-n", NAMESPACE, "get", "events", "--field-selector", f"involvedObject.name={name}",
                       "-o", "json")
    return json.loads(out)["items"]


def files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_worker_deleted_mid_sft_is_recreated_and_sft_resumes_to_the_same_final_step(
        node: Node, kube: Kube, workspace: Path, tmp_path: Path) -> None:
    run, steps = "ci-fault", 16
    data = files(workspace / "runs" / RUN / "data")
    assert data, "the first test's vectorized data"
    path = spec(tmp_path, run, [f"training.max_steps={steps}", "checkpointing.save_steps=4"])
    log = tmp_path / "run.log"
    proc = kube.ttsctl_bg("run", str(path), "--backend", "kubeflow", "--stages", "sft", log=log)
    wait_for("SFT past step 5", lambda: max(steps_logged(workspace, run), default=0) >= 5, timeout=900)
    master_uid = json.loads(kube.kubectl("-n", NAMESPACE, "get", "pod", f"{run}-sft-master-0", "-o", "json"))[
        "metadata"]["uid"]
    # A preempted / drained worker: the kubelet SIGTERMs it, both trainers stop at the same step and save.
    kube.kubectl("-n", NAMESPACE, "delete", "pod", f"{run}-sft-worker-0", "--wait=false")
    assert proc.wait(timeout=1800) == 0, log.read_text()[-4000:]

    conditions = {c["type"]: c for c in job(kube, f"{run}-sft")["status"]["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    seen = [(e["reason"], e["message"]) for e in events(kube, f"{run}-sft")]
    assert ("ExitedWithCode", f"Pod: {NAMESPACE}.{run}-sft-master-0 exited with code 143") in seen, seen
    assert any(reason == "PyTorchJobRestarting" for reason, _ in seen), seen
    master = json.loads(kube.kubectl("-n", NAMESPACE, "get", "pod", f"{run}-sft-master-0", "-o", "json"))
    assert master["metadata"]["uid"] != master_uid  # recreated under its name by the operator
    resumed = re.search(rf"training {steps} steps from step (\d+) \(ddp, 2 process", kube.kubectl(
        "-n", NAMESPACE, "logs", f"{run}-sft-master-0", "-c", "pytorch"))
    assert resumed and 5 <= int(resumed.group(1)) < steps
    logged = steps_logged(workspace, run)
    assert max(logged) == steps and sorted(set(logged)) == list(range(1, steps + 1))
    assert list((workspace / "runs" / run / "checkpoints").glob("**/final_model/model.safetensors"))
    assert files(workspace / "runs" / RUN / "data") == data  # the completed stages' outputs are intact


def test_a_stage_that_exits_non_zero_fails_its_job_with_the_pods_message(kube: Kube, workspace: Path,
                                                                        tmp_path: Path) -> None:
    run = "ci-broken"
    path = spec(tmp_path, run, ["training.max_steps=2"])
    doc = yaml.safe_load(path.read_text())
    doc["storage"]["data"] = "runs/no-such-run/data"  # SFT's training data is not there
    path.write_text(yaml.safe_dump(doc))
    result = kube.ttsctl("run", str(path), "--backend", "kubeflow", "--stages", "sft")
    assert result.returncode != 0
    status = kube.ttsctl("status", run, "--backend", "kubeflow", "-n", NAMESPACE)
    assert re.search(r"sft: Failed", status.stdout), status.stdout
    assert f'job "{run}-sft" is failing because "Master" replica(s) failed.' in status.stdout, status.stdout
    # The pod's own message (its termination message: the last log lines), not only that it failed.
    assert re.search(rf"pod {run}-sft-master-0 exited with [12]: error: .*no-such-run", status.stdout), status.stdout
    # 1-127 is final under the ExitCode policy: no retry, the master ran once.
    assert [e["reason"] for e in events(kube, f"{run}-sft")].count("SuccessfulCreatePod") == 2  # master + worker


RELOADED = '"POST /collective_rpc HTTP/1.1" 200'


def rollout_pods(kube: Kube, name: str) -> list[dict[str, Any]]:
    deployment = json.loads(kube.kubectl("-n", NAMESPACE, "get", "deployment", name, "-o", "json"))
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    return json.loads(kube.kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json"))["items"]


def ready(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_grpo_samples_from_the_cpu_rollout_deployment_and_outlives_its_pod(
        node: Node, kube: Kube, workspace: Path, tmp_path: Path) -> None:
    """RLHF as on a GPU cluster, on CPU: the trainer job samples from vLLM's CPU build (images/rollout-cpu)
    as a Deployment behind a headless Service, reached by name, weights synced through the workspace claim.
    The rollout pod deleted mid-GRPO: the Deployment replaces it, the trainer waits for it, re-publishes
    the policy to it and finishes every step."""
    steps = 4
    sft_final = workspace / "runs" / RUN / "checkpoints" / "sft"
    assert list(sft_final.glob("**/final_model/model.safetensors")), "the first test's SFT model"
    sft_files = files(sft_final)
    path = spec(tmp_path, RUN, [f"training.max_steps={SFT_STEPS}", "checkpointing.save_steps=3"],
                rlhf_overrides=(f"training.max_steps={steps}", "checkpointing.save_steps=2",
                                "rlhf_training.vllm_server_timeout_s=900"))
    log = tmp_path / "run.log"
    proc = kube.ttsctl_bg("run", str(path), "--backend", "kubeflow", "--stages", "export-sft,rlhf", log=log)
    name = f"{RUN}-rollout"
    wait_for("GRPO's second step", lambda: max(steps_logged(workspace, RUN, "rlhf"), default=0) >= 2
             or proc.poll() is not None, timeout=1500, every=2)
    assert proc.poll() is None, log.read_text()[-4000:]
    (first,) = [p for p in rollout_pods(kube, name) if ready(p)]
    (server,) = first["spec"]["containers"]
    assert server["image"] == "ghcr.io/speechlm/tts-rollout-cpu:dev"
    assert "nvidia.com/gpu" not in (server.get("resources", {}).get("limits") or {})
    served = kube.kubectl("-n", NAMESPACE, "logs", first["metadata"]["name"])
    # vLLM's access log: the trainer reloaded its policy there and sampled from it.
    assert RELOADED in served and '"POST /v1/completions HTTP/1.1" 200' in served, served[-3000:]
    # Deleted as a drain would: the ReplicaSet makes a new pod; the trainer waits for it and re-syncs.
    kube.kubectl("-n", NAMESPACE, "delete", "pod", first["metadata"]["name"], "--wait=false")
    second = wait_for("the replacement rollout pod to be ready", lambda: [
        p for p in rollout_pods(kube, name) if ready(p) and p["metadata"]["uid"] != first["metadata"]["uid"]],
        timeout=900, every=2)[0]
    wait_for("the policy re-published to the new server", lambda: RELOADED in kube.kubectl(
        "-n", NAMESPACE, "logs", second["metadata"]["name"], check=False) or proc.poll() is not None,
        timeout=900, every=2)
    assert proc.wait(timeout=1800) == 0, log.read_text()[-4000:]

    conditions = {c["type"]: c for c in job(kube, f"{RUN}-rlhf")["status"]["conditions"]}
    assert conditions["Succeeded"]["status"] == "True", conditions
    trainer_log = kube.kubectl("-n", NAMESPACE, "logs", f"{RUN}-rlhf-master-0", "-c", "pytorch")
    assert "rollout server unreachable" in trainer_log, trainer_log[-4000:]
    assert "the rollout server restarted (it serves its startup weights)" in trainer_log, trainer_log[-4000:]
    assert sorted(set(steps_logged(workspace, RUN, "rlhf"))) == list(range(1, steps + 1))
    assert list((workspace / "runs" / RUN / "checkpoints" / "rlhf").glob("**/final_model/model.safetensors"))
    assert (workspace / "runs" / RUN / "export" / "sft" / "config.json").is_file()
    assert files(sft_final) == sft_files  # the completed stage's outputs are intact
    # The stage's rollout server goes with it.
    assert not kube.kubectl("-n", NAMESPACE, "get", "deployment", name, "--ignore-not-found").strip()
