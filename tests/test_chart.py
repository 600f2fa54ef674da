"""The Helm chart, checked offline with a real helm binary: lint, render with every values set, validate
every object (CRDs + built-in schemas), yamllint the output, reject bad values, and check the objects
do what the design says (PyTorchJob shape, rollout isolation, monitors, dashboards, RBAC, configs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_schemas.validate import REPO, all_errors, helm_template, run, tool, yamllint_errors

from trainer.config import load_config

CHART = REPO / "charts" / "tts-training"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = {"default": [], **{p.name.removesuffix("-values.yaml"): [p] for p in CI_VALUES}}
FULL = CHART / "ci" / "full-pipeline-values.yaml"
CLUSTER_SCOPED = {"PriorityClass"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("chart")
    result = {}
    for name, files in VALUE_SETS.items():
        text, objects = helm_template(files)
        path = out / f"{name}.yaml"
        path.write_text(text)
        result[name] = (path, objects)
    return result


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_ci_values_sets_exist():
    assert {"full-pipeline", "cpu-smoke"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name):
    cmd = [tool("helm"), "lint", "--strict", str(CHART), "--namespace", "tts"]
    for path in VALUE_SETS[name]:
        cmd += ["--values", str(path)]
    result = run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_valid(rendered, name):
    _, objects = rendered[name]
    assert objects
    assert all_errors(objects) == []
    for obj in objects:
        expected = None if obj["kind"] in CLUSTER_SCOPED else "tts"
        assert obj["metadata"].get("namespace") == expected, f"{obj['kind']}/{obj['metadata']['name']}"


def test_rendered_output_passes_yamllint(rendered):
    assert yamllint_errors([path for path, _ in rendered.values()]) == ""


BAD_VALUES = {
    "unknown top-level key": ({"replicas": 2}, "Additional property replicas is not allowed"),
    "negative GPUs": ({"stages": {"sft": {"gpusPerNode": -1}}}, "gpusPerNode"),
    "nodes as a string": ({"stages": {"sft": {"nodes": "two"}}}, "nodes"),
    "GPUs in resources": ({"stages": {"sft": {"resources": {"limits": {"nvidia.com/gpu": 8}}}}}, "limits"),
    "rollout port out of range": ({"stages": {"rlhf": {"rollout": {"port": 70000}}}}, "port"),
    "unknown stage": ({"stages": {"pretrain": {"enabled": True}}}, "pretrain"),
    "bad pull policy": ({"images": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    "run name not a DNS label": ({"runName": "My_Run"}, "runName"),
    "monitor release label missing": ({"monitoring": {"release": ""}}, "release"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(tmp_path, case):
    values, expected = BAD_VALUES[case]
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    for args in (["template", "bad", str(CHART)], ["lint", str(CHART)]):
        result = run([tool("helm"), *args, "--values", str(path)])
        assert result.returncode != 0, f"helm {args[0]} accepted {values}"
        assert expected in result.stdout + result.stderr


def test_release_name_too_long_for_a_run_name_is_an_error():
    result = run([tool("helm"), "template", "a-release-name-much-longer-than-30", str(CHART)])
    assert result.returncode != 0
    assert "at most 30 characters" in result.stderr


# ------------------------------------------------------------------------------------ stage jobs
STAGE_ORDER = ["codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"]


def test_one_pytorchjob_per_enabled_stage_in_pipeline_order(rendered):
    jobs = by_kind(rendered["full-pipeline"][1], "PyTorchJob")
    assert [j["metadata"]["name"] for j in jobs] == [f"full-{s}" for s in STAGE_ORDER]
    default_jobs = by_kind(rendered["default"][1], "PyTorchJob")
    assert [j["metadata"]["name"] for j in default_jobs] == ["tts-vectorize"]
    # export-sft runs with sft, not on its own; merge follows its own switch.
    smoke_jobs = [j["metadata"]["name"] for j in by_kind(rendered["cpu-smoke"][1], "PyTorchJob")]
    assert smoke_jobs == ["smoke-vectorize", "smoke-merge", "smoke-sft", "smoke-export-sft"]


def test_pytorchjob_follows_the_operator_contract(rendered):
    objects = rendered["full-pipeline"][1]
    job = named(objects, "PyTorchJob", "full-sft")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 259200  # the stage's own deadline wins
    assert spec["runPolicy"]["schedulingPolicy"] == {"priorityClass": "training-high"}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tts-training"
    for replica in replicas.values():
        assert replica["restartPolicy"] == "ExitCode"
        template = replica["template"]
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["command"] == ["python", "-m", "trainer.torchrun", "-m", "trainer", "sft", "--config",
                                "/config/sft.json"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "metrics", "containerPort": 9400} in container["ports"]
        env = {e["name"]: e for e in container["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
        assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == "/var/secrets/gcs/key.json"
        assert env["NCCL_DEBUG"]["value"] == "WARN" and env["TTS_STAGE"]["value"] == "sft"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["config"]["configMap"]["name"] == "full-sft-config"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"] == "dshm" and mounts["/config"] == "config"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["enableServiceLinks"] is False
    single = named(objects, "PyTorchJob", "full-merge")["spec"]
    assert set(single["pytorchReplicaSpecs"]) == {"Master"} and single["nprocPerNode"] == "1"
    merge_container = single["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in merge_container.get("resources", {}).get("limits", {})


def _config(objects, run: str, stage: str) -> dict[str, Any]:
    data = named(objects, "ConfigMap", f"{run}-{stage}-config")["data"]
    return json.loads(data[f"{stage}.json"])


def test_stage_configs_are_valid_trainer_configs_chained_by_storage(rendered):
    objects = rendered["full-pipeline"][1]
    configs = {stage: load_config(data=_config(objects, "full", stage)) for stage in STAGE_ORDER}
    data, ckpt, out = "gs://tts-bucket/full/data", "gs://tts-bucket/full/checkpoints", "gs://tts-bucket/full/outputs"
    codec = f"{ckpt}/codec/final"
    assert configs["codec"].codec.train.output_dir == f"{ckpt}/codec"
    assert configs["codec"].codec.train.max_steps == 100000  # the user's config survives
    assert configs["vectorize"].vectorize.output_dir == f"{data}/vectorized"
    assert configs["vectorize"].vectorize.codec_model_path == codec
    assert configs["merge"].merge.dataset_path == f"{data}/vectorized"
    sft = configs["sft"]
    assert sft.train_weighted_datasets == {f"{data}/vectorized": 1.0}
    assert (sft.training.output_dir, sft.training.run_name, sft.training.strategy) == (ckpt, "sft", "fsdp")
    assert configs["export-sft"].export.checkpoint_path == f"{ckpt}/sft/final_model"
    assert configs["export-sft"].export.output_path == f"{out}/export/sft"
    rl = configs["rlhf"].rlhf_training
    assert rl.base_model_dir == f"{out}/export/sft" and rl.use_vllm
    assert (rl.vllm_server_host, rl.vllm_server_port, rl.vllm_group_port) == ("full-rollout.tts.svc", 8000, 51216)
    ev = configs["eval"].eval
    assert ev.model_path == f"{out}/export/rlhf" and ev.metrics_dirs == [f"{ckpt}/sft", f"{ckpt}/rlhf"]
    assert all(c.training.process_group_timeout_s == 1800 for c in configs.values())


def test_eval_without_a_test_list_is_a_render_error():
    result = run([tool("helm"), "template", "t", str(CHART), "--set", "stages.eval.enabled=true"])
    assert result.returncode != 0 and "test_list" in result.stderr


# ------------------------------------------------------------------------------- rollout server
def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(job: dict[str, Any]) -> list[dict[str, str]]:
    return [r["template"]["metadata"]["labels"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def test_rollout_server_is_one_replica_behind_a_headless_service(rendered):
    objects = rendered["full-pipeline"][1]
    deployment = named(objects, "Deployment", "full-rollout")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    # The default weight sync (storage): vLLM's own server, which reloads what the trainer writes.
    assert container["command"][:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["command"][9:11] == ["--tensor-parallel-size", "2"]
    assert container["command"][-2:] == ["--gpu_memory_utilization", "0.85"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["startupProbe"]["failureThreshold"] == 180
    # The model lives in an object store: an init container copies it to a local volume for vLLM.
    (fetch,) = pod["initContainers"]
    assert fetch["command"][-2:] == ["gs://tts-bucket/full/outputs/export/sft", "/model"]
    assert container["command"][container["command"].index("--model") + 1] == "/model"
    service = named(objects, "Service", "full-rollout")
    assert service["spec"]["clusterIP"] == "None"
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("http", 8000)}
    assert all(s["metadata"]["name"] != "vllm" for s in by_kind(objects, "Service"))
    assert _matches(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    trainer = named(objects, "PyTorchJob", "full-rlhf")["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"]["containers"][0]
    trainer_env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert trainer_env["TTS_VLLM_HOST"] == "full-rollout.tts.svc" and "TTS_VLLM_GROUP_PORT" not in trainer_env
    # Both pods mount the workspace claim, where the weights meet.
    (config,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "full-rlhf-config"]
    rl = json.loads(next(iter(config["data"].values())))["rlhf_training"]
    assert rl["weight_sync_dir"] == "/workspace/rollout-weights/full"
    for mounts in (container["volumeMounts"], trainer["volumeMounts"]):
        assert {"name": "workspace", "mountPath": "/workspace"} in mounts


def test_nccl_rollout_server_is_trls_vllm_serve():
    _, objects = helm_template([FULL], release="full", extra=[
        "--set", "stages.rlhf.config.rlhf_training.weight_sync=nccl"])
    (container,) = named(objects, "Deployment", "full-rollout")["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["trl", "vllm-serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/"
    service = named(objects, "Service", "full-rollout")
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("http", 8000), ("weight-sync", 51216)}
    (rule,) = named(objects, "NetworkPolicy", "full-rollout")["spec"]["ingress"]
    assert "ports" not in rule  # NCCL uses ephemeral ports: restrict by source pod only
    trainer_env = {e["name"]: e.get("value") for e in
                   named(objects, "PyTorchJob", "full-rlhf")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
                   ["spec"]["containers"][0]["env"]}
    assert trainer_env["TTS_VLLM_GROUP_PORT"] == "51216"


def test_cpu_rollout_server_asks_for_no_gpu():
    """`rollout.gpus: 0`: vLLM's CPU build, as controller/render does; nccl is refused with the key."""
    _, objects = helm_template([FULL], release="full", extra=["--set", "stages.rlhf.rollout.gpus=0"])
    (container,) = named(objects, "Deployment", "full-rollout")["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    assert "--tensor-parallel-size" not in container["command"]
    result = run([tool("helm"), "template", "full", str(CHART), "--values", str(FULL),
                  "--set", "stages.rlhf.rollout.gpus=0", "--set", "stages.rlhf.config.rlhf_training.weight_sync=nccl"])
    assert result.returncode != 0 and "stages.rlhf.rollout.gpus is 0" in result.stderr


def test_storage_sync_without_the_workspace_claim_fails_to_render():
    result = run([tool("helm"), "template", "full", str(CHART), "--values", str(FULL),
                  "--set", "workspace.enabled=false"])
    assert result.returncode != 0 and "weight_sync storage needs the workspace claim" in result.stderr


def test_network_policy_admits_only_this_runs_rlhf_trainer_pods(rendered):
    objects = rendered["full-pipeline"][1]
    policy = named(objects, "NetworkPolicy", "full-rollout")["spec"]
    deployment = named(objects, "Deployment", "full-rollout")
    assert _matches(policy["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]  # storage sync: HTTP is all there is
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector/ipBlock: this namespace's pods only
    selector = peer["podSelector"]["matchLabels"]
    for job in by_kind(objects, "PyTorchJob"):
        admitted = all(_matches(selector, labels) for labels in _pod_labels(job))
        assert admitted == (job["metadata"]["name"] == "full-rlhf"), job["metadata"]["name"]
    other_run = {**_pod_labels(named(objects, "PyTorchJob", "full-rlhf"))[0], "speechlm.io/run": "other"}
    assert not _matches(selector, other_run)


def test_no_rollout_objects_without_rlhf(rendered):
    for kind in ("Deployment", "Service", "NetworkPolicy", "ServiceMonitor"):
        assert by_kind(rendered["default"][1], kind) == []


# ---------------------------------------------------------------------------------- monitoring
def test_pod_monitor_scrapes_every_trainer_pod_on_its_metrics_port(rendered):
    objects = rendered["full-pipeline"][1]
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    targets = {r["targetLabel"] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert {"run", "stage"} <= targets
    selector = monitor["spec"]["selector"]["matchLabels"]
    for job in by_kind(objects, "PyTorchJob"):
        for labels in _pod_labels(job):
            assert _matches(selector, labels)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            ports = replica["template"]["spec"]["containers"][0]["ports"]
            assert [p["name"] for p in ports] == ["metrics"]
    rollout_pod = named(objects, "Deployment", "full-rollout")["spec"]["template"]
    assert not _matches(selector, rollout_pod["metadata"]["labels"])


def test_service_monitor_selects_the_rollout_service(rendered):
    objects = rendered["full-pipeline"][1]
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = named(objects, "Service", "full-rollout")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]


def test_monitors_and_dashboards_can_be_turned_off(rendered):
    for kind in ("PodMonitor", "ServiceMonitor"):
        assert by_kind(rendered["cpu-smoke"][1], kind) == []
    assert not [c for c in by_kind(rendered["cpu-smoke"][1], "ConfigMap") if "grafana_dashboard" in
                c["metadata"]["labels"]]


def test_dashboards_ship_as_labelled_configmaps(rendered):
    objects = rendered["default"][1]
    dashboards = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(dashboards) == len(files) >= 3
    shipped = {key: json.loads(value) for c in dashboards for key, value in c["data"].items()}
    assert shipped == {p.name: json.loads(p.read_text()) for p in files}
    assert all(c["metadata"]["annotations"]["grafana_folder"] == "TTS training" for c in dashboards)


# ------------------------------------------------------------------------------- RBAC, storage
def test_role_is_bound_to_the_pods_service_account(rendered):
    # What the Role grants is checked against the requests ttsctl really makes: tests/k8s/test_k8s_rbac.py.
    objects = rendered["default"][1]
    (role,) = by_kind(objects, "Role")
    (binding,) = by_kind(objects, "RoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "tts"}]
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["name"] == "tts-trainer"  # the default of ttsctl's cluster.serviceAccount
    job = by_kind(objects, "PyTorchJob")[0]
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["serviceAccountName"] == \
        account["metadata"]["name"]


def test_workspace_claim_is_created_or_reused(rendered):
    (claim,) = by_kind(rendered["default"][1], "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert by_kind(rendered["cpu-smoke"][1], "PersistentVolumeClaim") == []
    job = by_kind(rendered["cpu-smoke"][1], "PyTorchJob")[0]
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "smoke-workspace"}} in volumes


def test_helm_test_pod_runs_a_valid_check_script(rendered):
    objects = rendered["full-pipeline"][1]
    (pod,) = [p for p in by_kind(objects, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    compile(container["command"][2], "helm_test.py", "exec")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TTS_CONFIGMAPS"].split(",") == [f"full-{s}-config" for s in STAGE_ORDER]


def test_notes_render_with_the_submitted_jobs(tmp_path):
    # helm template skips NOTES.txt: render it through tpl from a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    result = run([tool("helm"), "template", "full", str(chart), "--namespace", "tts", "--values", str(FULL),
                  "--show-only", "templates/notes.yaml"])
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["notes"]
    for stage in STAGE_ORDER:
        assert f"full-{stage} " in notes
    assert "kubectl get deploy,svc -n tts full-rollout" in notes
    assert 'release is "prometheus"' in notes


def test_handwritten_yaml_passes_yamllint():
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES, REPO / "skaffold.yaml", REPO / ".checkov.yaml"]
    assert yamllint_errors(files) == ""


def test_alerts_select_this_run_and_follow_the_monitors():
    _, objects = helm_template([FULL], release="full", namespace="tts")
    (rule,) = by_kind(objects, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"TTSStageStalled", "TTSLossNotFinite", "TTSRolloutServerDown"}
    for alert in alerts.values():
        assert 'namespace="tts", run="full"' in alert["expr"] and alert["labels"]["run"] == "full"
    assert alerts["TTSStageStalled"]["for"] == "5m" and "[15m]" in alerts["TTSStageStalled"]["expr"]
    # No rollout server without the RLHF stage; no alerts without the PodMonitor whose labels they use.
    _, objects = helm_template([FULL], extra=["--set", "stages.rlhf.enabled=false"])
    (rule,) = by_kind(objects, "PrometheusRule")
    assert "TTSRolloutServerDown" not in {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for off in ("monitoring.alerts.enabled=false", "monitoring.podMonitor.enabled=false"):
        assert by_kind(helm_template([FULL], extra=["--set", off])[1], "PrometheusRule") == []
