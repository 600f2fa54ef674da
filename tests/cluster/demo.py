"""`make demo-cluster`: the demo pipeline (example/cluster.yaml) as PyTorchJob pods on a real one-node
cluster on this machine (node.py: kubelet + containerd in a network namespace of its own; operator_standin.py
stands in for the training operator), then tear it all down.

Prints the KUBECONFIG to watch it with while it runs (`ttsctl status demo-cluster --backend kubeflow`,
`ttsctl logs demo-cluster --stage sft --backend kubeflow`); writes runs/demo-cluster/cluster.json (every pod of
every stage, the rollout server's included: stage, job, replica type, node, image, container ID, phase, exit
code, restarts). The pods' workspace
is runs/demo-cluster/workspace: a copy of example/ in, the run's outputs (runs/demo-cluster/...) out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node import REPO, Node, binaries, example_workspace, images
from operator_standin import RELEASE, Operator

SPEC = REPO / "example" / "cluster.yaml"
RUN = "demo-cluster"
NAMESPACE = "tts"


def main() -> int:
    run_dir = REPO / "runs" / RUN
    workspace = example_workspace(run_dir / "workspace")
    started = time.time()
    built = images()
    workdir = Path(tempfile.mkdtemp(prefix="tts-demo-cluster-"))
    node = Node(workdir, binaries())
    try:
        node.start(built)
        operator = Operator(node.cluster.api_client(), init_image=built["init"]["tag"]).start()
        node.prepare_namespace(NAMESPACE, "tts-workspace", workspace)
        kubeconfig = node.cluster.kubeconfig
        print(f"cluster up in {time.time() - started:.0f} s; watch it with\n"
              f"  KUBECONFIG={kubeconfig} ttsctl status {RUN} --backend kubeflow -n {NAMESPACE}\n"
              f"  KUBECONFIG={kubeconfig} ttsctl logs {RUN} --stage sft --backend kubeflow -n {NAMESPACE}", flush=True)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TTSCTL_POLL_SECONDS": "2"}
        run = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", str(SPEC), "--backend", "kubeflow"],
                               cwd=REPO, env=env)
        # Sampled while the run goes on: the rollout server's pod goes with its stage, so it would be missing
        # from a report taken at the end (its row keeps the last state seen).
        seen: dict[str, dict] = {}
        try:
            while run.poll() is None:
                seen.update((row["name"], row) for row in node.pod_report(NAMESPACE))
                time.sleep(5)
        finally:
            if run.poll() is None:  # the report failed: stop the run before the cluster goes
                run.terminate()
                run.wait()
        code = run.returncode
        final = {row["name"]: row for row in node.pod_report(NAMESPACE)}
        # A pod gone by the end (deleted with its stage) keeps the state it was last seen in, marked.
        pods = [final.get(name) or {**seen[name], "deleted": True} for name in sorted(seen | final)]
        report = run_dir / "cluster.json"
        report.write_text(json.dumps({"run": RUN, "exit_code": code, "seconds": round(time.time() - started),
                                      "operator": f"stand-in for the Kubeflow training operator "
                                                  f"{RELEASE}", "pods": pods}, indent=1) + "\n")
        operator.stop()
        if operator.errors:
            print("operator stand-in errors:\n" + "\n".join(operator.errors[-5:]), file=sys.stderr)
        print(f"{len(pods)} pods, report: {report.relative_to(REPO)}; outputs: "
              f"{(workspace / 'runs' / RUN).relative_to(REPO)}", flush=True)
        return code
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
