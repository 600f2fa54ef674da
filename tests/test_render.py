"""`ttsctl render`: every object validates offline, and carries what the cluster needs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from controller_fixtures import REPO, object_errors, spec_dict, write_spec

from controller import render
from controller.cli import main
from controller.plan import build_plan
from controller.spec import load_spec

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    return write_spec(tmp_path, spec_dict(tmp_path))


@pytest.fixture
def objects(spec_path: Path) -> list[dict]:
    return render.render_dicts(load_spec(spec_path))


def by_kind_name(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def trainer_container(job: dict, replica: str = "Master") -> dict:
    containers = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pytorch")


def env_of(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_object_validates(objects):
    kinds = [o["kind"] for o in objects]
    assert kinds.count("PyTorchJob") == 8  # codec, vectorize, merge, sft, export x2, rlhf, eval
    assert kinds.count("ConfigMap") == 8
    assert {"Deployment", "Service", "NetworkPolicy"} <= set(kinds)
    for obj in objects:
        assert object_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])
        assert DNS_LABEL.match(obj["metadata"]["name"]), obj["metadata"]["name"]
        assert obj["metadata"]["namespace"] == "tts"


def test_schema_check_catches_a_broken_job(objects):
    job = copy.deepcopy(by_kind_name(objects, "PyTorchJob", "t1-sft"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    job["spec"]["runPolicy"]["cleanPodPolicyy"] = "All"
    assert len(object_errors(job)) == 2
    deployment = copy.deepcopy(by_kind_name(objects, "Deployment", "t1-rollout"))
    deployment["spec"]["replica"] = 1
    assert object_errors(deployment)


def test_pytorchjob_shape(objects):
    job = by_kind_name(objects, "PyTorchJob", "t1-sft")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # 2 nodes
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["ttlSecondsAfterFinished"] == 86400
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 86400
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["speechlm.io/run"] == "t1" and labels["speechlm.io/stage"] == "sft"
    assert labels["app.kubernetes.io/managed-by"] == "ttsctl" and labels["team"] == "speech"
    for replica in ("Master", "Worker"):
        rs = spec["pytorchReplicaSpecs"][replica]
        assert rs["restartPolicy"] == "ExitCode"
        template = rs["template"]
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["serviceAccountName"] == "trainer" and pod["priorityClassName"] == "high"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        c = trainer_container(job, replica)
        assert c["command"] == ["python", "-m", "trainer.torchrun", "-m", "trainer", "sft", "--config",
                                "/config/sft.json"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "metrics", "containerPort": 9090} in c["ports"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/config"]]["configMap"]["name"] == "t1-sft-config"
        env = env_of(c)
        assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "1800" and env["EXTRA"] == "1"
        # Secrets by reference only.
        assert env["WANDB_API_KEY"] == {"secretKeyRef": {"key": "api-key", "name": "wandb"}}
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/gcs/sa.json"
    # A one-node CPU stage has no Worker and runs one process.
    merge = by_kind_name(objects, "PyTorchJob", "t1-merge")
    assert "Worker" not in merge["spec"]["pytorchReplicaSpecs"]
    assert merge["spec"]["nprocPerNode"] == "1"
    assert "nvidia.com/gpu" not in trainer_container(merge)["resources"]["requests"]
    codec = by_kind_name(objects, "PyTorchJob", "t1-codec")
    assert trainer_container(codec)["command"][5] == "codec-train"


def stage_config(objects: list[dict], stage: str) -> dict:
    return json.loads(by_kind_name(objects, "ConfigMap", f"t1-{stage}-config")["data"][f"{stage}.json"])


def test_configs_chain_the_stages(objects, tmp_path):
    data, ckpt, out = (str(tmp_path / d) for d in ("data", "ckpt", "out"))
    codec = f"{ckpt}/codec/final"
    assert stage_config(objects, "codec")["codec"]["train"]["output_dir"] == f"{ckpt}/codec"
    vec = stage_config(objects, "vectorize")["vectorize"]
    assert vec["output_dir"] == f"{data}/vectorized" and vec["codec_model_path"] == codec
    assert vec["dataset_path"] == "example/configs/samples.jsonl"  # from the stage config
    assert stage_config(objects, "merge")["merge"]["dataset_path"] == f"{data}/vectorized"
    sft = stage_config(objects, "sft")
    assert sft["train_weighted_datasets"] == {f"{data}/vectorized": 1.0} == sft["val_weighted_datasets"]
    assert sft["training"]["output_dir"] == ckpt and sft["training"]["run_name"] == "sft"
    assert sft["training"]["max_steps"] == 2
    export = stage_config(objects, "export-sft")["export"]
    chained = {"checkpoint_path": f"{ckpt}/sft/final_model", "output_path": f"{out}/export/sft",
               "codec_model_path": codec}
    assert {k: export[k] for k in chained} == chained
    assert stage_config(objects, "export-rlhf")["export"]["checkpoint_path"] == f"{ckpt}/rlhf/final_model"
    rlhf = stage_config(objects, "rlhf")
    assert rlhf["rlhf_training"]["base_model_dir"] == f"{out}/export/sft"
    assert rlhf["training"]["run_name"] == "rlhf"
    ev = stage_config(objects, "eval")["eval"]
    assert ev["model_path"] == f"{out}/export/rlhf" and ev["codec_model_path"] == codec
    assert ev["output_dir"] == f"{out}/eval"
    assert ev["metrics_dirs"] == [f"{ckpt}/sft", f"{ckpt}/rlhf"]


def _trainer_labels(objects: list[dict], name: str) -> dict:
    return by_kind_name(objects, "PyTorchJob", name)["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "metadata"]["labels"]


def test_rlhf_rollout_server(objects, tmp_path):
    """The default `storage` weight sync: vLLM's own server, HTTP only, weights met on the workspace claim."""
    deployment = by_kind_name(objects, "Deployment", "t1-rollout")
    service = by_kind_name(objects, "Service", "t1-rollout")
    policy = by_kind_name(objects, "NetworkPolicy", "t1-rollout")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    (server,) = pod["containers"]
    assert server["command"][:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                                     f"{tmp_path}/out/export/sft"]
    assert server["command"][5:9] == ["--host", "0.0.0.0", "--port", "8000"]
    assert env_of(server)["VLLM_SERVER_DEV_MODE"] == "1"  # the /collective_rpc weight reload
    assert [p["name"] for p in server["ports"]] == ["http"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"  # vLLM's route
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert any(m["mountPath"] == "/dev/shm" for m in server["volumeMounts"])
    # The trainer writes the weights where the server reads them: the workspace claim, in both pods.
    rl = stage_config(objects, "rlhf")["rlhf_training"]
    assert rl["use_vllm"] is True and rl["vllm_server_host"] == "t1-rollout.tts.svc"
    assert rl["weight_sync"] == "storage" and rl["weight_sync_dir"] == "/workspace/rollout-weights/t1"
    job = by_kind_name(objects, "PyTorchJob", "t1-rlhf")
    for container in (server, trainer_container(job)):
        assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    assert service["metadata"]["name"] != "vllm"
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Only this run's RLHF trainer pods, on the HTTP port.
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= _trainer_labels(objects, "t1-rlhf").items()
    assert not peer["podSelector"]["matchLabels"].items() <= _trainer_labels(objects, "t1-sft").items()
    env = env_of(trainer_container(job))
    assert env["TTS_VLLM_HOST"] == "t1-rollout.tts.svc" and env["TTS_VLLM_PORT"] == "8000"
    assert "TTS_VLLM_GROUP_PORT" not in env


def test_nccl_rollout_server_is_trls(tmp_path):
    """`weight_sync: nccl`: TRL 0.x's `trl vllm-serve` with its weight-sync group port, open on every port
    to the run's trainer pods (NCCL uses ephemeral ports)."""
    data = spec_dict(tmp_path)
    data["stages"]["rlhf"]["config"] = {"rlhf_training": {"weight_sync": "nccl"}}
    objects = render.render_dicts(load_spec(write_spec(tmp_path, data)))
    (server,) = by_kind_name(objects, "Deployment", "t1-rollout")["spec"]["template"]["spec"]["containers"]
    assert server["command"][:4] == ["trl", "vllm-serve", "--model", f"{tmp_path}/out/export/sft"]
    assert "VLLM_SERVER_DEV_MODE" not in env_of(server)
    assert [p["name"] for p in server["ports"]] == ["http", "weight-sync"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health/"  # TRL's route
    service = by_kind_name(objects, "Service", "t1-rollout")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 51216}
    (rule,) = by_kind_name(objects, "NetworkPolicy", "t1-rollout")["spec"]["ingress"]
    assert "ports" not in rule
    env = env_of(trainer_container(by_kind_name(objects, "PyTorchJob", "t1-rlhf")))
    assert env["TTS_VLLM_PORT"] == "8000" and env["TTS_VLLM_GROUP_PORT"] == "51216"
    rl = stage_config(objects, "rlhf")["rlhf_training"]
    assert rl["weight_sync"] == "nccl" and rl.get("weight_sync_dir") is None


def test_cpu_rollout_server(tmp_path, capsys):
    """`rollout.gpus: 0`: vLLM's CPU build, no GPU requested; `nccl` (GPU to GPU) is refused with the key."""
    data = spec_dict(tmp_path)
    data["stages"]["rlhf"]["rollout"] = {"gpus": 0, "env": {"VLLM_CPU_KVCACHE_SPACE": "2"},
                                         "extra_args": ["--dtype", "float32", "--enforce-eager"],
                                         "resources": {"requests": {"cpu": "1", "memory": "4Gi"}}}
    objects = render.render_dicts(load_spec(write_spec(tmp_path, data)))
    deployment = by_kind_name(objects, "Deployment", "t1-rollout")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}}
    assert "--tensor-parallel-size" not in server["command"]
    assert server["command"][-3:] == ["--dtype", "float32", "--enforce-eager"]
    assert env_of(server)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert object_errors(deployment) == []
    data["stages"]["rlhf"]["config"] = {"rlhf_training": {"weight_sync": "nccl"}}
    assert main(["render", str(write_spec(tmp_path, data)), "-o", str(tmp_path / "m")]) == 2
    assert "stages.rlhf.rollout.gpus is 0" in capsys.readouterr().err


def test_storage_sync_without_a_shared_claim_is_refused(tmp_path, capsys):
    data = spec_dict(tmp_path)
    del data["cluster"]["workspace"]
    spec = write_spec(tmp_path, data)
    assert main(["render", str(spec), "-o", str(tmp_path / "m")]) == 2
    assert "weight_sync 'storage' on a cluster needs cluster.workspace" in capsys.readouterr().err
    data["stages"]["rlhf"]["config"] = {"rlhf_training": {"weight_sync_dir": "/shared/weights"}}
    objects = render.render_dicts(load_spec(write_spec(tmp_path, data)))
    assert stage_config(objects, "rlhf")["rlhf_training"]["weight_sync_dir"] == "/shared/weights"


def test_remote_model_is_fetched_by_an_init_container(tmp_path):
    data = spec_dict(tmp_path)
    data["storage"] = {"data": "gs://b/data", "checkpoints": "gs://b/ckpt", "outputs": "gs://b/out"}
    spec = load_spec(write_spec(tmp_path, data))
    deployment = render.to_dict(render.rollout.deployment(spec, build_plan(spec, ["rlhf"])[0]))
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "gs://b/out/export/sft" in init["command"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--model") + 1] == "/model"
    assert object_errors(deployment) == []


def test_disabled_rlhf_evaluates_the_sft_model(tmp_path):
    data = spec_dict(tmp_path)
    data["stages"]["rlhf"]["enabled"] = False
    objects = render.render_dicts(load_spec(write_spec(tmp_path, data)))
    names = [o["metadata"]["name"] for o in objects if o["kind"] == "PyTorchJob"]
    assert names == ["t1-codec", "t1-vectorize", "t1-merge", "t1-sft", "t1-export-sft", "t1-eval"]
    assert not any(o["kind"] == "Deployment" for o in objects)
    ev = stage_config(objects, "eval")["eval"]
    assert ev["model_path"].endswith("/out/export/sft") and ev["metrics_dirs"][-1].endswith("/ckpt/sft")


def test_render_cli_writes_one_stable_file_per_object(spec_path, tmp_path, capsys):
    out = tmp_path / "manifests"
    (out).mkdir()
    (out / "99-stale-configmap.yaml").write_text("stale")
    (out / "kustomization.yaml").write_text("keep")
    assert main(["render", str(spec_path), "-o", str(out)]) == 0
    files = sorted(p.name for p in out.glob("[0-9]*.yaml"))
    assert len(files) == 19 and files[0] == "01-t1-codec-config-configmap.yaml"
    assert (out / "kustomization.yaml").exists()
    first = {p.name: p.read_text() for p in out.glob("*.yaml")}
    assert main(["render", str(spec_path), "-o", str(out)]) == 0
    assert {p.name: p.read_text() for p in out.glob("*.yaml")} == first
    capsys.readouterr()
    assert main(["render", str(spec_path), "--stages", "rlhf"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service", "NetworkPolicy", "PyTorchJob"]


def test_example_pipeline_renders_and_validates():
    example = REPO / "example" / "pipeline.yaml"
    spec = load_spec(example)
    missing = [s.config for s in (getattr(spec.stages, n) for n in ("codec", "vectorize", "sft", "rlhf", "eval"))
               if isinstance(s.config, str) and not (example.parent / s.config).exists()]
    if missing:
        pytest.skip(f"example stage configs not written yet: {missing}")
    objects = render.render_dicts(spec)
    assert len([o for o in objects if o["kind"] == "PyTorchJob"]) == 8
    for obj in objects:
        assert object_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])
    sft = by_kind_name(objects, "PyTorchJob", "demo-sft")
    assert sft["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


@pytest.mark.parametrize(("grace", "torchrun"), [(None, "290"), (60, "54"), (0, "0")])
def test_trainer_pods_get_the_checkpoint_grace_period(tmp_path, grace, torchrun):
    # Issue 14 #8: pods had Kubernetes' default 30 s (and torchrun its own 30 s) to save on SIGTERM.
    data = spec_dict(tmp_path)
    if grace is not None:
        data["cluster"]["terminationGracePeriodSeconds"] = grace
    objects = render.render_dicts(load_spec(write_spec(tmp_path, data)))
    job = by_kind_name(objects, "PyTorchJob", "t1-sft")
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == (300 if grace is None else grace)
        assert env_of(trainer_container(job, replica))["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == torchrun
    # The rollout server saves nothing: it keeps the Kubernetes default.
    rollout = by_kind_name(objects, "Deployment", "t1-rollout")
    assert "terminationGracePeriodSeconds" not in rollout["spec"]["template"]["spec"]
