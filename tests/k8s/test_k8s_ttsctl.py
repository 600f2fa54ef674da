"""`ttsctl --backend kubeflow` end to end against a real kube-apiserver 1.20, running as the chart's
ServiceAccount, on `example/pipeline.yaml` (and copies of it under other run names), with the simulated
operator moving jobs through their conditions. Each numbered regression of issue 15 is named."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CHART
from harness import REPO

pytestmark = pytest.mark.k8s
NS = "tts"
EXAMPLE = REPO / "example" / "pipeline.yaml"


@pytest.fixture(scope="module")
def chart(tools, sim):
    """The chart installed in `tts` for its ServiceAccount and RBAC only (no stage of its own)."""
    tools.kubectl("create", "namespace", NS, check=False)
    tools.helm("install", "tts", str(CHART), "-n", NS, "--set", "stages.vectorize.enabled=false",
               "--set", "stages.export.enabled=false")
    yield
    tools.helm("uninstall", "tts", "-n", NS, "--wait", check=False)


@pytest.fixture(scope="module")
def as_sa(cluster, chart) -> Path:
    """A kubeconfig of the chart's ServiceAccount; its context namespace is `default`, so every
    namespace ttsctl uses must come from the spec or --namespace (regression #3)."""
    path = cluster.service_account_kubeconfig(NS, "tts-trainer")
    config = yaml.safe_load(path.read_text())
    config["contexts"][0]["context"]["namespace"] = "default"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # Storage paths are relative to the working directory: a fresh one holds no earlier codec.
    return tmp_path_factory.mktemp("cwd")


def spec_copy(tmp: Path, name: str, **cluster) -> Path:
    """example/pipeline.yaml under another run name (stage config paths made absolute)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["name"] = name
    for stage in data["stages"].values():
        if isinstance(stage.get("config"), str):
            stage["config"] = str(EXAMPLE.parent / stage["config"])
    data["cluster"].update(cluster)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ttsctl(tools, kubeconfig, cwd, *args, timeout=180):
    return tools.ttsctl(*args, kubeconfig=kubeconfig, cwd=cwd, timeout=timeout)


def popen(tools, kubeconfig, cwd, *args) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", *args], cwd=cwd, env=tools.env(kubeconfig),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_json(tools, name: str) -> dict | None:
    out = tools.kubectl("get", "pytorchjob", name, "-n", NS, "-o", "json", check=False)
    return json.loads(out) if out else None


def wait_job(tools, name: str, condition: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = job_json(tools, name)
        conditions = {c["type"]: c["status"] for c in (job or {}).get("status", {}).get("conditions", [])}
        if conditions.get(condition) == "True":
            return job
        time.sleep(0.3)
    raise AssertionError(f"{name} never {condition}")


def printed_command(output: str, prefix: str) -> list[str]:
    line = next(line for line in output.splitlines() if prefix in line)
    command = line[line.index(prefix):].split(" (kubectl")[0]
    return shlex.split(command)[1:]  # drop "ttsctl"


def test_pipeline_end_to_end_as_the_chart_service_account(tools, sim, as_sa, workdir):
    # Regression #7: the example spec's serviceAccount (tts-trainer) did not exist after installing the
    # chart (it named its own <release>-tts-training): no pod was ever created.
    result = ttsctl(tools, as_sa, workdir, "run", str(EXAMPLE), "--backend", "kubeflow", timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for stage in ("codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"):
        assert f"<== {stage}: succeeded" in out
    assert "forbidden" not in out.lower()
    # Pods really ran under that ServiceAccount.
    pods = json.loads(tools.kubectl("get", "pods", "-n", NS, "-l", "speechlm.io/run=demo", "-o", "json"))["items"]
    trainer_pods = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "trainer"]
    assert len(trainer_pods) == 9  # 8 jobs, SFT on 2 nodes
    assert {p["spec"]["serviceAccountName"] for p in trainer_pods} == {"tts-trainer"}
    assert {p["spec"]["terminationGracePeriodSeconds"] for p in trainer_pods} == {300}

    # status / logs from "another shell", given the spec (namespace from it) or the name + namespace.
    status = ttsctl(tools, as_sa, workdir, "status", str(EXAMPLE), "--backend", "kubeflow")
    assert status.returncode == 0 and "run demo (kubeflow): Succeeded" in status.stdout, status.stdout + status.stderr
    logs = ttsctl(tools, as_sa, workdir, "logs", "demo", "--stage", "sft", "-n", NS, "--backend", "kubeflow",
                  "--workers")
    assert logs.returncode == 0, logs.stderr
    assert "[demo-sft-master-0] sft: starting on demo-sft-master-0" in logs.stdout
    assert "[demo-sft-worker-0] done" in logs.stdout


def test_stage_config_maps_are_owned_by_their_jobs(tools, sim, as_sa, workdir):
    # Regression #6: stage ConfigMaps had no ownerReference; cancel and the TTL left them behind.
    spec = spec_copy(workdir, "own1")
    result = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow", "--stages", "vectorize,merge")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("vectorize", "merge"):
        job = job_json(tools, f"own1-{stage}")
        cm = json.loads(tools.kubectl("get", "configmap", f"own1-{stage}-config", "-n", NS, "-o", "json"))
        (owner,) = cm["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("PyTorchJob", f"own1-{stage}", job["metadata"]["uid"])
    cancel = ttsctl(tools, as_sa, workdir, "cancel", str(spec), "--backend", "kubeflow")
    assert cancel.returncode == 0, cancel.stderr
    deadline = time.time() + 60
    while tools.kubectl("get", "configmaps", "-n", NS, "-l", "speechlm.io/run=own1", "-o", "name"):
        assert time.time() < deadline, "the garbage collector left the stage ConfigMaps behind"
        time.sleep(0.5)


def test_failure_hint_then_resume_from_the_failed_stage(tools, sim, as_sa, workdir):
    spec = spec_copy(workdir, "fail1")
    sim.outcome["fail1-sft"] = "Failed"
    result = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "xx sft: Failed" in out and "RuntimeError: simulated stage failure" in out
    assert "resume with --from sft" in out
    # Regression #3: the printed logs command, run as printed, looked in namespace `default`.
    hint = ttsctl(tools, as_sa, workdir, *printed_command(out, "ttsctl logs "))
    assert hint.returncode == 0, hint.stderr
    assert "RuntimeError: simulated stage failure" in hint.stdout

    # Regression #1: `--from sft` attached to the old Failed job and failed again at once.
    sim.outcome["fail1-sft"] = "Succeeded"
    old_uid = job_json(tools, "fail1-sft")["metadata"]["uid"]
    resumed = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow", "--from", "sft", timeout=300)
    out = resumed.stdout
    assert resumed.returncode == 0, out + resumed.stderr
    assert "replacing the Failed PyTorchJob tts/fail1-sft" in out
    assert "<== sft: succeeded" in out and "<== eval: succeeded" in out
    assert job_json(tools, "fail1-sft")["metadata"]["uid"] != old_uid

    # `submit` of a finished stage replaces it too (and says so), exit 0 because the new job started.
    submit = ttsctl(tools, as_sa, workdir, "submit", str(spec), "eval", "--backend", "kubeflow")
    assert submit.returncode == 0, submit.stderr
    assert "replacing the Succeeded PyTorchJob tts/fail1-eval" in submit.stdout
    wait = ttsctl(tools, as_sa, workdir, "wait", "fail1", "-n", NS, "--backend", "kubeflow")
    assert wait.returncode == 0 and "run fail1: Succeeded" in wait.stdout, wait.stdout + wait.stderr

    # Regression #4: cancel deleted the finished jobs while saying "stopped nothing".
    cancel = ttsctl(tools, as_sa, workdir, "cancel", "fail1", "-n", NS, "--backend", "kubeflow")
    assert cancel.returncode == 0, cancel.stderr
    assert "nothing" not in cancel.stdout
    assert "deleted sft (Succeeded)" in cancel.stdout and "deleted codec (Succeeded)" in cancel.stdout


def test_cancel_ends_a_running_pipeline(tools, sim, as_sa, workdir):
    spec = spec_copy(workdir, "cancel1")
    sim.outcome["cancel1-codec"] = "Hold"
    run = popen(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow")
    try:
        wait_job(tools, "cancel1-codec", "Running")
        cancel = ttsctl(tools, as_sa, workdir, "cancel", str(spec), "--backend", "kubeflow")
        assert cancel.returncode == 0, cancel.stderr
        assert "cancelled cancel1: stopped codec (Running)" in cancel.stdout
        # Regression #2: `run` polled the vanished job forever.
        out, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1, out
    assert "xx codec: Failed after" in out and "Deleted" in out and "no longer exists" in out
    assert out.count("no PyTorchJob") == 0


def job_gets(cluster, name: str) -> int:
    """How often the API server has answered a `get` of this PyTorchJob (the audit log)."""
    return sum(1 for line in cluster.audit_log.read_text().splitlines()
               if f'"name":"{name}"' in line and '"verb":"get"' in line and '"ResponseComplete"' in line)


def test_wait_ends_when_the_ttl_removes_the_job(tools, cluster, sim, as_sa, workdir):
    # Regression #2 (TTL): the job finished and was deleted before `wait` saw its end.
    spec = spec_copy(workdir, "ttl1", ttlSecondsAfterFinished=0)
    sim.outcome["ttl1-vectorize"] = "Hold"
    submit = ttsctl(tools, as_sa, workdir, "submit", str(spec), "vectorize", "--backend", "kubeflow")
    assert submit.returncode == 0, submit.stderr
    wait_job(tools, "ttl1-vectorize", "Running")
    gets = job_gets(cluster, "ttl1-vectorize")
    wait = popen(tools, as_sa, workdir, "wait", str(spec), "--backend", "kubeflow")
    try:
        deadline = time.time() + 60
        while job_gets(cluster, "ttl1-vectorize") < gets + 2:  # `wait` is polling the job
            assert time.time() < deadline and wait.poll() is None, "ttsctl wait never polled the job"
            time.sleep(0.2)
        sim.release("ttl1-vectorize")
        out, _ = wait.communicate(timeout=60)
    finally:
        wait.kill()
    assert "vectorize: Failed (Deleted)" in out or "run ttl1: Succeeded" in out, out
    assert job_json(tools, "ttl1-vectorize") is None


def test_logs_follow_streams_until_the_stage_ends(tools, sim, as_sa, workdir):
    spec = spec_copy(workdir, "follow1")
    sim.outcome["follow1-codec"] = "Hold"
    submit = ttsctl(tools, as_sa, workdir, "submit", str(spec), "codec", "--backend", "kubeflow")
    assert submit.returncode == 0, submit.stderr
    wait_job(tools, "follow1-codec", "Running")
    follow = popen(tools, as_sa, workdir, "logs", str(spec), "--stage", "codec", "--follow", "--backend", "kubeflow")
    try:
        first = follow.stdout.readline()
        assert first == "codec: starting on follow1-codec-master-0\n"
        sim.release("follow1-codec")
        rest, _ = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0
    assert rest.endswith("done\n"), rest


def test_logs_into_a_closed_pipe_and_of_a_pending_pod(tools, sim, as_sa, workdir):
    # Regression #5: `ttsctl logs ... | head` ended in a BrokenPipeError traceback; logs of an unscheduled
    # pod printed nothing and exited 0.
    spec = spec_copy(workdir, "pipe1")
    sim.log_lines["pipe1-codec"] = 20000
    assert ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow", "--stages", "codec").returncode == 0
    cmd = [sys.executable, "-m", "controller.cli", "logs", str(spec), "--stage", "codec", "--backend", "kubeflow"]
    shell = subprocess.run(f"{shlex.join(cmd)} | head -n 1", shell=True, capture_output=True, text=True,
                           cwd=workdir, env=tools.env(as_sa), timeout=120, executable="/bin/bash")
    assert shell.stdout == "codec: starting on pipe1-codec-master-0\n"
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr

    sim.outcome["pipe1-vectorize"] = "Pending"
    submit = ttsctl(tools, as_sa, workdir, "submit", str(spec), "vectorize", "--backend", "kubeflow")
    assert submit.returncode == 0, submit.stderr
    deadline = time.time() + 30
    while True:
        logs = ttsctl(tools, as_sa, workdir, "logs", str(spec), "--stage", "vectorize", "--backend", "kubeflow")
        if "Insufficient nvidia.com/gpu" in logs.stderr or time.time() > deadline:
            break
        time.sleep(0.5)
    assert logs.returncode == 1
    assert "pipe1-vectorize-master-0: Pending, not scheduled" in logs.stderr
    assert "FailedScheduling: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." in logs.stderr
    ttsctl(tools, as_sa, workdir, "cancel", str(spec), "--backend", "kubeflow")


def test_pending_job_reports_scheduler_events_after_the_spec_timeout(tools, sim, as_sa, workdir):
    # Regression #3 (second half): `wait`/`status` ignored cluster.pendingTimeoutSeconds.
    spec = spec_copy(workdir, "pend1", pendingTimeoutSeconds=2)
    sim.outcome["pend1-codec"] = "Pending"
    run = popen(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow")
    wait_job(tools, "pend1-codec", "Created")
    wait = popen(tools, as_sa, workdir, "wait", "pend1", "-n", NS, "--backend", "kubeflow")
    try:
        for proc in (run, wait):
            deadline = time.time() + 45
            line = ""
            while "FailedScheduling" not in line:
                assert time.time() < deadline, f"no FailedScheduling notice from {proc.args}"
                line = proc.stdout.readline()
            assert "pend1-codec-master-0: FailedScheduling: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." \
                in line
        status = ttsctl(tools, as_sa, workdir, "status", "pend1", "-n", NS, "--backend", "kubeflow")
        assert "codec: Pending (Created): pending for 0 min; pend1-codec-master-0: FailedScheduling" in status.stdout
    finally:
        ttsctl(tools, as_sa, workdir, "cancel", str(spec), "--backend", "kubeflow")
        for proc in (run, wait):
            proc.communicate(timeout=60)
    assert run.returncode == 1 and wait.returncode == 1


def test_missing_service_account_is_reported_before_submitting(tools, sim, as_sa, workdir):
    spec = spec_copy(workdir, "nosa1", serviceAccount="nobody")
    result = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow")
    assert result.returncode == 1
    assert "serviceaccount 'nobody' not found in namespace 'tts'" in result.stderr
    assert job_json(tools, "nosa1-codec") is None


def test_forbidden_namespace_names_the_verb_and_resource(tools, sim, as_sa, workdir):
    # The chart's Role is namespaced: the same ServiceAccount may do nothing in `default`.
    spec = spec_copy(workdir, "forbid1", namespace="default")
    result = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow")
    assert result.returncode == 1
    assert "forbidden: you may not get pytorchjobs.kubeflow.org in namespace 'default'" in result.stderr
    assert "kubectl auth can-i get pytorchjobs.kubeflow.org -n default" in result.stderr
    assert "Traceback" not in result.stderr


def test_rlhf_trainer_restart_restarts_the_rollout_server(tools, sim, as_sa, workdir):
    spec = spec_copy(workdir, "restart1")
    sim.outcome["restart1-rlhf"] = "Restart"
    result = ttsctl(tools, as_sa, workdir, "run", str(spec), "--backend", "kubeflow", "--stages", "rlhf")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "... rlhf: trainer restarted: restarting the rollout server (#1)" in result.stdout
    # The rollout server goes with the job's end.
    assert tools.kubectl("get", "deployments,services,networkpolicies", "-n", NS, "-l", "speechlm.io/run=restart1",
                         "-o", "name") == ""


# Granted to every authenticated user, used by `kubectl auth can-i` itself.
SELF_REVIEWS = {("authorization.k8s.io", "selfsubjectaccessreviews"),
                ("authorization.k8s.io", "selfsubjectrulesreviews")}
CAN_I_ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def can_i_list(tools, kubeconfig: Path) -> set[tuple[str, str, str]]:
    """`kubectl auth can-i --list` as (apiGroup, resource, verb), resource rules only."""
    table = tools.kubectl("auth", "can-i", "--list", "-n", NS, kubeconfig=kubeconfig)
    granted = set()
    for line in table.splitlines()[1:]:
        match = CAN_I_ROW.match(line)
        assert match, f"unexpected can-i row: {line!r}"
        resource, verbs = match[1], match[4].split()
        if not resource:
            continue  # non-resource URLs (discovery, version)
        name, _, group = resource.partition(".")
        granted |= {(group, name, verb) for verb in verbs}
    return {g for g in granted if g[:2] not in SELF_REVIEWS}


def test_rbac_grants_exactly_what_ttsctl_and_helm_test_use(tools, cluster, sim, as_sa):
    # Runs last in this module: the audit log then holds every request of the pipeline tests above.
    tools.helm("upgrade", "tts", str(CHART), "-n", NS, "--reuse-values", "--set", "stages.vectorize.enabled=true")
    assert "Phase:          Succeeded" in tools.helm("test", "tts", "-n", NS, timeout=180).stdout
    used = cluster.audit_requests(f"system:serviceaccount:{NS}:tts-trainer", NS)
    denied = {u for u in used if u[3] == 403}
    assert denied == set(), f"the chart's Role refused: {sorted(denied)}"
    needed = {(group, resource, verb) for group, resource, verb, _ in used if (group, resource) not in SELF_REVIEWS}
    granted = can_i_list(tools, as_sa)
    assert granted - needed == set(), "granted but never used"
    assert needed - granted == set(), "used but not granted"
