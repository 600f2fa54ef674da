"""`helm test` check run in-cluster with the release's ServiceAccount: the PyTorchJob API is served,
the ServiceAccount may submit, poll and cancel jobs, and every stage ConfigMap of the release exists."""

import os
import sys

from kubernetes import client, config
from kubernetes.client.rest import ApiException


def main() -> int:
    config.load_incluster_config()
    namespace = os.environ["TTS_NAMESPACE"]
    failures = []
    try:
        client.CustomObjectsApi().list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")
    except ApiException as err:
        hint = " (is the Kubeflow training operator v1 installed?)" if err.status == 404 else ""
        failures.append(f"listing pytorchjobs.kubeflow.org failed with HTTP {err.status}{hint}")
    authz = client.AuthorizationV1Api()
    for verb in ("create", "get", "list", "delete"):
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                group="kubeflow.org", resource="pytorchjobs", verb=verb, namespace=namespace)))
        if not authz.create_self_subject_access_review(review).status.allowed:
            failures.append(f"the ServiceAccount may not {verb} pytorchjobs in {namespace}")
    core = client.CoreV1Api()
    for name in filter(None, os.environ.get("TTS_CONFIGMAPS", "").split(",")):
        try:
            core.read_namespaced_config_map(name, namespace)
        except ApiException as err:
            failures.append(f"ConfigMap {name}: HTTP {err.status}")
    for line in failures:
        print(f"FAIL: {line}", file=sys.stderr)
    if not failures:
        print("ok: PyTorchJob API served, ServiceAccount can submit jobs, stage configs present")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
